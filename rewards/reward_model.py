"""Reward models: score (prompt, completion) with HF sequence-classification checkpoints.

Several checkpoints of one architecture are combined WARM-style: the model used for scoring
has the uniform average of their weights (one model at inference, not an ensemble), or, with
``combine="predictions"``, each is run and their scores are averaged (the ensemble WARM is
compared with). A checkpoint may also be the ``members`` directory written by the
``reward_model`` stage (it holds ``members.json``): it stands for every member listed there.
Scorers are cached per (checkpoints, combination, device, dtype), so a list of checkpoints is
loaded once per process however many batches are scored.

How a (prompt, completion) pair becomes token ids is handed in, not defined here: this package
stands alone (it imports nothing of posttrain), and a reward model must be scored in the
tokenisation it was trained on. A pair encoder is a function of the tokenizer returning
``encode(prompt, completion, max_length) -> ids``; pass one as ``encode_pair`` or install the
default with ``use_pair_encoder``. posttrain installs its own when its chat module is imported
(``posttrain.chat.pair_encoder``: the Gemma IT format, ``<bos>`` added as a token,
``<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{completion}<end_of_turn>\\n``,
or the checkpoint's own chat template when its tokenizer lacks the Gemma control tokens).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

__all__ = ["PairEncoder", "RewardModelScorer", "expand_checkpoints", "get_scorer", "reward_model_reward", "load_count",
           "use_pair_encoder"]

# tokenizer -> encode(prompt, completion, max_length) -> token ids
PairEncoder = Callable[[Any], Callable[[Any, Any, int], list[int]]]

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


_default_encoder: PairEncoder | None = None


def use_pair_encoder(encoder: PairEncoder) -> None:
    """Make `encoder` the pair encoder of every scorer not given one (see the module docstring)."""
    global _default_encoder
    if not callable(encoder):
        raise TypeError(f"use_pair_encoder: expected a function of the tokenizer, got {type(encoder).__name__}")
    _default_encoder = encoder


def _pair_encoder(encoder: PairEncoder | None) -> PairEncoder:
    if encoder is not None:
        return encoder
    if _default_encoder is None:
        raise ValueError("reward_model: no pair encoder, so (prompt, completion) cannot be tokenised; pass "
                         "encode_pair=tokenizer -> encode(prompt, completion, max_length) -> ids, or install one "
                         "with rewards.reward_model.use_pair_encoder (importing posttrain.chat installs posttrain's)")
    return _default_encoder


def _uniform_average(models: list) -> dict:
    """Every tensor's uniform mean over `models` (accumulated in float32), the head included.
    Written here rather than taken from posttrain.weights: this package stands alone."""
    states = [m.state_dict() for m in models]
    averaged = {}
    for name, first in states[0].items():
        others = [s.get(name) for s in states[1:]]
        if any(t is None or t.shape != first.shape for t in others):
            raise ValueError(f"tensor {name!r} is missing from a checkpoint or has another shape than "
                             f"{tuple(first.shape)}")
        if first.is_floating_point():
            total = sum((t.float() for t in others), first.float())
            averaged[name] = (total / len(states)).to(first.dtype)
        else:
            averaged[name] = first
    return averaged


class RewardModelScorer:
    """Sequence-classification model(s) and their tokenizer: the WARM weight average of
    ``checkpoints`` (``combine="weights"``) or the ensemble of their predictions."""

    def __init__(self, checkpoints: Sequence[str], device: str | None = None, dtype: str = "float32",
                 tokenizer: str | None = None, combine: str = "weights", encode_pair: PairEncoder | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        global _loads
        encoder = _pair_encoder(encode_pair)
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
                averaged = _uniform_average(loaded)
            except ValueError as e:
                raise ValueError(f"WARM needs identical shapes across {self.checkpoints}: {e}") from None
            loaded[0].load_state_dict(averaged)
            loaded = loaded[:1]
        self.models = [m.to(device=self.device, dtype=torch_dtype).eval() for m in loaded]
        self.model = self.models[0]
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.checkpoints[0])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._encode = encoder(self.tokenizer)
        for m in self.models:
            # A composite config (Gemma 3 4B and up) has a text part, where its classifier reads the pad id.
            for config in {id(c): c for c in (m.config, m.config.get_text_config())}.values():
                if getattr(config, "pad_token_id", None) is None:  # the classifier reads the last non-pad token
                    config.pad_token_id = self.tokenizer.pad_token_id
        # A composite config (Gemma 3 4B and up) keeps the context length in its text part.
        text_config = self.model.config.get_text_config()
        self.max_length = int(getattr(text_config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        _loads += 1

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """Token ids of the pair, by the scorer's pair encoder, at most the model's context length."""
        return self._encode(prompt, completion, self.max_length)

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
               tokenizer: str | None = None, combine: str = "weights",
               encode_pair: PairEncoder | None = None) -> RewardModelScorer:
    """The cached scorer for these checkpoints (loaded on first use)."""
    encoder = _pair_encoder(encode_pair)
    key = (tuple([checkpoints] if isinstance(checkpoints, str) else checkpoints), device, dtype, tokenizer, combine,
           encoder)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = RewardModelScorer(list(key[0]), device=device, dtype=dtype, tokenizer=tokenizer,
                                            combine=combine, encode_pair=encoder)
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
    (the ensemble: the mean of the members' scores). Pairs are tokenised by the pair encoder
    installed with ``use_pair_encoder``.
    """
    if not checkpoints:
        raise ValueError("the reward_model reward needs kwargs: {checkpoints: [path, ...]}")
    scorer = get_scorer(checkpoints, device=device, dtype=dtype, tokenizer=tokenizer, combine=combine)
    return list(scorer.score(prompts, completions, batch_size=batch_size))
