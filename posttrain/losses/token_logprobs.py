"""Per-token log-probabilities and entropy without a [batch, length, vocabulary] tensor.

Every trainer-side log-prob in the project (RL scoring of policy, anchor and start model, drift
checks, distillation's sampled-token log-probs) is

    logprob(y_t) = log_softmax(logits_t / T)[y_t],   entropy_t = -sum_v p_t(v) log p_t(v),

over the full vocabulary. With Gemma 3's 262,144-row output layer the float32 logits of a
32 x 512 batch alone take 17 GB, and a naive log_softmax keeps several such tensors alive for
the backward pass. `chunked_token_logprobs` takes the decoder's final hidden states instead and
projects them to the vocabulary a chunk of tokens at a time, inside activation checkpointing:
the forward keeps only the [tokens] results, and the backward recomputes one chunk's logits at
a time from its hidden states. Peak memory then depends on `chunk_size x vocab`, never on
`batch x length x vocab`, and the gradients are those of the unchunked computation.

This module knows tensors, a projection callable and a model's output layer; no stages.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Projection = Callable[[torch.Tensor], torch.Tensor]

# "auto" chunks hold this many logits (2**25 = 128 MiB in float32): the number of positions per
# chunk shrinks as the vocabulary grows, so a chunk's working set is the same at 32k and 262k.
AUTO_CHUNK_LOGITS = 2**25


def resolve_chunk_size(chunk_size: int | str | None, vocab_size: int) -> int | None:
    """Positions per chunk for a `chunk_size` option: an int as given, None (one chunk: full
    logits), or "auto": as many positions as fit AUTO_CHUNK_LOGITS logits (at least 16), which
    bounds the chunk's memory independently of the vocabulary."""
    if chunk_size == "auto":
        return max(16, AUTO_CHUNK_LOGITS // max(1, int(vocab_size)))
    if chunk_size is None or (isinstance(chunk_size, int) and chunk_size >= 1):
        return chunk_size
    raise ValueError(f"chunk_size: expected a positive integer, 'auto' or null, got {chunk_size!r}")


def vocabulary_projection(model, width: int | None = None) -> Projection:
    """hidden [..., H] -> logits [..., V] exactly as the model's forward computes them after its decoder.

    That is the output layer (lm_head), then the final logit soft-capping of configs that have
    one (Gemma 2/3: cap * tanh(logits / cap)). A model whose forward does anything else after
    the decoder would need its own projection; the tests compare against the HF forward.

    `width`: keep only the first `width` vocabulary rows, e.g. a teacher whose output layer is
    padded beyond the tokenizer it shares with the student. The weight is sliced (a view of its
    first rows), so the dropped rows are never computed. The output layer is read at every call,
    so the projection follows the live weights of a model being trained.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"vocabulary_projection: {type(model).__name__} has no output embeddings (lm_head)")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    rows = head.weight.shape[0]
    if width is not None:
        if not 1 <= width <= rows:
            raise ValueError(f"vocabulary_projection: width must be in [1, {rows}] (the output layer's rows), got {width}")
        if width == rows:
            width = None
        elif type(head) is not torch.nn.Linear:
            # An adapter-wrapped or sharded head computes more than weight @ hidden; slicing its
            # weight would silently drop that part.
            raise ValueError(f"vocabulary_projection: width={width} needs a plain torch.nn.Linear output layer, "
                             f"got {type(head).__name__}")

    def project(hidden: torch.Tensor) -> torch.Tensor:
        if width is None:
            logits = head(hidden)
        else:
            bias = head.bias[:width] if head.bias is not None else None
            logits = F.linear(hidden, head.weight[:width], bias)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return project


def _chunk_rows(project: Projection | None, temperature: float, with_entropy: bool):
    """The per-chunk computation: hidden [N, H] (or logits [N, V]) and labels [N] -> logprobs [N] (+ entropy [N])."""

    def rows(hidden: torch.Tensor, labels: torch.Tensor):
        logits = hidden if project is None else project(hidden)
        # At least float32 before the division: bf16 logits would round the scaled values.
        logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
        logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return logp
        with torch.no_grad():  # entropy is reported, not trained on: no graph, no saved tensors
            entropy = -(logp_all.exp().mul_(logp_all)).sum(-1)
        return logp, entropy

    return rows


def chunked_token_logprobs(hidden: torch.Tensor, project: Projection | None, labels: torch.Tensor,
                           temperature: float = 1.0, chunk_size: int | None = 1024, with_entropy: bool = False,
                           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(project(hidden) / temperature) at `labels`, and optionally the entropy, per token.

    hidden: [B, T, H] final hidden states, aligned with labels [B, T] (hidden[:, t] predicts
        labels[:, t]). With `project=None`, `hidden` are already logits [B, T, V].
    project: hidden [N, H] -> logits [N, V], everything the model does after its decoder
        (`vocabulary_projection(model)`).
    chunk_size: tokens per chunk, counted over the flattened batch (B x T, after `mask`), so a
        chunk's logits are [chunk_size, V] whatever the batch shape. None: one chunk, no
        checkpointing (the plain full-logits computation).
    mask: optional [B, T]; only positions where it is non-zero are projected at all, the others
        come back as 0 (padding costs no vocabulary work).

    Returns (logprobs [B, T], entropy [B, T] or None), float32 (float64 for float64 inputs). The log-probs carry
    gradients to `hidden` and to the projection's parameters; when a gradient is needed, each
    chunk runs under torch.utils.checkpoint (use_reentrant=False), so its logits and softmax
    are recomputed in backward instead of stored. The entropy is detached (for logging).
    """
    if hidden.dim() != 3:
        raise ValueError(f"chunked_token_logprobs: hidden must be [batch, length, hidden], got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"chunked_token_logprobs: labels must be {tuple(hidden.shape[:2])} (batch, length) like hidden, "
                         f"got {tuple(labels.shape)}")
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"chunked_token_logprobs: mask must be {tuple(labels.shape)} like labels, got {tuple(mask.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunked_token_logprobs: chunk_size must be a positive number of tokens or None, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"chunked_token_logprobs: temperature must be > 0, got {temperature}")
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    where = None
    if mask is not None:
        where = mask.reshape(-1) != 0
        flat_hidden, flat_labels = flat_hidden[where], flat_labels[where]
    rows = _chunk_rows(project, float(temperature), with_entropy)
    total = flat_hidden.shape[0]
    step = total if chunk_size is None else chunk_size
    # Checkpointing only pays when a backward will run; the projection's weights may need a
    # gradient even when the hidden states do not, so grad mode decides.
    recompute = chunk_size is not None and torch.is_grad_enabled()
    logps, entropies = [], []
    for start in range(0, total, max(step, 1)):
        args = (flat_hidden[start:start + step], flat_labels[start:start + step])
        out = checkpoint(rows, *args, use_reentrant=False) if recompute else rows(*args)
        logp, entropy = out if with_entropy else (out, None)
        logps.append(logp)
        entropies.append(entropy)
    if logps:
        logp = torch.cat(logps)
        entropy = torch.cat(entropies) if with_entropy else None
    else:  # nothing to score (all masked, or an empty batch)
        dtype = torch.promote_types(flat_hidden.dtype, torch.float32)
        logp = flat_hidden.new_zeros(0, dtype=dtype) + flat_hidden.sum() * 0  # keeps the graph connected
        entropy = logp.detach() if with_entropy else None
    if where is not None:
        logp = logp.new_zeros(where.shape).masked_scatter(where, logp)
        if entropy is not None:
            entropy = entropy.new_zeros(where.shape).masked_scatter(where, entropy)
    return logp.reshape(shape), (entropy.reshape(shape) if entropy is not None else None)


__all__ = ["Projection", "chunked_token_logprobs", "vocabulary_projection"]
