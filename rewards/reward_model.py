"""Reward models: score (prompt, completion) with HF sequence-classification checkpoints.

Several checkpoints of one architecture are combined WARM-style: the model used for scoring
has the uniform average of their weights (one model at inference, not an ensemble), or, with
``combine="predictions"``, each is run and their scores are averaged (the ensemble WARM is
compared with). A checkpoint may also be the ``members`` directory written by the
``reward_model`` stage (it holds ``members.json``): it stands for every member listed there.
Scorers are cached per (checkpoints, combination, device, dtype), so a list of checkpoints is
loaded once per process however many batches are scored.

Pairs are rendered in the Gemma IT format, ``<bos>`` added as a token:
``<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{completion}<end_of_turn>\\n``,
a system message prepended to the first user turn (Gemma has no system role). A checkpoint
whose tokenizer lacks the Gemma control tokens (a hub reward model of another family) is scored
in its own chat template instead (``encode_pair``).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from posttrain.chat import (conversation_of, has_gemma_control_tokens, tokenize_conversation,
                            tokenize_with_chat_template)

__all__ = ["RewardModelScorer", "encode_pair", "expand_checkpoints", "get_scorer", "reward_model_reward", "load_count"]

_cache: dict[tuple, "RewardModelScorer"] = {}
_cache_lock = threading.Lock()
_loads = 0


def load_count() -> int:
    """How many checkpoint lists were loaded so far in this process (for tests and logs)."""
    return _loads


MEMBERS_FILE = "members.json"


def expand_checkpoints(checkpoints: Sequence[str] | str) -> list[str]:
    """Checkpoint directories, with a reward_model stage's ``members`` directory replaced by the
    member checkpoints its ``members.json`` lists (in member order)."""
    import json
    from pathlib import Path

    out: list[str] = []
    for c in [checkpoints] if isinstance(checkpoints, str) else list(checkpoints):
        listing = Path(c) / MEMBERS_FILE
        if listing.is_file():
            members = json.loads(listing.read_text()).get("members") or []
            if not members:
                raise ValueError(f"{listing}: lists no member checkpoints")
            out.extend(str(m) for m in members)
        else:
            out.append(str(c))
    return out


def encode_pair(tokenizer, prompt: Any, completion: Any, max_length: int, gemma_format: bool | None = None) -> list[int]:
    """Token ids a reward model scores for (prompt, completion).

    In the Gemma IT format when the tokenizer has its control tokens (the project's one
    tokenisation of it, posttrain.chat), otherwise in the tokenizer's own chat template (a
    third party's reward model of another family scores the format it was trained on). Either
    way control tokens come from the structure only and message text stays text, so a
    completion that writes "<end_of_turn>" or "<|eot_id|>" cannot forge the turns the model
    scores. ``prompt`` None: ``completion`` is the whole conversation. Over-long pairs keep
    their first token (``<bos>``) and their end (the completion, where the score is read).
    Training (the ``reward_model`` stage) and scoring share this function, so they see the
    same ids. ``gemma_format``: which of the two, when the caller has looked it up once for the
    tokenizer (callers encoding many pairs do; None looks it up here).
    """
    messages = conversation_of(prompt, completion)
    if gemma_format is None:
        gemma_format = has_gemma_control_tokens(tokenizer)
    if gemma_format:
        ids = tokenize_conversation(tokenizer, messages).input_ids
    else:
        ids = tokenize_with_chat_template(tokenizer, messages)
    if len(ids) > max_length:
        ids = ids[:1] + ids[len(ids) - max_length + 1:]
    return ids


class RewardModelScorer:
    """Sequence-classification model(s) and their tokenizer: the WARM weight average of
    ``checkpoints`` (``combine="weights"``) or the ensemble of their predictions."""

    def __init__(self, checkpoints: Sequence[str], device: str | None = None, dtype: str = "float32",
                 tokenizer: str | None = None, combine: str = "weights"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.modeling import config_parts
        from posttrain.weights import linear_average

        global _loads
        if combine not in ("weights", "predictions"):
            raise ValueError(f"combine: expected 'weights' (WARM) or 'predictions' (ensemble), got {combine!r}")
        self.checkpoints = expand_checkpoints(checkpoints)
        if not self.checkpoints:
            raise ValueError("reward_model needs at least one checkpoint")
        self.combine = combine
        # The current CUDA device is the rank's own under a data-parallel launch (accelerate sets it).
        self.device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype)
        loaded = [AutoModelForSequenceClassification.from_pretrained(self.checkpoints[0], dtype=torch.float32)]
        arch = type(loaded[0]).__name__
        for path in self.checkpoints[1:]:
            other = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            if type(other).__name__ != arch:
                raise ValueError(f"WARM needs one architecture: {path!r} is {type(other).__name__}, "
                                 f"{self.checkpoints[0]!r} is {arch}")
            loaded.append(other)
        if combine == "weights" and len(loaded) > 1:
            # One model at inference: the uniform average of every tensor, the head included.
            try:
                averaged = linear_average(loaded)
            except ValueError as e:
                raise ValueError(f"WARM needs identical shapes across {self.checkpoints}: {e}") from None
            loaded[0].load_state_dict(averaged)
            loaded = loaded[:1]
        self.models = [m.to(device=self.device, dtype=torch_dtype).eval() for m in loaded]
        self.model = self.models[0]
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.checkpoints[0])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.gemma_format = has_gemma_control_tokens(self.tokenizer)  # looked up once, not per scored pair
        for m in self.models:
            for config in config_parts(m.config):
                if getattr(config, "pad_token_id", None) is None:  # the classifier reads the last non-pad token
                    config.pad_token_id = self.tokenizer.pad_token_id
        # A composite config (Gemma 3 4B and up) keeps the context length in its text part.
        text_config = self.model.config.get_text_config()
        self.max_length = int(getattr(text_config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        _loads += 1

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """Token ids of the pair in the Gemma IT format, starting with the ``<bos>`` token."""
        return encode_pair(self.tokenizer, prompt, completion, self.max_length, self.gemma_format)

    def score(self, prompts: Sequence, completions: Sequence, batch_size: int = 8) -> list[float]:
        import torch

        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_token_id
        out: list[float] = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
        with self._lock, torch.no_grad():
            for lo in range(0, len(order), batch_size):
                idx = order[lo: lo + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # right padding
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, : len(encoded[i])] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                # Ensemble: the mean of the members' scores; WARM: the one averaged model.
                logits = sum(m(input_ids=ids, attention_mask=mask).logits[:, 0].float() for m in self.models)
                logits = logits / len(self.models)
                for r, i in enumerate(idx):
                    out[i] = float(logits[r])
        return out


def get_scorer(checkpoints: Sequence[str] | str, device: str | None = None, dtype: str = "float32",
               tokenizer: str | None = None, combine: str = "weights") -> RewardModelScorer:
    """The cached scorer for these checkpoints (loaded on first use)."""
    key = (tuple([checkpoints] if isinstance(checkpoints, str) else checkpoints), device, dtype, tokenizer, combine)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = RewardModelScorer(list(key[0]), device=device, dtype=dtype, tokenizer=tokenizer,
                                            combine=combine)
        return _cache[key]


# What a recipe may set in the reward's kwargs (dataset columns also arrive as keywords at call
# time, which is why the function itself takes **_ and cannot catch a misspelt option).
RECIPE_KWARGS = {"checkpoints": "one path, a list, or ${stages.NAME.model} / ${stages.NAME.members}",
                 "combine": "weights (WARM) or predictions (ensemble)", "batch_size": "pairs per forward pass",
                 "device": "cuda, cuda:N or cpu", "dtype": "float32, bfloat16 or float16",
                 "tokenizer": "a tokenizer path other than the first checkpoint's"}


def check_recipe_kwargs(kwargs: dict) -> None:
    """Refuse, when the recipe loads, reward_model kwargs that would fail (or be ignored) only once
    RL starts: unknown or misspelt keys, no checkpoints, an unknown combine or dtype."""
    import difflib

    for key in kwargs:
        if key not in RECIPE_KWARGS:
            close = difflib.get_close_matches(key, RECIPE_KWARGS, n=1)
            raise ValueError(f"kwargs.{key}: not an option of the reward_model reward"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; its options: {', '.join(RECIPE_KWARGS)}")
    if not kwargs.get("checkpoints"):
        raise ValueError(f"kwargs.checkpoints: the reward_model reward needs it ({RECIPE_KWARGS['checkpoints']})")
    if kwargs.get("combine", "weights") not in ("weights", "predictions"):
        raise ValueError(f"kwargs.combine: expected weights (WARM) or predictions (ensemble), got {kwargs['combine']!r}")
    if kwargs.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"kwargs.dtype: expected float32, bfloat16 or float16, got {kwargs['dtype']!r}")
    batch_size = kwargs.get("batch_size", 8)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"kwargs.batch_size: expected a whole number >= 1, got {batch_size!r}")


def reward_model_reward(prompts, completions, *, checkpoints: Sequence[str] | str | None = None,
                        batch_size: int = 8, device: str | None = None, dtype: str = "float32",
                        tokenizer: str | None = None, combine: str = "weights", **_: Any) -> list[float | None]:
    """TRL-style reward: the reward model's score of each pair.

    kwargs: ``checkpoints`` (one path, a list of paths of one architecture, or a reward_model
    stage's output: ``${stages.NAME.model}`` for its WARM average, ``${stages.NAME.members}`` for
    its members); ``combine``: ``weights`` (WARM: one averaged model) or ``predictions``
    (the ensemble: the mean of the members' scores).
    """
    if not checkpoints:
        raise ValueError("the reward_model reward needs kwargs: {checkpoints: [path, ...]}")
    scorer = get_scorer(checkpoints, device=device, dtype=dtype, tokenizer=tokenizer, combine=combine)
    return list(scorer.score(prompts, completions, batch_size=batch_size))
