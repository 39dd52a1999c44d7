"""Where this process's rollout engine sits in a multi-process launch (torchrun / accelerate launch).

Data parallelism for rollouts: every rank runs its own engine on its own share of the prompts.
With `tensor_parallel_size = tp > 1` (vLLM on GPUs), groups of `tp` consecutive ranks shard one
engine between them: ranks [0..tp-1] form group 0, [tp..2tp-1] group 1, and so on. The ranks of
a group must ask for the same completions, so `generate` gathers the group's prompts, every rank
of the group generates all of them (with the same seed, hence the same samples) and keeps its
own slice. Different groups are independent and use different seeds.

Only the launcher's environment variables are read here (RANK, LOCAL_RANK, WORLD_SIZE), so the
module works before or after `torch.distributed` is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

from posttrain.rollout.types import RolloutError

T = TypeVar("T")

# Sampling seeds of different data-parallel groups are spaced this far apart: a seeded call
# derives per-request seeds seed + i * n (i < number of prompts), far below this spacing.
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch: one process (world_size 1) unless a launcher says otherwise."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1


def current_launch(env: Mapping[str, str] | None = None) -> Launch:
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise RolloutError(f"launcher environment: RANK, LOCAL_RANK and WORLD_SIZE must be integers ({e})") from e
    if not 0 <= rank < max(world, 1):
        raise RolloutError(f"launcher environment: RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(rank=rank, local_rank=local, world_size=max(world, 1))


def tensor_parallel_groups(world_size: int, tp: int) -> list[list[int]]:
    """Groups of `tp` consecutive ranks; `tp` must divide the number of processes."""
    if tp < 1 or world_size % tp:
        raise RolloutError(f"rollout.tensor_parallel_size: {tp} must divide the number of launched processes "
                           f"({world_size}); every rank belongs to exactly one tensor-parallel group")
    return [list(range(start, start + tp)) for start in range(0, world_size, tp)]


def data_parallel_index(launch: Launch, tp: int) -> int:
    """Which independent engine (tensor-parallel group) this rank belongs to."""
    tensor_parallel_groups(launch.world_size, tp)
    return launch.rank // tp


def engine_seed(base: int, launch: Launch, tp: int) -> int:
    """vLLM's engine seed: equal inside a tensor-parallel group (its ranks must sample the same
    tokens), different between groups (so that data-parallel engines draw different samples)."""
    return base + data_parallel_index(launch, tp)


def request_seed_offset(launch: Launch, tp: int) -> int:
    """Added to a seeded `SamplingParams.seed`, so that data-parallel engines asked with the same
    seed for different prompts do not reuse the same random streams."""
    return data_parallel_index(launch, tp) * SEED_STRIDE


def gather_in_group(items: Sequence[T], group, group_size: int) -> tuple[list[T], slice]:
    """All items of the tensor-parallel group in rank order, and the slice that is this rank's.

    Ranks may hold different numbers of prompts; the sizes travel with the items.
    """
    import torch.distributed as dist

    gathered: list = [None] * group_size
    dist.all_gather_object(gathered, list(items), group=group)
    me = dist.get_rank(group=group)
    start = sum(len(g) for g in gathered[:me])
    return [x for g in gathered for x in g], slice(start, start + len(gathered[me]))


def by_layer_chunks(weights: list[tuple[str, "object"]], max_bytes: int) -> list[list[tuple[str, "object"]]]:
    """`iter_layer_chunks` as a list."""
    return list(iter_layer_chunks(weights, max_bytes))


def iter_layer_chunks(weights, max_bytes: int):
    """Split (name, tensor) pairs into chunks of at most about `max_bytes`, never splitting a module.

    vLLM's in-place reload processes a layer once all of its tensors are loaded within one call;
    a fused projection (qkv, gate/up) loaded over two calls would be finalised half-filled. So a
    chunk only ends where the module prefix (the name without its last component) changes.
    Lazy: a chunk is taken from `weights` (which may be a stream) only when the previous one was used.
    """
    current: list = []
    size = 0
    prefix = None
    for name, tensor in weights:
        module = layer_of(name)
        nbytes = tensor.numel() * tensor.element_size()
        if current and module != prefix and size + nbytes > max_bytes:
            yield current
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
        prefix = module
    if current:
        yield current


def layer_of(name: str) -> str:
    """The decoder layer a weight belongs to ('model.layers.3'), or its module for the rest."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1])
