"""Runs launched as several processes (`torchrun`, `accelerate launch` on a GPU node).

Every process runs `posttrain run`, but only one of them, rank 0, owns the run directory. Rank 0
resolves the recipe, builds inputs, writes manifests and runs the stages that are
single-process (filter, distill, rl, evaluate, export...). The other ranks take part only in
the stages registered as `distributed` (sft: TRL/accelerate spread one training over all the
processes). Rank 0 tells them what to run over a control channel.

The channel is a gloo process group with a long timeout. While rank 0 spends hours on a
single-process stage, the other ranks wait on it, and the default group's timeout (10-30 min)
would kill them. The default group is initialised here when the launcher has not done it yet,
with the backend accelerate would pick (nccl with CUDA, gloo without), and accelerate then
reuses it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


class ControlChannel:
    """Rank 0 broadcasts small messages (dicts) to the other ranks; they block in receive()."""

    def __init__(self, timeout: timedelta = timedelta(days=7)):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        self.group = dist.new_group(backend="gloo", timeout=timeout)

    def send(self, message: dict[str, Any]) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> dict[str, Any]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
