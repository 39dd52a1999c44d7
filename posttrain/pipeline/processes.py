"""The processes of a run: multi-process launches (`torchrun`, `accelerate launch`) and clean children.

Every process runs `posttrain run`, but only one of them, rank 0, owns the run directory. Rank 0
resolves the recipe, builds inputs, writes manifests and runs the stages that are
single-process (filter, evaluate, export, merge...) in a clean child process. Every rank takes
part in the stages registered as `distributed` (sft through TRL/accelerate; distill, rl,
reward_model and warp data-parallel on `posttrain.training`). Rank 0 tells the others what to
run over a control channel.

The channel is a gloo process group with a long timeout. While rank 0 spends hours on a
single-process stage, the other ranks wait on it, and the default group's timeout (10-30 min)
would kill them. The default group is initialised here when the launcher has not done it yet,
with the backend accelerate would pick (nccl with CUDA, gloo without), and accelerate then
reuses it.
"""

from __future__ import annotations

import os
import random
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

    def close(self) -> None:
        """Wait for every rank, then tear the process groups down in order. Left to interpreter
        exit, a gloo group can be destroyed while its threads still run, and the process
        aborts ("terminate called without an active exception")."""
        import torch.distributed as dist

        dist.barrier(group=self.group)
        dist.destroy_process_group()

    def receive(self) -> dict[str, Any]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


# Variables through which launchers describe the process group; a clean child must not see them.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                      "TORCHELASTIC_USE_AGENT_STORE", "ACCELERATE_DYNAMO_BACKEND")


class StageFailedInChild(Exception):
    """A stage run by run_in_clean_process raised; str() is the original 'Type: message'."""

    def __init__(self, message: str, child_traceback: str):
        super().__init__(message)
        self.child_traceback = child_traceback


def run_in_clean_process(kind: str, config: dict, ctx_fields: dict, plugins: list[str], plugin_dir: str):
    """Run a single-process stage in a fresh (spawned) process that does not see the launcher's
    distributed set-up, and return its StageResult.

    Rank 0 of a launch already belongs to a process group (ours, or accelerate's after a
    distributed stage). An in-process vLLM engine created there joins that group and waits for
    ranks that never come: the run hangs. A spawned child without the launcher's variables starts
    its own world of one, as a plain single-process run does.
    """
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    saved = {k: os.environ.pop(k) for k in LAUNCHER_VARIABLES if k in os.environ}
    try:
        child = spawn.Process(target=_stage_child, args=(kind, config, ctx_fields, plugins, plugin_dir, sender),
                              name=f"posttrain-{ctx_fields['name']}")
        child.start()
    finally:
        os.environ.update(saved)
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        child.join()
        raise StageFailedInChild(f"ChildProcessError: the stage's process died (exit code {child.exitcode})",
                                 "") from None
    child.join()
    if status == "error":
        raise StageFailedInChild(*payload)
    return payload


def _stage_child(kind: str, config: dict, ctx_fields: dict, plugins: list[str], plugin_dir: str, sender) -> None:
    import traceback
    from pathlib import Path

    from posttrain.pipeline.recipe import import_plugin

    try:
        for plugin in plugins:
            import_plugin(plugin, Path(plugin_dir))
        sender.send(("ok", run_stage_by_kind(kind, config, ctx_fields)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which records it
        sender.send(("error", (f"{type(e).__name__}: {e}", traceback.format_exc())))
    finally:
        sender.close()


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs; deterministic algorithms where torch has them cheaply."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def run_stage_by_kind(kind: str, config: dict, ctx_fields: dict, is_main: bool = True):
    """Run a stage in a process that received it by message (another rank, a clean child)."""
    from posttrain.stages import STAGE_KINDS, StageContext

    stage = STAGE_KINDS[kind]
    ctx = StageContext(**ctx_fields, is_main=is_main)
    seed_everything(ctx.seed)
    return stage.run(stage.config_cls.model_validate(config), ctx)
