"""Distillation losses against brute-force loops over positions and vocabulary entries."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.distillation import (EMPTY_SLOT, forward_kl, generalized_jsd, reverse_kl, sample_teacher_targets,
                                           sampled_target_loss, top_k_teacher_targets)

B, L, V = 2, 5, 7


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    return student, teacher, mask


def _softmax(row, t):
    exps = [math.exp(x / t) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _brute(student, teacher, mask, per_position, reduction="token_mean"):
    values = [[per_position(student[b, n].tolist(), teacher[b, n].tolist()) if mask[b, n] else 0.0 for n in range(L)]
              for b in range(B)]
    if reduction == "token_mean":
        return sum(map(sum, values)) / int(mask.sum())
    per_seq = [sum(v) / int(m.sum()) for v, m in zip(values, mask) if int(m.sum())]
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_and_reverse_kl_match_brute_force(logits, temperature, chunk_size):
    s, t, m = logits
    fwd = _brute(s, t, m, lambda a, b: _kl(_softmax(b, temperature), _softmax(a, temperature)))
    rev = _brute(s, t, m, lambda a, b: _kl(_softmax(a, temperature), _softmax(b, temperature)))
    assert forward_kl(s, t, temperature, m, chunk_size).item() == pytest.approx(fwd, rel=1e-6)
    assert reverse_kl(s, t, temperature, m, chunk_size).item() == pytest.approx(rev, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_brute_force(logits, beta):
    s, t, m = logits

    def jsd(a, b):
        q, p = _softmax(a, 1.0), _softmax(b, 1.0)
        mix = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * _kl(p, mix) + (1 - beta) * _kl(q, mix)

    expected = _brute(s, t, m, jsd, reduction="sequence_mean")
    got = generalized_jsd(s, t, beta, mask=m, chunk_size=3, reduction="sequence_mean").item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_beta_endpoints_equal_the_two_kls(logits):
    s, t, m = logits
    assert generalized_jsd(s, t, 0.0, mask=m).item() == forward_kl(s, t, mask=m).item()
    assert generalized_jsd(s, t, 1.0, mask=m).item() == reverse_kl(s, t, mask=m).item()
    # and the mixture form approaches them, scaled by beta, near the ends (continuity check)
    near0 = generalized_jsd(s, t, 1e-4, mask=m).item() / 1e-4
    assert near0 == pytest.approx(forward_kl(s, t, mask=m).item(), rel=1e-2)


def test_chunked_gradients_equal_unchunked(logits):
    s, t, m = logits
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    generalized_jsd(s1, t, 0.3, mask=m).backward()
    generalized_jsd(s2, t, 0.3, mask=m, chunk_size=2).backward()
    assert torch.allclose(s1.grad, s2.grad)
    assert s1.grad[0, 0].abs().sum() == 0 and s1.grad[0, 1].abs().sum() > 0  # masked positions get no gradient


def test_masked_positions_do_not_count_even_if_garbage(logits):
    s, t, m = logits
    s2 = s.clone()
    s2[0, 0] = 1e4  # a prompt position with absurd logits
    s2[1, 4] = float("nan")  # a padding position
    assert forward_kl(s2, t, mask=m).item() == pytest.approx(forward_kl(s, t, mask=m).item())


def test_sampled_target_loss_matches_brute_force_both_normalisations(logits):
    s, t, m = logits
    ids = torch.tensor([[0, 3, EMPTY_SLOT]], dtype=torch.int32).expand(B, L, 3).contiguous()
    probs = torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float16).expand(B, L, 3).contiguous()

    def ce_vocab(a, _):
        q = _softmax(a, 1.0)
        return -(0.25 * math.log(q[0]) + 0.75 * math.log(q[3]))

    def ce_set(a, _):
        q = _softmax([a[0], a[3]], 1.0)
        return -(0.25 * math.log(q[0]) + 0.75 * math.log(q[1]))

    assert sampled_target_loss(s, ids, probs, "vocab", m).item() == pytest.approx(_brute(s, t, m, ce_vocab), rel=1e-6)
    assert sampled_target_loss(s, ids, probs, "set", m, chunk_size=2).item() == pytest.approx(_brute(s, t, m, ce_set), rel=1e-6)


def test_sampled_targets_without_replacement_are_distinct_and_renormalised(logits):
    _, t, _ = logits
    ids, probs = sample_teacher_targets(t, k=4, generator=torch.Generator().manual_seed(1))
    assert ids.dtype == torch.int32 and probs.dtype == torch.float16 and ids.shape == (B, L, 4)
    p = torch.softmax(t, -1)
    for b in range(B):
        for n in range(L):
            row = ids[b, n].long()
            assert len(set(row.tolist())) == 4
            expected = p[b, n, row] / p[b, n, row].sum()
            assert torch.allclose(probs[b, n].double(), expected, atol=1e-3)


def test_sampled_targets_equal_teacher_when_k_reaches_vocab(logits):
    s, t, m = logits
    ids, probs = sample_teacher_targets(t, k=V, generator=torch.Generator().manual_seed(0))
    dense = torch.zeros(B, L, V, dtype=torch.float64).scatter_(-1, ids.long(), probs.double())
    assert torch.allclose(dense, torch.softmax(t, -1), atol=1e-3)
    # the cross-entropy then equals forward KL plus the teacher's entropy
    p = torch.softmax(t, -1)
    entropy = -(p * p.log()).sum(-1)
    expected = forward_kl(s, t, mask=m) + (entropy * m).sum() / m.sum()
    assert sampled_target_loss(s, ids, probs, mask=m).item() == pytest.approx(expected.item(), rel=1e-3)


def test_sampled_targets_converge_to_teacher_as_k_grows():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 64, 200, generator=g) * 2
    p = torch.softmax(teacher, -1)

    def total_variation(ids, probs):
        dense = torch.zeros_like(p).scatter_add_(-1, ids.long().clamp(min=0), probs.float() * (ids >= 0))
        return 0.5 * (dense - p).abs().sum(-1).mean().item()

    without = [total_variation(*sample_teacher_targets(teacher, k, generator=g)) for k in (8, 64, 200)]
    counts = [total_variation(*sample_teacher_targets(teacher, k, True, generator=g, counts=True)) for k in (16, 256, 4096)]
    assert without[0] > without[1] > without[2] and without[2] < 1e-3
    assert counts[0] > counts[1] > counts[2] and counts[2] < 0.15


def test_count_based_targets_are_unbiased_and_renormalised_ones_are_not():
    # One position, a teacher with a heavy head: averaging many small-K draws, counts/K recovers
    # p_T while the renormalised target over-weights the head (the bias RS-KD corrects).
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    teacher = p.log().expand(1, 4000, 6).contiguous()
    g = torch.Generator().manual_seed(0)

    def mean_target(ids, probs):
        dense = torch.zeros(1, 4000, 6).scatter_add_(-1, ids.long().clamp(min=0), probs.float() * (ids >= 0))
        return dense.mean(1)[0]

    unbiased = mean_target(*sample_teacher_targets(teacher, 3, True, generator=g, counts=True))
    biased = mean_target(*sample_teacher_targets(teacher, 3, True, generator=g))
    assert torch.allclose(unbiased, p, atol=0.02)
    assert biased[0] > p[0] + 0.05


def test_top_k_targets_are_the_renormalised_head(logits):
    _, t, _ = logits
    ids, probs = top_k_teacher_targets(t, 3)
    p = torch.softmax(t, -1)
    top = p.topk(3, -1)
    assert torch.equal(ids.long(), top.indices)
    assert torch.allclose(probs.double(), top.values / top.values.sum(-1, keepdim=True), atol=1e-3)


def test_sampled_loss_at_k256_is_close_to_full_kd_on_a_peaked_teacher():
    g = torch.Generator().manual_seed(0)
    vocab = 4096
    teacher = torch.randn(2, 8, vocab, generator=g) * 4  # peaked: most mass on a few ids
    student = torch.randn(2, 8, vocab, generator=g)
    p = torch.softmax(teacher, -1)
    full_ce = -(p * torch.log_softmax(student, -1)).sum(-1).mean()
    ids, probs = sample_teacher_targets(teacher, 256, generator=g)
    assert sampled_target_loss(student, ids, probs).item() == pytest.approx(full_ce.item(), rel=0.05)


def test_shape_errors_are_clear(logits):
    s, t, m = logits
    with pytest.raises(ValueError, match="mask: expected shape"):
        forward_kl(s, t, mask=m[:, :3])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="with_replacement"):
        sample_teacher_targets(t, 3, with_replacement=False, counts=True)
