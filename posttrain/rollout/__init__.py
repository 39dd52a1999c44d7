"""Rollout engines: sample completions from the policy being trained, with its latest weights.

    engine = create_engine(model_dir, RolloutConfig(backend="auto"))
    groups = engine.generate(prompts, n=8, sampling=SamplingParams(temperature=1.0, max_new_tokens=128))
    ... train ...
    sync_weights(engine, model)          # after each optimizer step: a bucket of whole tensors at a time

`Completion.logprobs` follow the convention in `posttrain.scoring` and are recomputed on the
trainer side there; `DriftMonitor` compares the two on every trained batch.
"""

from posttrain.rollout.drift import DriftMonitor, RolloutDriftError, RolloutDriftWarning, logprob_drift
from posttrain.rollout.factory import create_engine, vllm_available
from posttrain.rollout.types import (
    Completion,
    OverlongPromptError,
    RolloutConfig,
    RolloutEngine,
    RolloutError,
    SamplingParams,
)
from posttrain.rollout.sync import SyncStats, WeightStream, sync_weights
from posttrain.rollout.weights import weights_for_engine

__all__ = [
    "Completion", "DriftMonitor", "OverlongPromptError", "RolloutConfig", "RolloutDriftError", "RolloutDriftWarning",
    "RolloutEngine", "RolloutError", "SamplingParams", "SyncStats", "WeightStream", "create_engine", "logprob_drift",
    "sync_weights", "vllm_available", "weights_for_engine",
]
