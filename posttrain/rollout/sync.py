"""Weight sync from the trainer to its rollout engine, one bucket of full tensors at a time.

An engine needs whole tensors named as in the Hugging Face checkpoint. Under FSDP2
(`torch.distributed.fsdp.fully_shard`) every rank holds a shard of each parameter (a DTensor);
gathering the whole model before pushing it would need a second full copy of the weights on
every rank, which is what sharding was meant to avoid. So the sync is planned from the
parameters' unsharded shapes (a DTensor's `.shape` is the global one: sizing buckets from the
local shard's numel would undercount them by the world size), cut into buckets of
`rollout.sync_bucket_mb` that never split a decoder layer, and each bucket is gathered
(`DTensor.full_tensor()`, a collective: every rank walks the same plan in the same order) and
pushed into the engine before the next one is gathered. Peak extra memory is one bucket, or a
single tensor larger than a bucket; vLLM's loader may still hold the last tensor of the previous
bucket while the next is gathered (its loop variable), so with vLLM add at most one tensor.

What is gathered (names, shapes, LoRA merged in) is `posttrain.rollout.weights`' plan; plain
tensors (no sharding) take the same path.

Engines receive a `WeightStream`: an iterable of (name, full tensor) pairs that gathers lazily
and that knows every name, shape and dtype before anything is gathered (the server engine
declares them to vLLM first). An engine's `update_weights` must consume it once, in order,
without holding on to a tensor after it has loaded it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from posttrain.rollout.parallel import layer_of
from posttrain.rollout.weights import PlannedTensor, adapter_tensors, engine_tensor_plan, peft_model_of

# rollout.sync_bucket_mb's default: big enough that a decoder layer of Gemma 3 27B (about 0.8 GB in
# bf16) is gathered in one piece, small next to the memory FSDP saves on a GPU.
DEFAULT_SYNC_BUCKET_MB = 1024


@dataclass
class SyncStats:
    """What one sync pushed: tensors, bytes, buckets, and the largest bucket's bytes."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    largest_bucket_bytes: int = 0


def plan_buckets(plan: list[PlannedTensor], bucket_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors in buckets of at most `bucket_bytes` (unsharded sizes), never splitting a
    decoder layer (vLLM's in-place reload finalises a layer, fused projections included, once all
    its tensors arrived in one call). A layer larger than a bucket is a bucket of its own, and
    within it every tensor is gathered and pushed on its own (see `WeightStream`)."""
    units: list[list[PlannedTensor]] = []
    for planned in plan:
        if units and layer_of(units[-1][-1].name) == layer_of(planned.name):
            units[-1].append(planned)
        else:
            units.append([planned])
    buckets: list[list[PlannedTensor]] = []
    size = 0
    for unit in units:
        unit_bytes = sum(p.nbytes for p in unit)
        if buckets and size + unit_bytes <= bucket_bytes:
            buckets[-1].extend(unit)
            size += unit_bytes
        else:
            buckets.append(list(unit))
            size = unit_bytes
    return buckets


@dataclass
class WeightStream:
    """The (name, full tensor) pairs of one sync, gathered a bucket at a time as they are consumed.

    `plan` says what will come (names, unsharded shapes, dtypes) before anything is gathered.
    Iterating gathers a bucket, yields its tensors, drops them, then gathers the next, so at most
    one bucket of full tensors is alive (or, for a decoder layer larger than a bucket, one tensor).
    Every rank of a sharded model must iterate it to the end, in lockstep.
    """

    plan: list[PlannedTensor]
    bucket_bytes: int
    stats: SyncStats = field(default_factory=SyncStats)

    def keep(self, rename: Callable[[str], str | None]) -> "WeightStream":
        """Only the tensors `rename` gives a name to, under that name; the others are never gathered."""
        kept = []
        for planned in self.plan:
            new = rename(planned.name)
            if new is not None:
                kept.append(PlannedTensor(new, planned.shape, planned.dtype, planned.gather))
        return WeightStream(kept, self.bucket_bytes, self.stats)

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        for bucket in plan_buckets(self.plan, self.bucket_bytes):
            bucket_bytes = sum(p.nbytes for p in bucket)
            self.stats.buckets += 1
            self.stats.largest_bucket_bytes = max(self.stats.largest_bucket_bytes, bucket_bytes)
            if bucket_bytes > self.bucket_bytes and len(bucket) > 1:
                # A layer larger than a bucket: its tensors one at a time (each yielded before the next is gathered).
                for planned in bucket:
                    yield [self._gathered(planned)]
                continue
            yield [self._gathered(planned) for planned in bucket]

    def _gathered(self, planned: PlannedTensor) -> tuple[str, torch.Tensor]:
        with torch.no_grad():
            tensor = planned.gather()
        if tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"weight sync: {planned.name} was planned as {planned.shape} and gathered as "
                               f"{tuple(tensor.shape)}; every rank must hold the same model")
        self.stats.tensors += 1
        self.stats.bytes += planned.nbytes
        return planned.name, tensor

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            while bucket:
                # Popped, so that the engine's reference is the last one once it has loaded the tensor.
                yield bucket.pop(0)


def sync_weights(engine, model, bucket_mb: float | None = None) -> SyncStats:
    """Push `model`'s current weights into `engine`, a bucket of `rollout.sync_bucket_mb` at a time.

    With `rollout.lora_sync: adapter` and a peft model, only the LoRA adapter is sent (the engine
    keeps the base weights; see `sync_adapter`). Under FSDP every rank calls this together (the
    gathers are collectives), each with its own colocated engine; a rank whose `engine` is None
    (it has none) still takes part in the gathers. Returns what was pushed.
    """
    config = getattr(engine, "config", None)
    if bucket_mb is None:
        bucket_mb = config.sync_bucket_mb if config is not None else DEFAULT_SYNC_BUCKET_MB
    bucket_bytes = int(bucket_mb * 2**20)
    if getattr(config, "lora_sync", "merged") == "adapter" and peft_model_of(model) is not None:
        return sync_adapter(engine, model, bucket_bytes)
    stream = WeightStream(engine_tensor_plan(model), bucket_bytes)
    if engine is None:
        deque(stream, maxlen=0)  # the gathers alone, keeping no tensor
    else:
        engine.update_weights(stream)
    return stream.stats


def sync_adapter(engine, model, bucket_bytes: int) -> SyncStats:
    """`lora_sync: adapter`: the engine receives the LoRA adapter alone, as a new adapter version.

    The engine must hold the peft model's base weights; after a push of other weights (BOND's
    anchor on the policy's engine, for instance) the base weights are pushed once more first.
    """
    stats = SyncStats()
    if not engine.holds_adapter_base:
        stream = WeightStream(engine_tensor_plan(model, merge_lora=False), bucket_bytes, stats)
        engine.update_weights(stream)
        engine.holds_adapter_base = True
    tensors = adapter_tensors(model)
    peft_model = peft_model_of(model)
    engine.update_adapter(tensors, peft_model.peft_config[peft_model.active_adapter])
    stats.tensors += len(tensors)
    stats.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    stats.buckets += 1
    return stats
