"""posttrain.losses.token_logprobs: chunked per-token log-probs and entropy equal the full-logits
computation (values and gradients), honour Gemma 3's soft-capping and width slicing, and never
hold a [batch, length, vocab] tensor."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vocab_allocations import LargestVocabAllocation

from posttrain.losses.token_logprobs import chunked_token_logprobs, vocabulary_projection
from posttrain.toy.models import TinyModelSpec, build_tiny_model

B, T, H, V = 3, 7, 8, 50


def _inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return hidden, head, labels, mask


def _reference(hidden, head, labels, temperature):
    """The textbook computation on full logits."""
    logp_all = torch.log_softmax(head(hidden) / temperature, dim=-1)
    return logp_all.gather(-1, labels[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1)


def _grads(hidden, head, value):
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    value.backward()
    return hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 20, 1024])  # 4 and 20 do not divide B x T = 21
def test_chunked_values_and_gradients_equal_full_logits(chunk_size, use_mask):
    hidden, head, labels, mask = _inputs()
    weights = torch.linspace(0.5, 2.0, B * T, dtype=hidden.dtype).view(B, T)  # no cancelling gradient errors
    keep = mask if use_mask else torch.ones_like(mask)
    ref_lp, ref_ent = _reference(hidden, head, labels, 0.7)
    ref_grads = _grads(hidden, head, (ref_lp * weights * keep).sum())

    logp, entropy = chunked_token_logprobs(hidden, head, labels, 0.7, chunk_size, with_entropy=True,
                                           mask=mask if use_mask else None)
    assert logp.shape == entropy.shape == (B, T) and not entropy.requires_grad
    grads = _grads(hidden, head, (logp * weights).sum())

    torch.testing.assert_close(logp, (ref_lp * keep).detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(entropy, (ref_ent * keep).detach(), atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_logits_without_projection_and_float32_results_for_low_precision_inputs():
    hidden, head, labels, _ = _inputs(dtype=torch.float32)
    logits = head(hidden).detach().to(torch.bfloat16)
    logp, entropy = chunked_token_logprobs(logits, None, labels, 1.3, chunk_size=5, with_entropy=True)
    ref_lp, ref_ent = _reference(logits.float(), lambda x: x, labels, 1.3)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_lp)
    torch.testing.assert_close(entropy, ref_ent)


def test_everything_masked_gives_zeros_and_a_usable_graph():
    hidden, head, labels, _ = _inputs()
    logp, entropy = chunked_token_logprobs(hidden, head, labels, 1.0, 4, with_entropy=True,
                                           mask=torch.zeros(B, T, dtype=torch.bool))
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    logp.sum().backward()  # a loss over no tokens must still run backward
    assert torch.all(hidden.grad == 0)


def test_bad_inputs_name_what_was_expected():
    hidden, head, labels, mask = _inputs()
    with pytest.raises(ValueError, match=r"labels must be \(3, 7\)"):
        chunked_token_logprobs(hidden, head, labels[:, 1:], 1.0, 4)
    with pytest.raises(ValueError, match="mask must be"):
        chunked_token_logprobs(hidden, head, labels, 1.0, 4, mask=mask[:, 1:])
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_token_logprobs(hidden, head, labels, 1.0, 0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        chunked_token_logprobs(hidden, head, labels, 0.0, 4)
    with pytest.raises(ValueError, match=r"hidden must be \[batch, length, hidden\]"):
        chunked_token_logprobs(hidden[0], head, labels, 1.0, 4)


# --- real models: the projection reproduces the HF forward ---------------------------------------

@pytest.fixture(scope="module")
def gemma3(toy_tokenizer):
    spec = TinyModelSpec(arch="gemma3", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                         intermediate_size=64)
    model = build_tiny_model(spec, toy_tokenizer).double()
    # The toy config has no soft-capping; Gemma 2/3 checkpoints that set it must get it. A small
    # cap makes a missing or misplaced tanh visible in every logit.
    model.config.final_logit_softcapping = 2.0
    return model


def _ids(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 9), generator=g)


def test_projection_reproduces_gemma3_soft_capped_logits(gemma3):
    ids = _ids(gemma3.config.vocab_size)
    with torch.no_grad():
        logits = gemma3(input_ids=ids).logits
        hidden = gemma3.get_decoder()(input_ids=ids).last_hidden_state
        projected = vocabulary_projection(gemma3)(hidden)
    assert logits.abs().max() <= 2.0  # capped
    torch.testing.assert_close(projected, logits, atol=1e-10, rtol=1e-10)
    labels = ids.roll(-1, dims=1)
    with torch.no_grad():
        logp, entropy = chunked_token_logprobs(hidden, vocabulary_projection(gemma3), labels, 0.8, 5, with_entropy=True)
    ref_lp, ref_ent = _reference(logits, lambda x: x, labels, 0.8)
    torch.testing.assert_close(logp, ref_lp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(entropy, ref_ent, atol=1e-10, rtol=1e-10)


class _MatmulOutputs(TorchDispatchMode):
    """Last dimensions of every matrix-product output (to see which vocabulary rows are computed)."""

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul,
                                   torch.ops.aten.bmm, torch.ops.aten.linear):
            self.widths.append(out.shape[-1])
        return out


def test_width_keeps_the_first_rows_without_computing_the_others(gemma3):
    vocab = gemma3.config.vocab_size
    ids = _ids(vocab)
    with torch.no_grad():
        hidden = gemma3.get_decoder()(input_ids=ids).last_hidden_state
        full = vocabulary_projection(gemma3)(hidden)
        with _MatmulOutputs() as probe:
            narrow = vocabulary_projection(gemma3, width=300)(hidden)
    assert narrow.shape[-1] == 300 and probe.widths == [300]
    torch.testing.assert_close(narrow, full[..., :300], atol=1e-10, rtol=1e-10)
    assert vocabulary_projection(gemma3, width=vocab)(hidden).shape[-1] == vocab
    with pytest.raises(ValueError, match=rf"width must be in \[1, {vocab}\]"):
        vocabulary_projection(gemma3, width=vocab + 1)


def test_width_slicing_follows_the_live_weights_and_trains_only_kept_rows(gemma3):
    project = vocabulary_projection(gemma3, width=300)
    hidden = torch.randn(2, 3, gemma3.config.hidden_size, dtype=torch.float64)
    before = project(hidden).detach()
    weight = gemma3.get_output_embeddings().weight
    gemma3.zero_grad(set_to_none=True)
    project(hidden).sum().backward()
    assert weight.grad[300:].abs().sum() == 0 and weight.grad[:300].abs().sum() > 0
    with torch.no_grad():
        weight[:300].mul_(2.0)
    try:
        assert not torch.allclose(project(hidden), before)
    finally:
        with torch.no_grad():
            weight[:300].div_(2.0)
        gemma3.zero_grad(set_to_none=True)


# --- memory: no [B, T, V] tensor -------------------------------------------------------------------


def test_no_tensor_of_batch_times_length_times_vocab_in_forward_saved_or_backward(gemma3):
    """Saved tensors (what autograd keeps until backward) and every op output, forward and
    backward, stay below one chunk of logits; the full path is measured too, so the checks can fail."""
    vocab = gemma3.config.vocab_size
    ids = _ids(vocab)
    labels = ids.roll(-1, dims=1)
    full_size = labels.numel() * vocab
    chunk = 4
    seen = {}
    for chunk_size in (None, chunk):
        saved = [0]

        def pack(t, saved=saved):
            saved[0] = max(saved[0], t.numel())
            return t

        gemma3.zero_grad(set_to_none=True)
        with LargestVocabAllocation(vocab) as probe:
            hidden = gemma3.get_decoder()(input_ids=ids).last_hidden_state
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logp, _ = chunked_token_logprobs(hidden, vocabulary_projection(gemma3), labels, 1.0, chunk_size,
                                                 with_entropy=True)
            logp.sum().backward()
        seen[chunk_size] = (saved[0], probe.most_elements)
    assert seen[None][0] >= full_size and seen[None][1] >= full_size
    saved, produced = seen[chunk]
    assert saved < chunk * vocab  # only hidden states, labels and [tokens] results are kept
    assert produced <= chunk * vocab  # one chunk's logits at a time, in forward and in backward
    # The output layer's weight gradient is [V, H]: not vocabulary-last, so not counted above.
    assert gemma3.get_output_embeddings().weight.grad is not None
    gemma3.zero_grad(set_to_none=True)
