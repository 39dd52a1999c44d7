"""Logprob drift between the rollout engine and the trainer: how stale weights are caught.

If the engine sampled with the weights the trainer holds, the engine's logprob of every sampled
token equals the trainer's recomputed one up to numerical noise (~1e-5 in float32 on CPU,
~1e-2 in bfloat16). A skipped or partial `update_weights` shows up as a drift orders of
magnitude larger, on every batch.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch

log = logging.getLogger(__name__)


class RolloutDriftError(RuntimeError):
    """Engine and trainer disagree on the sampled tokens' logprobs beyond the stop threshold."""


class RolloutDriftWarning(UserWarning):
    """Engine and trainer disagree on the sampled tokens' logprobs beyond the warn threshold."""


def _flatten(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().float().reshape(-1).cpu()
    parts = [v.detach().float().reshape(-1).cpu() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float32)
             for v in values]
    return torch.cat(parts) if parts else torch.zeros(0)


def logprob_drift(engine_logprobs: Sequence | torch.Tensor, trainer_logprobs: Sequence | torch.Tensor,
                  mask: Sequence | torch.Tensor | None = None) -> dict[str, float]:
    """Mean and max |engine - trainer| over the sampled tokens.

    Accepts per-sequence lists (ragged) or padded tensors; with padded tensors pass `mask`
    (1 where a token was sampled).
    """
    engine = _flatten(engine_logprobs)
    trainer = _flatten(trainer_logprobs)
    if engine.shape != trainer.shape:
        raise ValueError(f"logprob_drift: {engine.numel()} engine logprobs but {trainer.numel()} trainer logprobs; "
                         "both must cover the same sampled tokens")
    diff = (engine - trainer).abs()
    if mask is not None:
        keep = _flatten(mask).bool()
        if keep.shape != diff.shape:
            raise ValueError(f"logprob_drift: mask has {keep.numel()} entries for {diff.numel()} logprobs")
        diff = diff[keep]
    if diff.numel() == 0:
        return {"drift_mean_abs": 0.0, "drift_max_abs": 0.0}
    return {"drift_mean_abs": float(diff.mean()), "drift_max_abs": float(diff.max())}


class DriftMonitor:
    """Checks every trained batch: warns above `warn`, raises RolloutDriftError above `stop`."""

    def __init__(self, warn: float = 0.05, stop: float | None = None):
        self.warn = warn
        self.stop = stop
        self.warnings = 0

    @classmethod
    def from_config(cls, config) -> "DriftMonitor":
        return cls(config.drift_warn_threshold, config.drift_stop_threshold)

    def check(self, engine_logprobs, trainer_logprobs, mask=None, step: int | None = None) -> dict[str, float]:
        """The drift metrics (log them); warns or raises according to the thresholds."""
        metrics = logprob_drift(engine_logprobs, trainer_logprobs, mask)
        mean = metrics["drift_mean_abs"]
        where = f" at step {step}" if step is not None else ""
        if self.stop is not None and mean > self.stop:
            raise RolloutDriftError(
                f"rollout logprob drift{where}: mean |engine - trainer| = {mean:.4g} (max {metrics['drift_max_abs']:.4g}) "
                f"exceeds drift_stop_threshold={self.stop}; the engine is most likely sampling with stale weights "
                "(a missed update_weights) or a different temperature")
        if mean > self.warn:
            self.warnings += 1
            warnings.warn(RolloutDriftWarning(
                f"rollout logprob drift{where}: mean |engine - trainer| = {mean:.4g} (max {metrics['drift_max_abs']:.4g}) "
                f"exceeds drift_warn_threshold={self.warn}; check that update_weights runs after every optimizer step"))
        return metrics
