"""Trainer-side log-probabilities of sampled completions, the way policy-gradient losses need them.

`score_completions(model, prompts, completions, ...)` returns per-token logprobs [B, T] of each
completion (right-padded to T), its 0/1 mask and optionally the per-token entropy, all under
log_softmax(logits / temperature) over the full vocabulary, the rollout engines' convention.

Two layouts give the same numbers (tests compare them):

- flat: each row is [left-padded prompt | right-padded completion]. Every completion starts in
  the same column, so the model's `logits_to_keep` projects only completion positions to the
  vocabulary (the prompt's hidden states never reach the LM head).
- shared prompt: RL samples n completions per prompt, and those n rows repeat the same prompt.
  The prompt is run once per group, its key/value cache repeated n times, and the completions
  run on top of it. Gradients flow back through the repeated cache into the prompt positions,
  so the result (values and gradients) equals the flat layout, at (n - 1) / n less prompt work.

Why not rollout.sequence_logprobs: the policy's entropy comes from the same forward pass, the
loss wants padded [B, T] tensors with gradient, and the shared-prompt layout is specific to
groups of samples.
"""

from __future__ import annotations

import torch

from posttrain.losses.policy import token_logprobs_and_entropy


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _right_padded(rows: list[list[int]], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _positions(attention: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids counting only real tokens, so left padding does not shift them (pads: 0)."""
    pos = attention.cumsum(dim=-1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clamp(min=0)


def check_groups(prompt_ids: list[list[int]], group_size: int) -> None:
    """Raise unless the rows are runs of `group_size` identical prompts (the shared-prompt layout)."""
    if len(prompt_ids) % group_size:
        raise ValueError(f"score_completions: {len(prompt_ids)} rows do not split into groups of {group_size}")
    for start in range(0, len(prompt_ids), group_size):
        if any(p != prompt_ids[start] for p in prompt_ids[start + 1:start + group_size]):
            raise ValueError(f"score_completions: rows {start}..{start + group_size - 1} should share one prompt "
                             f"(group_size={group_size}) but differ")


def _completion_logits_flat(model, prompt_ids, completion_ids, pad_id, width: int, device) -> torch.Tensor:
    """Logits [B, width, V] predicting each completion token, from one [prompt | completion] pass."""
    p_ids, p_mask = _left_padded(prompt_ids, pad_id)
    # The last completion token is never an input: nothing is predicted after it.
    c_ids, c_mask = _right_padded([c[:-1] for c in completion_ids], pad_id, width - 1)
    input_ids = torch.cat([p_ids, c_ids], dim=1).to(device)
    attention = torch.cat([p_mask, c_mask], dim=1).to(device)
    # Logits at the prompt's last column and the completion's columns predict completion tokens.
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=_positions(attention),
                logits_to_keep=width, use_cache=False)
    return out.logits


def _completion_logits_shared(model, prompt_ids, completion_ids, pad_id, width: int, n: int, device) -> torch.Tensor:
    """Same as _completion_logits_flat, running each group's prompt once and reusing its KV cache."""
    unique = prompt_ids[::n]
    p_ids, p_mask = _left_padded(unique, pad_id)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    first = model(input_ids=p_ids, attention_mask=p_mask, position_ids=_positions(p_mask), use_cache=True,
                  logits_to_keep=1)
    cache = first.past_key_values
    cache.batch_repeat_interleave(n)  # differentiable: gradients of the n copies add up in the prompt
    last_prompt_logits = first.logits[:, -1:].repeat_interleave(n, dim=0)
    if width == 1:
        return last_prompt_logits
    c_ids, c_mask = _right_padded([c[:-1] for c in completion_ids], pad_id, width - 1)
    c_ids, c_mask = c_ids.to(device), c_mask.to(device)
    prompt_mask = p_mask.repeat_interleave(n, dim=0)
    attention = torch.cat([prompt_mask, c_mask], dim=1)
    lengths = prompt_mask.sum(dim=1)
    positions = _positions(c_mask, offset=lengths)
    rest = model(input_ids=c_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                 use_cache=True)
    return torch.cat([last_prompt_logits, rest.logits], dim=1)


def score_completions(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float,
                      pad_token_id: int, with_entropy: bool = False, group_size: int = 1):
    """Per-token logprobs [B, T] of the completions (right-padded), their mask, and optionally entropy.

    `group_size` n > 1: the rows come in runs of n identical prompts (RL's n samples per prompt);
    each prompt is then run once (see the module docstring). Empty completions score as
    all-masked rows.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"score_completions: {len(prompt_ids)} prompts for {len(completion_ids)} completions")
    if any(not p for p in prompt_ids):
        raise ValueError("score_completions: every prompt needs at least one token (the model's <bos>)")
    device = next(model.parameters()).device
    width = max(1, max(len(c) for c in completion_ids))
    labels, mask = _right_padded(completion_ids, pad_token_id, width)
    if group_size > 1:
        check_groups(prompt_ids, group_size)
        logits = _completion_logits_shared(model, prompt_ids, completion_ids, pad_token_id, width, group_size, device)
    else:
        logits = _completion_logits_flat(model, prompt_ids, completion_ids, pad_token_id, width, device)
    logp, entropy = token_logprobs_and_entropy(logits, labels.to(device), temperature)
    mask = mask.to(device=device, dtype=logp.dtype)
    return logp * mask, mask, (entropy * mask if with_entropy else None)
