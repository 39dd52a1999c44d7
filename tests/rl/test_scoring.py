"""posttrain.scoring: batched completion logprobs, flat and shared-prompt layouts, against a
reference that scores every sequence alone (no padding, full logits) on real tiny models."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.scoring import score_completions
from posttrain.toy.models import TinyModelSpec, build_tiny_model


def _reference(model, prompts, completions, temperature):
    """One unpadded forward per sequence: logprob of each completion token, and entropy."""
    logps, ents = [], []
    for p, c in zip(prompts, completions):
        if not c:
            logps.append(torch.zeros(0))
            ents.append(torch.zeros(0))
            continue
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(c) - 1].float() / temperature
        lp_all = torch.log_softmax(logits, dim=-1)
        logps.append(lp_all.gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
        ents.append(-(lp_all.exp() * lp_all).sum(-1).detach())
    return logps, ents


def _objective(logps):
    """A loss that weighs every token differently, so gradient mistakes cannot cancel out."""
    total = 0.0
    for i, lp in enumerate(logps):
        if len(lp):
            total = total + (lp * torch.linspace(0.5, 1.5, len(lp)) * (i + 1)).sum()
    return total


def _grads(model):
    return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module", params=["gemma3", "llama", "qwen2"])
def model(request, toy_tokenizer):
    spec = TinyModelSpec(arch=request.param, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=32, intermediate_size=128)
    m = build_tiny_model(spec, toy_tokenizer).float()
    if request.param == "gemma3":
        m.config.sliding_window = 8  # shorter than the sequences below, so the local layers' window matters
    return m


def _batch(group_size: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[2] + [rng.randrange(10, 700) for _ in range(rng.randrange(2, 20))] for _ in range(3)]
    seq_prompts = [p for p in prompts for _ in range(group_size)]
    completions = [[rng.randrange(10, 700) for _ in range(rng.choice([0, 1, 5, 17]))] for _ in seq_prompts]
    completions[1] = [rng.randrange(10, 700) for _ in range(17)]  # at least one long completion
    return seq_prompts, completions


@pytest.mark.parametrize("chunk_size", [None, 1024, 7])  # None: full logits; 7 splits rows and sequences
@pytest.mark.parametrize("group_size", [1, 4])
def test_logprobs_entropy_and_gradients_equal_one_sequence_at_a_time(model, toy_tokenizer, group_size, chunk_size):
    prompts, completions = _batch(4)
    model.zero_grad()
    ref_lp, ref_ent = _reference(model, prompts, completions, temperature=0.7)
    _objective(ref_lp).backward()
    ref_grad = _grads(model)

    model.zero_grad()
    logp, mask, entropy = score_completions(model, prompts, completions, 0.7, toy_tokenizer.pad_token_id,
                                            with_entropy=True, group_size=group_size, chunk_size=chunk_size)
    rows = [logp[i, :len(c)] for i, c in enumerate(completions)]
    _objective(rows).backward()
    grad = _grads(model)

    for i, c in enumerate(completions):
        assert mask[i].sum().item() == len(c)
        assert torch.all(logp[i, len(c):] == 0) and torch.all(entropy[i, len(c):] == 0)
        torch.testing.assert_close(rows[i], ref_lp[i], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(entropy[i, :len(c)], ref_ent[i], atol=2e-5, rtol=1e-4)
    # Chunks add up the output layer's gradient in another order: float32 rounding, a little above 2e-5.
    torch.testing.assert_close(grad, ref_grad, atol=5e-5, rtol=1e-3)


def test_shared_layout_refuses_rows_that_do_not_share_their_prompt(model, toy_tokenizer):
    prompts, completions = _batch(2)
    prompts[1] = prompts[1] + [5]
    with pytest.raises(ValueError, match="should share one prompt"):
        score_completions(model, prompts, completions, 1.0, toy_tokenizer.pad_token_id, group_size=2)
    with pytest.raises(ValueError, match="groups of 4"):
        score_completions(model, prompts, completions, 1.0, toy_tokenizer.pad_token_id, group_size=4)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_all_empty_completions_score_as_masked_rows(model, toy_tokenizer, chunk_size):
    prompts, _ = _batch(2)
    logp, mask, _ = score_completions(model, prompts, [[] for _ in prompts], 1.0, toy_tokenizer.pad_token_id,
                                      group_size=2, chunk_size=chunk_size)
    assert logp.shape == (len(prompts), 1) and mask.sum() == 0 and torch.all(logp == 0)


def test_chunked_scoring_reaches_the_decoder_through_a_peft_model(model, toy_tokenizer):
    """LoRA-wrapped policies: get_decoder() and the output layer are found through peft, and the
    adapters get gradients from the chunked path."""
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    prompts, completions = _batch(2)
    full, _, _ = score_completions(wrapped, prompts, completions, 0.9, toy_tokenizer.pad_token_id, group_size=2,
                                   chunk_size=None)
    chunked, _, _ = score_completions(wrapped, prompts, completions, 0.9, toy_tokenizer.pad_token_id, group_size=2,
                                      chunk_size=5)
    torch.testing.assert_close(chunked, full.detach(), atol=1e-6, rtol=1e-6)
    chunked.sum().backward()
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
