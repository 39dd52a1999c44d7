"""Server mode (GPU nodes): vLLM runs as a separate server on its own GPUs.

The trainer talks to it over HTTP for generation and pushes weights with vLLM's weight-transfer
API over NCCL (the trainer is rank 0 of a transfer group with the server's workers). The server
must be started with the settings this engine relies on:

    vllm serve <model_dir> --tensor-parallel-size <tp> --logprobs-mode processed_logprobs \
        --weight-transfer-config '{"backend": "nccl"}'

and `rollout.server_url` pointing at it. This mode needs CUDA and cannot run on a CPU machine;
it is refused there at creation.

Under a multi-process launch (a sharded trainer) every rank has one of these engines and sends
its own prompts over HTTP; for a weight update every rank walks the same `WeightStream` (its
gathers are collectives) and rank 0 alone broadcasts the tensors to the server, packed in
buffers of `rollout.sync_bucket_mb`, declared to vLLM beforehand from the plan's unsharded shapes.
The other ranks wait at a barrier until the server holds the new weights.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import torch

from posttrain.images import refuse_image_prompts
from posttrain.modeling import load_tokenizer, stop_token_ids
from posttrain.rollout.parallel import current_launch, request_seed_offset
from posttrain.rollout.prompts import fit_prompts, render_prompts
from posttrain.rollout.transformers_engine import decode_completion
from posttrain.rollout.types import Completion, Prompt, RolloutConfig, RolloutEngine, RolloutError, SamplingParams
from posttrain.rollout.vllm_engine import _has_cuda, check_gpu_options


class _PushedWeights:
    """The tensors of one update as a vLLM `WeightSource` (metadata first, then the same order)."""

    def __init__(self, weights: list[tuple[str, torch.Tensor]]):
        self.weights = weights

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.weights]

    def __iter__(self):
        return iter(self.weights)


class _StreamedWeights(_PushedWeights):
    """A `WeightStream` as a vLLM `WeightSource`: metadata from the plan (nothing gathered), and
    the tensors gathered a bucket at a time while they are broadcast."""

    def __init__(self, stream):
        self.stream = stream

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(p.name, p.dtype, p.shape) for p in self.stream.plan]

    def __iter__(self):
        return ((name, t.detach().cuda().contiguous()) for name, t in self.stream)


class VLLMServerEngine(RolloutEngine):
    backend = "vllm-server"

    def __init__(self, model_path: str, config: RolloutConfig):
        check_gpu_options(config, _has_cuda())
        import requests

        self.config = config
        self.url = config.server_url.rstrip("/")
        self.tokenizer = load_tokenizer(model_path)
        self.session = requests.Session()
        models = self.session.get(f"{self.url}/v1/models", timeout=30).json()["data"]
        self.model_name = models[0]["id"]
        self.max_model_len = config.max_model_len or int(models[0].get("max_model_len") or 0)
        self.weight_version = 0
        self.truncated_prompts = 0
        self._transfer = None
        self.launch = current_launch()
        self._seed_offset = request_seed_offset(self.launch, 1)

    def generate(self, prompts: Sequence[Prompt], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        refuse_image_prompts(prompts, "vLLM server")
        prompt_ids = render_prompts(self.tokenizer, prompts)
        prompt_ids, truncated = fit_prompts(prompt_ids, self.max_model_len, sampling.max_new_tokens,
                                            self.config.on_overlong_prompt, self.tokenizer.bos_token_id)
        self.truncated_prompts += truncated
        stops = stop_token_ids(self.tokenizer) if sampling.stop_at_end_of_turn else [self.tokenizer.eos_token_id]

        def one(i_ids):
            i, ids = i_ids
            body = dict(model=self.model_name, prompt=ids, n=n, temperature=sampling.temperature,
                        top_p=sampling.top_p, top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                        seed=None if sampling.seed is None else sampling.seed + self._seed_offset + i * n,
                        stop_token_ids=stops, logprobs=0 if sampling.logprobs else None, return_token_ids=True, skip_special_tokens=False)
            response = self.session.post(f"{self.url}/v1/completions", json=body, timeout=600)
            response.raise_for_status()
            group = []
            for choice in sorted(response.json()["choices"], key=lambda c: c["index"]):
                ids_out = list(choice["token_ids"])
                reason = "stop" if ids_out and ids_out[-1] in stops else "length"
                group.append(Completion(ids_out, decode_completion(self.tokenizer, ids_out, reason == "stop"),
                                        list(choice["logprobs"]["token_logprobs"]) if sampling.logprobs else [],
                                        reason))
            return group

        with ThreadPoolExecutor(max_workers=16) as pool:  # the server batches concurrent requests
            return list(pool.map(one, enumerate(prompt_ids)))

    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        from posttrain.rollout.sync import WeightStream

        if isinstance(named_tensors, WeightStream):
            source = _StreamedWeights(named_tensors)
        else:
            source = _PushedWeights([(name, t.detach().cuda().contiguous()) for name, t in named_tensors])
        if self._transfer is None:
            init = NCCLTrainerInitInfo(master_address=socket.gethostbyname(socket.gethostname()),
                                       master_port=self.config.server_nccl_port,
                                       world_size=1 + self.config.tensor_parallel_size, rank=self.launch.rank,
                                       packed_buffer_size_bytes=int(self.config.sync_bucket_mb * 2**20))
            self._transfer = NCCLTrainerWeightTransferEngine.trainer_init(
                init, client=HTTPVLLMWeightSyncClient(self.url), source=source)
        self._transfer.source = source
        try:
            self._transfer.send_weights()  # rank 0 sends; the other ranks only take part in the gathers
        except Exception as e:
            raise RolloutError(f"update_weights: NCCL transfer to {self.url} failed: {e}") from e
        if self.launch.rank == 0:
            self.session.post(f"{self.url}/reset_prefix_cache", timeout=60)
        if self.launch.multi_process:
            import torch.distributed as dist

            dist.barrier()  # no rank samples before the server holds the new weights
        self.weight_version += 1

    def close(self) -> None:
        if self._transfer is not None:
            self._transfer.shutdown()
            self._transfer = None
