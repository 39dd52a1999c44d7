"""BOND / J-BOND mathematics (posttrain.losses.bond) on toy categorical policies, by exact enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from posttrain.losses.bond import (JBOND_PENALTY, backward_rewards, best_of_n_kl_bound, best_of_n_probs,
                                   better_sample_index, categorical_kl, forward_nll_loss, jbond_rewards,
                                   jeffreys_loss, leave_one_out_advantages, log_quantile_rewards, quantile_estimates,
                                   reward_quantiles, ties)


def _enumerate_best_of_n(ref: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """P(best of n draws = y), over every n-tuple of outcomes, the first maximal draw winning."""
    out = torch.zeros_like(ref)
    for draws in itertools.product(range(len(ref)), repeat=n):
        prob = math.prod(float(ref[d]) for d in draws)
        winner = max(range(n), key=lambda i: (float(rewards[draws[i]]), -i))  # first maximal draw
        out[draws[winner]] += prob
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_best_of_n_distribution_matches_enumeration_with_and_without_ties(n):
    g = torch.Generator().manual_seed(n)
    ref = torch.rand(5, generator=g, dtype=torch.float64)
    ref /= ref.sum()
    for rewards in (torch.tensor([0.3, 1.0, -2.0, 0.5, 0.7], dtype=torch.float64),   # distinct
                    torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5], dtype=torch.float64)):   # ties
        bon = best_of_n_probs(ref, rewards, n)
        torch.testing.assert_close(bon, _enumerate_best_of_n(ref, rewards, n), rtol=1e-12, atol=1e-12)
        assert float(bon.sum()) == pytest.approx(1.0, abs=1e-12)
    # The paper's form p_le^(N-1) * sum_i (p_lt / p_le)^(i-1) is the same number.
    p_le, p_lt = reward_quantiles(ref, rewards)
    paper = ref * p_le ** (n - 1) * sum((p_lt / p_le) ** (i - 1) for i in range(1, n + 1))
    torch.testing.assert_close(best_of_n_probs(ref, rewards, n), paper, rtol=1e-12, atol=1e-12)


def test_best_of_n_kl_stays_below_the_bound_and_approaches_it_as_the_categorical_gets_finer():
    for n in (2, 4, 8):
        bound = best_of_n_kl_bound(n)
        kls = []
        for k in (2, 8, 64, 1024):
            ref = torch.full((k,), 1.0 / k, dtype=torch.float64)
            rewards = torch.arange(k, dtype=torch.float64)  # distinct rewards
            kls.append(float(categorical_kl(best_of_n_probs(ref, rewards, n), ref)))
        assert all(kl <= bound + 1e-12 for kl in kls), (n, kls, bound)
        assert kls == sorted(kls)  # finer categoricals come closer
        assert bound - kls[-1] < 0.01 * bound, (n, kls, bound)
    # The numbers docs/algorithms.md#bond quotes: N = 2 over two equally likely outcomes 0.131 vs 0.193; N = 8 ~ 1.20.
    two = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert float(categorical_kl(best_of_n_probs(two, torch.tensor([0.0, 1.0]).double(), 2), two)) == pytest.approx(0.131, abs=1e-3)
    assert best_of_n_kl_bound(2) == pytest.approx(0.193, abs=1e-3) and best_of_n_kl_bound(8) == pytest.approx(1.204, abs=1e-3)
    # Ties pull the KL further down: all rewards equal -> pi_BoN = pi_ref.
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert float(categorical_kl(best_of_n_probs(ref, torch.zeros(3).double(), 8), ref)) == pytest.approx(0.0, abs=1e-12)


def test_expected_jbond_reward_is_minus_log16_times_one_minus_p_le_squared():
    ref = torch.tensor([0.1, 0.25, 0.3, 0.15, 0.2], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0], dtype=torch.float64)  # ties on purpose
    p_le, _ = reward_quantiles(ref, rewards)
    for y in range(5):
        expected = 0.0
        for a, b in itertools.product(range(5), repeat=2):
            r_j = jbond_rewards(rewards[y:y + 1], torch.stack([rewards[a], rewards[b]])[None])
            expected += float(ref[a] * ref[b]) * float(r_j[0])
        assert expected == pytest.approx(JBOND_PENALTY * (1 - float(p_le[y])) ** 2, abs=1e-12)
    assert JBOND_PENALTY * (1 - 0.5) ** 2 == pytest.approx(math.log(0.5))


def test_tie_rule_strict_for_the_penalty_first_for_the_forward_target():
    anchors = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.9], [0.9, 0.2]])
    # The forward term's target is the better anchor sample; on a tie, the first one.
    assert better_sample_index(anchors).tolist() == [1, 0, 0, 1, 0]
    # r_J: -log 16 only when strictly worse than both; equal to the worse one is not penalised.
    policy = torch.tensor([-1.0, 0.0, 0.5, 0.1, 0.3])
    assert jbond_rewards(policy, anchors).tolist() == pytest.approx([JBOND_PENALTY, 0.0, 0.0, JBOND_PENALTY, 0.0])
    assert ties(policy, anchors).tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match=r"two anchor rewards per prompt \[B, 2\]"):
        jbond_rewards(policy, anchors[:, :1])


def test_best_of_n_sampling_by_first_argmax_draws_from_the_best_of_n_distribution():
    g = torch.Generator().manual_seed(0)
    ref = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    n, draws = 3, 200_000
    samples = torch.multinomial(ref, draws * n, replacement=True, generator=g).view(draws, n)
    chosen = samples.gather(1, better_sample_index(rewards[samples])[:, None]).squeeze(1)
    empirical = torch.bincount(chosen, minlength=4).double() / draws
    torch.testing.assert_close(empirical, best_of_n_probs(ref.double(), rewards.double(), n), atol=5e-3, rtol=0)


def test_quantile_estimates_and_the_log_quantile_reward():
    anchors = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    policy = torch.tensor([1.0, 0.0])
    p_le, p_lt = quantile_estimates(policy, anchors)
    assert p_le.tolist() == [0.5, 0.0] and p_lt.tolist() == [0.25, 0.0]
    # Counting the sample itself: (1 + 2) / 5 and 1 / 5, never log 0.
    assert log_quantile_rewards(policy, anchors).tolist() == pytest.approx([math.log(3 / 5), math.log(1 / 5)])


def test_backward_rewards_and_the_leave_one_out_baseline_over_a_split_batch():
    r = backward_rewards(torch.tensor([0.0, JBOND_PENALTY, 0.0, 0.0]), torch.tensor([-3.0, -4.0, -2.0, -5.0]),
                         torch.tensor([-3.5, -4.0, -2.0, -4.0]), kl_coef=1.0)
    assert r.tolist() == pytest.approx([-0.5, JBOND_PENALTY, 0.0, 1.0])
    valid = torch.tensor([True, True, True, False])
    whole = leave_one_out_advantages(r, valid, total=float(r[valid].sum()), count=3.0)
    # Two "ranks" holding halves of the batch, given the global sum and count, agree with the whole.
    halves = torch.cat([leave_one_out_advantages(r[:2], valid[:2], float(r[valid].sum()), 3.0),
                        leave_one_out_advantages(r[2:], valid[2:], float(r[valid].sum()), 3.0)])
    torch.testing.assert_close(whole, halves)
    assert whole[3] == 0.0
    assert float(whole[0]) == pytest.approx(-0.5 - (JBOND_PENALTY + 0.0) / 2)


def test_forward_nll_and_jeffreys_combination():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(forward_nll_loss(logp, mask)) == pytest.approx(2.0)  # (1 + 2 + 3) / 3 tokens
    assert float(forward_nll_loss(logp, mask, "sequence_sum")) == pytest.approx(3.0)
    assert float(forward_nll_loss(logp, mask, normalizer=6.0)) == pytest.approx(1.0)
    f, b = torch.tensor(2.0), torch.tensor(4.0)
    assert float(jeffreys_loss(f, b)) == 3.0
    assert float(jeffreys_loss(f, b, beta=1.0)) == 4.0 and float(jeffreys_loss(f, b, beta=0.0)) == 2.0
    assert float(jeffreys_loss(f, b, kl=torch.tensor(1.0), gamma=0.5)) == 3.5
    with pytest.raises(ValueError, match="beta must lie in"):
        jeffreys_loss(f, b, beta=1.5)
