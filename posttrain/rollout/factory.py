"""`create_engine`: pick and build the engine a RolloutConfig asks for."""

from __future__ import annotations

import importlib.util

from posttrain.rollout.types import RolloutConfig, RolloutEngine, RolloutError


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def create_engine(model_path: str, config: RolloutConfig | None = None) -> RolloutEngine:
    """An engine holding the checkpoint at `model_path` (a directory with config and tokenizer)."""
    config = config or RolloutConfig()
    backend = config.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    if backend == "transformers":
        from posttrain.rollout.transformers_engine import TransformersEngine

        return TransformersEngine(str(model_path), config)
    if not vllm_available():
        raise RolloutError("rollout.backend: 'vllm' was asked for but vllm is not installed; "
                           "install the cpu or gpu extra, or set backend: transformers")
    if config.mode == "server":
        from posttrain.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine(str(model_path), config)
    from posttrain.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(str(model_path), config)
