"""Prompts to token ids, with an explicit policy for prompts that do not fit the context."""

from __future__ import annotations

import logging
from typing import Sequence

from posttrain.chat import tokenize_prompt
from posttrain.rollout.types import OverlongPromptError, Prompt

log = logging.getLogger(__name__)


def prompt_to_ids(tokenizer, prompt: Prompt, where: str) -> list[int]:
    """Text and messages are rendered in the Gemma IT format; token ids pass through unchanged."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise OverlongPromptError(f"{where}: empty prompt; expected text, messages or token ids")
    return tokenize_prompt(tokenizer, prompt, where=where)


def fit_prompts(prompt_ids: list[list[int]], max_model_len: int, max_new_tokens: int, policy: str,
                bos_id: int | None) -> tuple[list[list[int]], int]:
    """Apply `on_overlong_prompt`; returns (prompts, number truncated).

    A prompt must leave room for `max_new_tokens`, so both engines stop completions for the same
    reason (never silently at the end of the context).
    """
    budget = max_model_len - max_new_tokens
    if budget < 1:
        raise OverlongPromptError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_model_len={max_model_len}")
    out, truncated = [], 0
    for i, ids in enumerate(prompt_ids):
        if len(ids) <= budget:
            out.append(ids)
            continue
        if policy == "error":
            raise OverlongPromptError(
                f"prompts[{i}]: {len(ids)} tokens, but max_model_len={max_model_len} - max_new_tokens={max_new_tokens} "
                f"leaves {budget}; shorten it, raise max_model_len, or set on_overlong_prompt: truncate_left")
        # Keep the end (the question and the model-turn header) and the leading <bos>.
        keep_bos = bos_id is not None and ids[0] == bos_id
        head = [ids[0]] if keep_bos else []
        out.append(head + ids[len(ids) - (budget - len(head)):])
        truncated += 1
    if truncated:
        log.warning("truncated %d of %d prompts on the left to %d tokens (on_overlong_prompt=truncate_left)",
                    truncated, len(prompt_ids), budget)
    return out, truncated


def render_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    return [prompt_to_ids(tokenizer, p, f"prompts[{i}]") for i, p in enumerate(prompts)]
