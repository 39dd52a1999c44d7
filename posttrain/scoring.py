"""Log-probabilities of sampled completions under a model: the project's one scoring path.

Convention (every rollout engine's `Completion.logprobs` follows it, and the trainer recomputes
it here for the drift check, RL's losses and evaluation):

    logprob(y_t) = log_softmax(logits_t / T)[y_t]    over the full vocabulary,

with T the sampling temperature, before any top-k/top-p truncation, and T = 1 for greedy
decoding (temperature 0). This is the quantity a policy gradient differentiates.

vLLM exception: vLLM can report logprobs either before temperature ("raw") or after
temperature *and* top-k/top-p truncation ("processed"). The vLLM engine uses processed
logprobs, which equal the convention whenever top_k = 0 and top_p = 1 (the RL default); with
truncation active its logprobs are those of the truncated, renormalised distribution (the
distribution actually sampled from) and the engine warns once.

`score_completions(model, prompts, completions, ...)` returns per-token logprobs [B, T] of each
completion (right-padded to T), its 0/1 mask and optionally the per-token entropy, the form a
loss wants; `sequence_logprobs` gives the same numbers as one 1-D tensor per completion, in
batches, the form an engine or a drift check wants.

Two layouts give the same numbers (tests compare them):

- flat: each row is [left-padded prompt | right-padded completion]. Every completion starts in
  the same column, so only completion positions are projected to the vocabulary (the prompt's
  hidden states never reach the LM head).
- shared prompt: RL samples n completions per prompt, and those n rows repeat the same prompt.
  The prompt is run once per group, its key/value cache repeated n times, and the completions
  run on top of it. Gradients flow back through the repeated cache into the prompt positions,
  so the result (values and gradients) equals the flat layout, at (n - 1) / n less prompt work.

Image prompts (`posttrain.images.ImagePrompt`, a composite model's prompts with image parts) run
with their pixel values and token type ids through the composite model (the vision tower, the
projector and the language model), so the log-probabilities condition on the images: in the flat
layout every row carries its prompt's images, in the shared one the prompt pass does. Text prompts
run exactly as before.

Vocabulary memory: by default the decoder's hidden states of the completion positions go to
`posttrain.losses.token_logprobs.chunked_token_logprobs`, which projects `chunk_size` tokens at
a time and recomputes them in backward; no [B, T, V] tensor exists (Gemma 3: V = 262,144).
"""

from __future__ import annotations

from typing import Sequence

import torch

from posttrain.images import ImagePrompt, image_forward_inputs, vision_dtype
from posttrain.losses.token_logprobs import chunked_token_logprobs, vocabulary_projection
from posttrain.modeling import image_text_model
from posttrain.sharding import in_root_forward, is_sharded


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


def _flat_inputs(prompt_ids, completion_ids, pad_id, width: int, device, pixel_dtype=None) -> dict[str, torch.Tensor]:
    """One [left-padded prompt | right-padded completion] row per sample (with the prompts' images
    when they have some; `pixel_dtype`: the vision tower's)."""
    p_ids, p_mask = _left_padded(prompt_ids, pad_id)
    # The last completion token is never an input: nothing is predicted after it.
    c_ids, c_mask = _right_padded([c[:-1] for c in completion_ids], pad_id, width - 1)
    input_ids = torch.cat([p_ids, c_ids], dim=1).to(device)
    attention = torch.cat([p_mask, c_mask], dim=1).to(device)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": _positions(attention),
            **image_forward_inputs(prompt_ids, input_ids, pixel_dtype)}


def _completion_logits_flat(model, prompt_ids, completion_ids, pad_id, width: int, device,
                            pixel_dtype=None) -> torch.Tensor:
    """Logits [B, width, V] predicting each completion token, from one [prompt | completion] pass."""
    # Logits at the prompt's last column and the completion's columns predict completion tokens.
    out = model(**_flat_inputs(prompt_ids, completion_ids, pad_id, width, device, pixel_dtype), logits_to_keep=width,
                use_cache=False)
    return out.logits


def _completion_hidden_flat(decoder, prompt_ids, completion_ids, pad_id, width: int, device,
                            pixel_dtype=None) -> torch.Tensor:
    """Final hidden states [B, width, H] at the positions whose logits predict the completion tokens."""
    out = decoder(**_flat_inputs(prompt_ids, completion_ids, pad_id, width, device, pixel_dtype), use_cache=False)
    return out.last_hidden_state[:, -width:]


def _shared_passes(run, prompt_ids, completion_ids, pad_id, width: int, n: int, device, pixel_dtype=None):
    """The shared-prompt layout for any `run(**inputs) -> (outputs, last-position tensor [B, L, X])`.

    Returns the tensor [B, width, X] (logits or hidden states) at the positions predicting each
    completion token: each group's prompt runs once (with its images), its KV cache repeated n
    times; the completions, which hold no image, attend to it causally.
    """
    unique = prompt_ids[::n]
    p_ids, p_mask = _left_padded(unique, pad_id)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    first, first_values = run(input_ids=p_ids, attention_mask=p_mask, position_ids=_positions(p_mask), use_cache=True,
                              **image_forward_inputs(unique, p_ids, pixel_dtype))
    cache = first.past_key_values
    cache.batch_repeat_interleave(n)  # differentiable: gradients of the n copies add up in the prompt
    last_prompt = first_values[:, -1:].repeat_interleave(n, dim=0)
    if width == 1:
        return last_prompt
    c_ids, c_mask = _right_padded([c[:-1] for c in completion_ids], pad_id, width - 1)
    c_ids, c_mask = c_ids.to(device), c_mask.to(device)
    prompt_mask = p_mask.repeat_interleave(n, dim=0)
    attention = torch.cat([prompt_mask, c_mask], dim=1)
    lengths = prompt_mask.sum(dim=1)
    positions = _positions(c_mask, offset=lengths)
    _, rest = run(input_ids=c_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    return torch.cat([last_prompt, rest], dim=1)


def _completion_logits_shared(model, prompt_ids, completion_ids, pad_id, width: int, n: int, device,
                              pixel_dtype=None) -> torch.Tensor:
    """Same as _completion_logits_flat, running each group's prompt once and reusing its KV cache."""
    def run(**inputs):
        # The prompt pass needs only its last position's logits.
        keep = {"logits_to_keep": 1} if "past_key_values" not in inputs else {}
        out = model(**inputs, **keep)
        return out, out.logits

    return _shared_passes(run, prompt_ids, completion_ids, pad_id, width, n, device, pixel_dtype)


def _completion_hidden_shared(decoder, prompt_ids, completion_ids, pad_id, width: int, n: int, device,
                              pixel_dtype=None) -> torch.Tensor:
    """Same as _completion_hidden_flat, running each group's prompt once and reusing its KV cache."""
    def run(**inputs):
        out = decoder(**inputs)
        return out, out.last_hidden_state

    return _shared_passes(run, prompt_ids, completion_ids, pad_id, width, n, device, pixel_dtype)


def score_completions(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float,
                      pad_token_id: int, with_entropy: bool = False, group_size: int = 1,
                      chunk_size: int | None = 1024):
    """Per-token logprobs [B, T] of the completions (right-padded), their mask, and optionally entropy.

    `group_size` n > 1: the rows come in runs of n identical prompts (RL's n samples per prompt);
    each prompt is then run once (see the module docstring). Empty completions score as
    all-masked rows.

    `chunk_size`: completion tokens (over the whole batch, padding excluded) projected to the
    vocabulary at a time. The decoder (`model.get_decoder()`, reached through peft wrappers too)
    gives the final hidden states and `chunked_token_logprobs` projects them chunk by chunk,
    recomputing each chunk in backward, so memory grows with chunk_size x vocab, not with
    batch x length x vocab. None: the model's own forward returns the completion positions'
    full logits [B, T, V] (the same numbers; kept as the reference and for models without
    get_decoder()). Image prompts (ImagePrompt) run through the composite model with their images.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"score_completions: {len(prompt_ids)} prompts for {len(completion_ids)} completions")
    if any(not p for p in prompt_ids):
        raise ValueError("score_completions: every prompt needs at least one token (the model's <bos>)")
    # Under fsdp the decoder and the output projection below read the root unit's parameters
    # (embeddings, output layer), which FSDP gathers only inside a forward of the root.
    return in_root_forward(model, _score, model, prompt_ids, completion_ids, temperature, pad_token_id,
                           with_entropy, group_size, chunk_size, release=True)


def _score(model, prompt_ids, completion_ids, temperature, pad_token_id, with_entropy, group_size, chunk_size):
    """score_completions' work, on a model whose parameters are whole for it."""
    device = next(model.parameters()).device
    width = max(1, max(len(c) for c in completion_ids))
    if group_size > 1 and is_sharded(model):
        # The shared layout runs the model once when every completion has at most one token, else
        # twice; a sharded model must run as often on every rank, so it always runs twice (the
        # extra column is padding, masked out).
        width = max(width, 2)
    labels, mask = _right_padded(completion_ids, pad_token_id, width)
    labels, mask = labels.to(device), mask.to(device)
    if group_size > 1:
        check_groups(prompt_ids, group_size)
    images = any(isinstance(p, ImagePrompt) and p.image_parts for p in prompt_ids)
    pixel_dtype = vision_dtype(model) if images else None
    if chunk_size is None:
        if group_size > 1:
            logits = _completion_logits_shared(model, prompt_ids, completion_ids, pad_token_id, width, group_size,
                                               device, pixel_dtype)
        else:
            logits = _completion_logits_flat(model, prompt_ids, completion_ids, pad_token_id, width, device,
                                             pixel_dtype)
        logp, entropy = chunked_token_logprobs(logits, None, labels, temperature, None, with_entropy=with_entropy)
    else:
        # The decoder of a text batch is the language model; images need the part that reads them.
        decoder = image_text_model(model) if images else model.get_decoder()
        if group_size > 1:
            hidden = _completion_hidden_shared(decoder, prompt_ids, completion_ids, pad_token_id, width, group_size,
                                               device, pixel_dtype)
        else:
            hidden = _completion_hidden_flat(decoder, prompt_ids, completion_ids, pad_token_id, width, device,
                                             pixel_dtype)
        logp, entropy = chunked_token_logprobs(hidden, vocabulary_projection(model), labels, temperature, chunk_size,
                                               with_entropy=with_entropy, mask=mask)
    mask = mask.to(dtype=logp.dtype)
    return logp * mask, mask, (entropy * mask if with_entropy else None)


def sequence_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      temperature: float = 1.0, requires_grad: bool = False, batch_size: int | None = None,
                      pad_token_id: int = 0, chunk_size: int | None = 1024) -> list[torch.Tensor]:
    """Per-token logprobs of each completion given its prompt, one 1-D float32 tensor per pair:
    `score_completions`' rows without their padding, `batch_size` pairs at a time (None: all at
    once). `temperature` 0 means greedy and is scored at T = 1."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"sequence_logprobs: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if temperature < 0:
        raise ValueError(f"sequence_logprobs: temperature must be >= 0, got {temperature}")
    t = 1.0 if temperature == 0 else float(temperature)
    batch_size = batch_size or len(prompt_ids) or 1
    out: list[torch.Tensor] = []
    with torch.set_grad_enabled(requires_grad):
        for start in range(0, len(prompt_ids), batch_size):
            prompts = [p if isinstance(p, ImagePrompt) else list(p) for p in prompt_ids[start:start + batch_size]]
            completions = [list(c) for c in completion_ids[start:start + batch_size]]
            logp, _, _ = score_completions(model, prompts, completions, t, pad_token_id, chunk_size=chunk_size)
            out += [logp[i, :len(c)].float() for i, c in enumerate(completions)]
    return out
