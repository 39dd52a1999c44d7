"""The policy-gradient pieces against values computed by hand."""

import math

import pytest
import torch

from posttrain.losses.policy import kl_regularised_rewards, reinforce_loss, rloo_advantages


def test_rloo_advantage_subtracts_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv = rloo_advantages(rewards)
    # prompt 0, sample 0: 1 - mean(0, 0, 1) = 2/3 ; sample 1: 0 - mean(1, 0, 1) = -2/3
    # prompt 1, sample 0: 3 - mean(1, 2, 2) = 4/3 ; sample 1: 1 - mean(3, 2, 2) = -4/3 ; sample 2: 2 - 2 = 0
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_rloo_advantages_of_equal_rewards_are_zero():
    assert torch.all(rloo_advantages(torch.full((3, 5), 0.7)).abs() < 1e-6)


def test_rloo_needs_two_samples_per_prompt():
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.ones(4, 1))


def test_kl_regularised_reward_subtracts_beta_times_the_log_ratio():
    r = torch.tensor([1.0, 0.0])
    logp_pi = torch.tensor([-2.0, -5.0])
    logp_anchor = torch.tensor([-3.0, -4.0])
    # log ratio = (1, -1); r_beta = r - 0.1 * ratio
    torch.testing.assert_close(kl_regularised_rewards(r, logp_pi, logp_anchor, 0.1), torch.tensor([0.9, 0.1]))
    assert kl_regularised_rewards(r, logp_pi, logp_anchor, 0.0) is r


def _batch():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second sequence has 2 tokens
    adv = torch.tensor([2.0, -1.0])
    return logprobs, mask, adv


def test_reinforce_loss_aggregations_by_hand():
    logprobs, mask, adv = _batch()
    # per-token losses: seq0: -2*(-1,-2,-3) = (2,4,6) sum 12 ; seq1: 1*(-0.5,-0.5) = (-0.5,-0.5) sum -1
    assert reinforce_loss(logprobs, adv, mask, aggregation="token_mean").item() == pytest.approx(11 / 5)
    assert reinforce_loss(logprobs, adv, mask, aggregation="sequence_sum").item() == pytest.approx((12 - 1) / 2)
    assert reinforce_loss(logprobs, adv, mask, aggregation="sequence_mean").item() == pytest.approx((12 / 3 - 1 / 2) / 2)
    assert reinforce_loss(logprobs, adv, mask, aggregation="token_mean", normalizer=10).item() == pytest.approx(11 / 10)


def test_reinforce_gradient_is_minus_advantage_times_grad_logprob():
    logprobs, mask, adv = _batch()
    reinforce_loss(logprobs, adv, mask, aggregation="sequence_sum").backward()
    expected = torch.tensor([[-2.0, -2.0, -2.0], [1.0, 1.0, 0.0]]) / 2
    torch.testing.assert_close(logprobs.grad, expected)


def test_importance_weight_is_truncated_at_clip():
    logprobs, mask, adv = _batch()
    # engine logprobs lower than the trainer's by log(3) on the first token of each sequence: w = 3 there
    old = logprobs.detach().clone()
    old[:, 0] -= math.log(3.0)
    loss = reinforce_loss(logprobs, adv, mask, old_logprobs=old, clip=2.0, aggregation="sequence_sum")
    loss.backward()
    # first tokens get weight min(3, 2) = 2, the rest weight 1
    expected = torch.tensor([[-4.0, -2.0, -2.0], [2.0, 1.0, 0.0]]) / 2
    torch.testing.assert_close(logprobs.grad, expected)
    logprobs.grad = None
    reinforce_loss(logprobs, adv, mask, old_logprobs=old, aggregation="sequence_sum").backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-6.0, -2.0, -2.0], [3.0, 1.0, 0.0]]) / 2)


def test_accumulated_micro_batches_equal_the_full_batch_loss():
    torch.manual_seed(0)
    logprobs = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    adv = torch.randn(4)
    full = reinforce_loss(logprobs, adv, mask, aggregation="token_mean")
    n_tok = mask.sum()
    parts = sum(reinforce_loss(logprobs[i:i + 2], adv[i:i + 2], mask[i:i + 2], normalizer=n_tok) for i in (0, 2))
    torch.testing.assert_close(parts, full)


def test_rloo_leaves_invalid_samples_out_of_the_baseline():
    rewards = torch.tensor([[1.0, 5.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, False, True, True], [True, False, False, False]])
    adv = rloo_advantages(rewards, valid)
    # prompt 0 over samples (1, 0, 2): 1 - 1 = 0, 0 - 1.5 = -1.5, 2 - 0.5 = 1.5; the invalid one gets 0
    # prompt 1 has one valid sample: no baseline, all zero
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, -1.5, 1.5], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rloo_advantages(rewards, torch.ones_like(valid)), rloo_advantages(rewards))
