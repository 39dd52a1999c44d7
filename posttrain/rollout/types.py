"""The rollout interface: sampling parameters, completions, engine configuration, engine protocol.

Logprob convention (shared by every engine and by `posttrain.scoring`): the logprob of a sampled
token is `log_softmax(logits / T)[token]` over the full vocabulary, with T the sampling
temperature, taken before top-k/top-p truncation. Greedy decoding (T = 0) reports logprobs at
T = 1, i.e. `log_softmax(logits)`. See `posttrain.scoring` for the one exception
(vLLM with top-k/top-p active).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

Prompt = str | list[dict] | list[int]


class RolloutError(RuntimeError):
    """A rollout engine could not do what was asked (bad prompt, unsupported mode, out of sync)."""


class OverlongPromptError(RolloutError, ValueError):
    """A prompt does not fit in the context together with `max_new_tokens`."""


class SamplingParams(BaseModel):
    """How to sample one batch of completions."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 turns it off.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 turns it off.")
    max_new_tokens: int = Field(128, ge=1, description="Upper bound on generated tokens per completion (stop token included).")
    seed: int | None = Field(None, description="Seed that makes sampling reproducible; None draws fresh randomness.")
    stop_at_end_of_turn: bool = Field(
        True, description="Stop at <end_of_turn> (instruction-tuned models); <eos> always stops.")
    logprobs: bool = Field(
        True, description="Return each sampled token's logprob (Completion.logprobs; empty when off). vLLM builds "
        "them token by token in Python, about 17% of a tiny model's generation time on the CPU.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The T of `log_softmax(logits / T)`: the sampling temperature, or 1 when greedy."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    `token_ids` and `logprobs` include the stop token when `finish_reason == "stop"` (so that it
    is trained on); `text` excludes it.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class RolloutConfig(BaseModel):
    """Where and how completions are generated (engine-level settings, fixed for a run)."""

    model_config = ConfigDict(extra="forbid")

    # Options added after run directories were made: left out of a stage's config hash while at
    # their default (see StageConfig._HASHED_ONLY_WHEN_SET, which applies these to every stage
    # option holding a RolloutConfig).
    HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {"sync_bucket_mb": 1024, "lora_sync": "merged",
                                                        "max_lora_rank": 64}

    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Generation engine: vllm when installed (auto), or transformers generate.")
    max_model_len: int | None = Field(
        None, ge=8, description="Context length (prompt + completion); default: the model's max_position_embeddings.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype inside the engine.")
    enforce_eager: bool | None = Field(
        None, description="vLLM: run the model eagerly instead of compiling it (torch.compile, plus CUDA graphs on "
        "GPUs). None: compile on GPUs; on the CPU stay eager, because compiling adds 10-20 s to start-up and pays "
        "back only on long runs (a tiny model decodes about 1.4x faster compiled).")
    kv_cache_gib: float = Field(
        1.0, gt=0, description="KV cache size in GiB for vLLM (bounds its memory; on CPU this is VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="GPU only: fraction of GPU memory vLLM may take (overrides kv_cache_gib).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPU only: shard the vLLM engine over this many GPUs.")
    enable_sleep_mode: bool = Field(
        False, description="GPU only: free vLLM's weights and KV cache between rollouts (engine.sleep()/wake_up()).")
    mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: vLLM in the trainer's process; server: a separate vLLM server on its own GPUs, "
        "weights pushed over NCCL.")
    server_url: str | None = Field(None, description="server mode: base URL of the vLLM server (e.g. http://host:8000).")
    server_nccl_port: int = Field(51216, description="server mode: TCP port of the NCCL weight-transfer rendezvous.")
    on_overlong_prompt: Literal["error", "truncate_left"] = Field(
        "error", description="A prompt longer than max_model_len - max_new_tokens: raise, or keep <bos> and its last tokens.")
    max_batch_size: int = Field(
        64, ge=1, description="transformers backend: sequences per generate() call (prompts x n).")
    sync_bucket_mb: float = Field(
        1024, gt=0, description="Weight sync: whole tensors are assembled (under sharding: gathered from every rank) "
        "and pushed into the engine this many MiB at a time, never splitting a decoder layer, so a sync adds one "
        "bucket to the trainer's memory (or one tensor larger than a bucket, such as Gemma 3's 262,144-row "
        "embedding). The default fits a decoder layer of Gemma 3 27B in bf16 (about 0.8 GB).")
    lora_sync: Literal["merged", "adapter"] = Field(
        "merged", description="With a LoRA policy: merged pushes the whole model with the adapter folded in "
        "(every engine); adapter keeps the base weights in the vLLM engine (started with LoRA enabled) and sends "
        "only the adapter after each step, a few MB instead of the model. adapter needs backend vllm (colocated) "
        "and a text-only checkpoint.")
    max_lora_rank: int = Field(
        64, ge=1, description="lora_sync adapter: the largest LoRA rank the vLLM engine accepts (vLLM allows 1, 8, "
        "16, 32, 64, 128, 256, 320, 512); at least the policy's `lora.r`.")
    verify_sync: bool = Field(
        True, description="After update_weights, check the engine really holds the new weights (one short greedy probe).")
    drift_warn_threshold: float = Field(
        0.05, ge=0, description="Warn when the mean |engine logprob - trainer logprob| of a batch exceeds this.")
    drift_check_every: int = Field(
        10, ge=1, description="rl stage: compare engine and trainer logprobs (drift metrics and thresholds) on every "
        "this many batches; the batches in between are sampled without logprobs, which is cheaper (distill compares "
        "on its logging steps). A stale-weights bug "
        "shows on every batch, so checking every 10th still catches it. Importance weighting needs logprobs on "
        "every batch and gets them regardless.")
    drift_stop_threshold: float | None = Field(
        None, ge=0, description="Raise RolloutDriftError when the mean drift exceeds this (None: never stop).")

    @model_validator(mode="after")
    def _check_modes(self):
        if self.mode == "server" and not self.server_url:
            raise ValueError("rollout.server_url: server mode needs the vLLM server's URL (e.g. http://rollout-node:8000)")
        if self.lora_sync == "adapter" and (self.backend == "transformers" or self.mode == "server"):
            raise ValueError("rollout.lora_sync: adapter applies the LoRA adapter inside a colocated vLLM engine; "
                             "set backend: vllm and mode: colocate, or lora_sync: merged")
        if self.mode == "server" and self.backend == "transformers":
            raise ValueError("rollout.mode: server mode runs vLLM; it cannot use backend 'transformers'")
        if self.drift_stop_threshold is not None and self.drift_stop_threshold < self.drift_warn_threshold:
            raise ValueError("rollout.drift_stop_threshold: must be at least drift_warn_threshold "
                             f"({self.drift_stop_threshold} < {self.drift_warn_threshold})")
        return self


class RolloutEngine(ABC):
    """Generates completions from the current policy weights.

    `weight_version` counts `update_weights` calls, so callers can record which weights produced
    a batch.
    """

    tokenizer = None
    backend: str = ""
    weight_version: int = 0
    # lora_sync adapter: whether the engine holds the LoRA policy's base weights (False after other
    # weights were pushed), so that sending the adapter alone is enough.
    holds_adapter_base: bool = True

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Completion]]:
        """`n` completions per prompt. A prompt is text (one user turn), messages, or token ids."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Make the next `generate` use these weights (names as in the HF checkpoint).

        `named_tensors` may be a lazy stream (`posttrain.rollout.sync.WeightStream`, which gathers a
        sharded model a bucket at a time): consume it once, in order, keep no tensor after loading
        it, and count the whole update as one `weight_version`."""

    def update_adapter(self, tensors: dict, peft_config) -> None:
        """Apply this LoRA adapter (peft's tensor names and config) on top of the engine's base weights
        from the next `generate` on (`rollout.lora_sync: adapter`)."""
        raise RolloutError(f"rollout.lora_sync: adapter needs the colocated vLLM engine, and this engine is "
                           f"{self.backend!r}; set rollout.backend: vllm, or lora_sync: merged")

    def _generation_request(self, n: int, sampling: SamplingParams | None) -> SamplingParams:
        """What every `generate` checks first: at least one completion per prompt, an engine that is
        awake; returns the sampling settings (the defaults when None)."""
        if n < 1:
            raise ValueError(f"n: expected at least 1 completion per prompt, got {n}")
        if self.sleeping:
            raise RolloutError("generate: the engine is asleep; call wake_up() (or update_weights) first")
        return sampling or SamplingParams()

    @property
    def can_sleep(self) -> bool:
        """Whether `sleep()` really releases memory (otherwise sleep and wake_up do nothing)."""
        return False

    @property
    def sleeping(self) -> bool:
        return getattr(self, "_sleeping", False)

    def sleep(self, level: int = 1) -> None:
        """Release the engine's accelerator memory while the trainer runs backward and the optimizer.

        The stage's cycle is: generate -> sleep() -> backward/optimizer -> wake_up() ->
        update_weights(new weights). While asleep, `generate` raises RolloutError. Level 1 moves
        the weights to CPU memory and restores them on wake_up; level 2 discards them, which is
        only safe because the trainer pushes the new weights right after waking the engine.
        Engines holding no memory worth freeing (`can_sleep` False: CPU engines, vLLM without
        `rollout.enable_sleep_mode`) do nothing.
        """
        if level not in (1, 2):
            raise ValueError(f"sleep: level must be 1 (offload weights to CPU) or 2 (discard them), got {level}")

    def wake_up(self) -> None:
        """Take back the memory released by `sleep()` (no-op when awake or when `can_sleep` is False).

        `update_weights` on a sleeping engine wakes it first, so `wake_up()` may be skipped when
        new weights are pushed anyway.
        """

    def close(self) -> None:
        """Release the engine's memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
