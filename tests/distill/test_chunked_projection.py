"""Chunked vocabulary projection: the same loss and gradients as full logits, without [B, L, V] tensors."""

from __future__ import annotations

import pytest
import torch
from vocab_allocations import LargestVocabAllocation

from posttrain.chat import tokenize_conversation
from posttrain.losses.distillation import ProjectedLogits, sample_teacher_targets, token_log_probs
from posttrain.modeling import load_policy
from posttrain.data import TokenSequence
from posttrain.sequences import logit_mask, pad_batch
from posttrain.stages.distill import DistillStageConfig, distillation_loss, shifted_logits
from posttrain.toy import tasks

CHUNK = 5  # small, so every batch spans several chunks and one chunk straddles two sequences

TARGETS = {
    "jsd": dict(target="full", divergence="jsd", beta=0.3),
    "forward_kl": dict(target="full", divergence="forward_kl"),
    "reverse_kl_sequence_mean": dict(target="full", divergence="reverse_kl", reduction="sequence_mean"),
    "top_k": dict(target="top_k", divergence="forward_kl", k=16),
    "sampled": dict(target="sampled", divergence="forward_kl", k=16),
    "sampled_counts_set": dict(target="sampled_counts", divergence="forward_kl", k=16, student_normalisation="set"),
}


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def models(request, tiny_gemma3_dir, tiny_llama_dir):
    """Student, a different teacher of the same architecture, and a batch of toy conversations."""
    path = tiny_gemma3_dir if request.param == "gemma3" else tiny_llama_dir
    student, tok = load_policy(path)
    teacher, _ = load_policy(path)
    if request.param == "gemma3":
        # The tiny config has no soft-capping; Gemma 2-style capping must be reproduced too.
        student.config.final_logit_softcapping = 30.0
        teacher.config.final_logit_softcapping = 30.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    teacher.eval().requires_grad_(False)
    student.train()
    rows = tasks.generate("math", 3, seed=3, fmt="chat")
    seqs = [TokenSequence(*vars(tokenize_conversation(tok, r["messages"])).values()) for r in rows]
    seqs[1] = TokenSequence(seqs[1].input_ids[:-4], seqs[1].loss_mask[:-4])  # ragged: padding in the batch
    return student, teacher, pad_batch(seqs, tok.pad_token_id)


def _loss_and_grads(student, teacher, batch, cfg, target_ids=None, target_probs=None, generator=None):
    student.zero_grad(set_to_none=True)
    mask = logit_mask(batch["loss_mask"])
    with torch.no_grad():
        teacher_logits = shifted_logits(teacher, batch, cfg.chunk_size)
    student_logits = shifted_logits(student, batch, cfg.chunk_size)
    loss = distillation_loss(cfg, student_logits, mask, teacher_logits, target_ids, target_probs, generator)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def _cfg(chunk_size, **kw):
    return DistillStageConfig(model="s", teacher="t", dataset="d", chunk_size=chunk_size, **kw)


def test_projection_reproduces_the_models_own_logits(models):
    student, _, batch = models
    mask = logit_mask(batch["loss_mask"])
    projected = shifted_logits(student, batch, CHUNK)
    assert isinstance(projected, ProjectedLogits)
    with torch.no_grad():
        full = shifted_logits(student, batch, None)
        ids = batch["input_ids"][:, 1:]
        torch.testing.assert_close(token_log_probs(projected, ids, 0.7, mask, CHUNK),
                                   token_log_probs(full, ids, 0.7, mask, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(TARGETS))
def test_chunked_projection_gives_the_same_loss_and_gradients(models, name):
    student, teacher, batch = models
    settings = TARGETS[name]
    target_ids = target_probs = None
    if settings["target"].startswith("sampled"):
        # Draws at the counted positions only use another random stream than draws at every
        # position, so both paths train on the same drawn targets (drawn through the projection).
        mask = logit_mask(batch["loss_mask"])
        with torch.no_grad():
            teacher_projected = shifted_logits(teacher, batch, CHUNK)
        counts = settings["target"] == "sampled_counts"
        target_ids, target_probs = sample_teacher_targets(
            teacher_projected, settings["k"], with_replacement=counts, counts=counts, chunk_size=CHUNK, mask=mask,
            generator=torch.Generator().manual_seed(1))
        assert (target_ids[mask != 0] >= 0).any(-1).all() and (target_ids[mask == 0] < 0).all()

    full_loss, full_grads = _loss_and_grads(student, teacher, batch, _cfg(None, **settings), target_ids, target_probs)
    chunked_loss, chunked_grads = _loss_and_grads(student, teacher, batch, _cfg(CHUNK, **settings), target_ids, target_probs)

    assert full_loss > 0
    torch.testing.assert_close(chunked_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert chunked_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for name_, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name_], grad, atol=1e-5, rtol=1e-4, msg=name_)


def test_sampled_targets_through_the_projection_equal_the_teacher_when_k_covers_the_vocab(models):
    _, teacher, batch = models
    mask = logit_mask(batch["loss_mask"])
    with torch.no_grad():
        projected = shifted_logits(teacher, batch, CHUNK)
        full = shifted_logits(teacher, batch, None)
    vocab = full.shape[-1]
    ids, probs = sample_teacher_targets(projected, k=vocab, chunk_size=CHUNK, mask=mask,
                                        generator=torch.Generator().manual_seed(0))
    dense = torch.zeros(*ids.shape[:2], vocab).scatter_(-1, ids.long().clamp(min=0), probs.float())
    counted = mask != 0
    torch.testing.assert_close(dense[counted], torch.softmax(full[counted], -1), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["jsd", "top_k", "sampled"])
def test_no_tensor_scales_with_length_times_vocab(models, name):
    """With chunk_size set, no op (forward, target drawing or backward) makes a [B, L, V] tensor.

    The check counts the rows of every op output whose last dimension is the vocabulary; the
    full-logits path is measured too, so the check is shown able to fail.
    """
    student, teacher, batch = models
    vocab = student.get_output_embeddings().weight.shape[0]
    assert vocab != student.config.hidden_size
    batch_rows = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    seen = {}
    for chunk_size in (None, CHUNK):
        with LargestVocabAllocation(vocab) as probe:
            _loss_and_grads(student, teacher, batch, _cfg(chunk_size, **TARGETS[name]),
                            generator=torch.Generator().manual_seed(0))
        seen[chunk_size] = probe.most_rows
    assert seen[None] >= batch_rows
    assert seen[CHUNK] <= 2 * CHUNK  # one chunk; the JSD stacks its two log-prob tensors for the mixture


def test_saved_tensors_for_backward_hold_no_vocabulary_wide_logits(models):
    """What autograd keeps between forward and backward: no logits beyond the hidden states."""
    student, teacher, batch = models
    vocab = student.get_output_embeddings().weight.shape[0]
    biggest_saved = {}
    for chunk_size in (None, CHUNK):
        rows = [0]

        def pack(t, rows=rows):
            if t.dim() >= 2 and t.shape[-1] == vocab:
                rows[0] = max(rows[0], t.numel() // vocab)
            return t

        mask = logit_mask(batch["loss_mask"])
        cfg = _cfg(chunk_size, **TARGETS["jsd"])
        with torch.no_grad():
            teacher_logits = shifted_logits(teacher, batch, chunk_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = distillation_loss(cfg, shifted_logits(student, batch, chunk_size), mask, teacher_logits)
        loss.backward()
        student.zero_grad(set_to_none=True)
        biggest_saved[chunk_size] = rows[0]
    assert biggest_saved[None] >= int(mask.sum())  # full logits: saved for lm_head's backward at least
    assert biggest_saved[CHUNK] == 0  # chunked: each chunk's logits are recomputed in backward

