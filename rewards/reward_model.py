"""Reward models: score (prompt, completion) with HF sequence-classification checkpoints.

Several checkpoints of one architecture are combined WARM-style: the model used for scoring
has the uniform average of their weights (one model at inference, not an ensemble). Scorers
are cached per (checkpoints, device, dtype), so a list of checkpoints is loaded once per
process however many batches are scored.

Pairs are rendered in the Gemma IT format, ``<bos>`` added as a token:
``<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{completion}<end_of_turn>\\n``
through the tokenizer's chat template when it has one, otherwise directly. A system message is
prepended to the first user turn (Gemma has no system role).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from posttrain.chat import prompt_completion_to_messages, tokenize_conversation

__all__ = ["RewardModelScorer", "get_scorer", "reward_model_reward", "load_count"]

_cache: dict[tuple, "RewardModelScorer"] = {}
_cache_lock = threading.Lock()
_loads = 0


def load_count() -> int:
    """How many checkpoint lists were loaded so far in this process (for tests and logs)."""
    return _loads


class RewardModelScorer:
    """A sequence-classification model (WARM average of ``checkpoints``) and its tokenizer."""

    def __init__(self, checkpoints: Sequence[str], device: str | None = None, dtype: str = "float32",
                 tokenizer: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        global _loads
        if isinstance(checkpoints, str):
            checkpoints = [checkpoints]
        if not checkpoints:
            raise ValueError("reward_model needs at least one checkpoint")
        self.checkpoints = list(checkpoints)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype)
        model = AutoModelForSequenceClassification.from_pretrained(self.checkpoints[0], dtype=torch.float32)
        if len(self.checkpoints) > 1:
            avg = {k: v.detach().clone().float() if v.is_floating_point() else v
                   for k, v in model.state_dict().items()}
            arch = type(model).__name__
            for path in self.checkpoints[1:]:
                other = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
                if type(other).__name__ != arch:
                    raise ValueError(f"WARM needs one architecture: {path!r} is {type(other).__name__}, "
                                     f"{self.checkpoints[0]!r} is {arch}")
                sd = other.state_dict()
                if sd.keys() != avg.keys() or any(sd[k].shape != avg[k].shape for k in avg):
                    raise ValueError(f"WARM needs identical shapes: {path!r} differs from {self.checkpoints[0]!r}")
                for k, v in sd.items():
                    if v.is_floating_point():
                        avg[k] += v.float()
                del other, sd
            n = len(self.checkpoints)
            model.load_state_dict({k: v / n if v.is_floating_point() else v for k, v in avg.items()})
        self.model = model.to(device=self.device, dtype=torch_dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.checkpoints[0])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        _loads += 1

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """Token ids of the pair in the Gemma IT format, starting with the ``<bos>`` token."""
        # The project's one tokenisation of the Gemma format: control tokens as ids, text as text, so
        # a completion that writes "<end_of_turn>" cannot forge the structure the model scores.
        ids = tokenize_conversation(self.tokenizer, prompt_completion_to_messages(prompt, completion)).input_ids
        if len(ids) > self.max_length:  # keep <bos> and the end of the completion
            ids = ids[:1] + ids[len(ids) - self.max_length + 1:]
        return ids

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
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for r, i in enumerate(idx):
                    out[i] = float(logits[r, 0])
        return out


def get_scorer(checkpoints: Sequence[str] | str, device: str | None = None, dtype: str = "float32",
               tokenizer: str | None = None) -> RewardModelScorer:
    """The cached scorer for these checkpoints (loaded on first use)."""
    key = (tuple([checkpoints] if isinstance(checkpoints, str) else checkpoints), device, dtype, tokenizer)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = RewardModelScorer(list(key[0]), device=device, dtype=dtype, tokenizer=tokenizer)
        return _cache[key]


def reward_model_reward(prompts, completions, *, checkpoints: Sequence[str] | str | None = None,
                        batch_size: int = 8, device: str | None = None, dtype: str = "float32",
                        tokenizer: str | None = None, **_: Any) -> list[float | None]:
    """TRL-style reward: the (WARM-averaged) reward model's score of each pair.

    kwargs: ``checkpoints`` (one path or a list of paths of one architecture).
    """
    if not checkpoints:
        raise ValueError("the reward_model reward needs kwargs: {checkpoints: [path, ...]}")
    scorer = get_scorer(checkpoints, device=device, dtype=dtype, tokenizer=tokenizer)
    return list(scorer.score(prompts, completions, batch_size=batch_size))
