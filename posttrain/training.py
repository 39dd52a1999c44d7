"""What the hand-written training loops (`distill`, `rl`, `reward_model`, `qat`) share, on accelerate.

The loops stay readable top to bottom in their stage modules; everything here is the plumbing a
TRL user expects underneath them:

- device placement and precision: `TrainingSession` builds an `accelerate.Accelerator`, so the
  policy lands on the rank's accelerator (cuda:LOCAL_RANK, else the CPU) and bf16 mixed precision
  is autocast around the forward passes while weights, optimizer state and losses stay float32;
- data parallelism: under `torchrun`/`accelerate launch` every rank runs the loop on its share of
  a step's prompts (`TrainingSession.shard`), normalises its loss by the *global* token or sequence
  count (`all_sum`), and `step` sums the gradients over ranks (bucketed all-reduce) before clipping,
  so one step on W ranks equals one single-process step on the same global batch (tests compare
  the two under torchrun);
- micro-batches by a token budget (`token_budget_batches`), accumulated into one update;
- gradient clipping and a step that skips non-finite gradients (`TrainingSession.step`);
- frozen models (anchor, start model, teacher) placed on the accelerator or wherever an option
  says (`place_frozen`);
- checkpoints that resume bit for bit (`save_checkpoint` / `load_checkpoint`), written by rank 0;
- the pieces every loop needs: LoRA settings, AdamW with warm-up, saving a model with its tokenizer.

Why gradients are all-reduced here rather than by a DDP wrapper: the ranks' completions differ in
length, so under a token budget they take different numbers of micro-batches, and DDP needs every
rank in every backward's all-reduce; the scoring functions also call the model several times per
micro-batch (a shared prompt pass, then completions on its KV cache) and reach into its decoder for
chunked log-probabilities, which DDP only synchronises when they run inside its own forward. One
all-reduce of the accumulated gradients per step has neither constraint, and moves the same bytes.

Sharding. `sharding: fsdp` shards the policy, its gradients and AdamW state, and the frozen models
on the accelerator, with torch's FSDP2 (posttrain.sharding: one unit per decoder layer); the
gradients are then summed by FSDP's reduce-scatter instead of the all-reduce above, every rank runs
as many micro-batches as the others (`even_micro_batches`), checkpoints are torch.distributed.
checkpoint shards written by every rank and the output model is streamed from the shards
(posttrain.sharded_save). An accelerate FSDP launch selects it. Without it the loops can still shard
what ZeRO stage 1 shards, AdamW's state, with torch's ZeroRedundancyOptimizer (`shard_optimizer`,
and automatically under a DeepSpeed ZeRO-1/2 launch). DeepSpeed ZeRO-3 is refused for the loops
(`sharding: fsdp` is the alternative): its parameters live inside DeepSpeed's engine, which the
loops' scoring, EMA anchor and weight sync would have to go through; FSDP2 keeps them ordinary
(DTensor) parameters of the model. `sft` runs under ZeRO-3 or FSDP through TRL.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["fp32", "bf16"]
# Positions per vocabulary-projection chunk (posttrain.losses.token_logprobs.resolve_chunk_size).
ChunkSize = Annotated[int, Field(ge=1)] | Literal["auto"] | None


class TrainingSetupError(RuntimeError):
    """The launch or the options ask for something the hand-written loops cannot do."""


# --- LoRA, optimizer, saving ---------------------------------------------------------------------

class LoraSpec(BaseModel):
    """LoRA adapter settings (peft)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt; 'all-linear' for every linear layer but the head.")

    def to_peft_config(self, model=None, task_type: str = "CAUSAL_LM"):
        """peft's LoraConfig; given the `model`, one that leaves a composite's vision tower alone.
        `task_type` SEQ_CLS (reward models) also trains and saves a full copy of the head."""
        from peft import LoraConfig

        from posttrain.modeling import VISION_MODULES_PATTERN, vision_parameter_names

        # A composite model's vision tower shares layer names (q_proj, fc1...) with the language
        # model; text post-training adapts the language model only.
        exclude = VISION_MODULES_PATTERN if model is not None and vision_parameter_names(model) else None
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type=task_type, exclude_modules=exclude)


LR_SCHEDULES = ("constant", "linear", "cosine")


def adamw_with_warmup(params, learning_rate: float, weight_decay: float, warmup_steps: int, shard: bool = False,
                      schedule: str = "constant", total_steps: int | None = None):
    """AdamW with a linear warm-up to a constant rate: the optimizer of the hand-written loops
    (distill, rl, reward_model); SFT uses the Trainer's own schedules. `schedule` linear or cosine
    instead decays the rate to 0 at `total_steps` after the warm-up (transformers' schedules, as
    the Trainer's `lr_scheduler_type`).

    `shard`: ZeRO stage 1 through torch's ZeroRedundancyOptimizer: each data-parallel rank keeps
    AdamW's two moment buffers for its own share of the parameters only, steps that share, and
    broadcasts the updated values; the weights themselves stay whole on every rank (its rollout
    engine and EMA anchor need them). Needs an initialised process group."""
    params = list(params)
    # The fused kernel (one launch for every parameter; the Trainer's default optimizer,
    # adamw_torch_fused) where the parameters' device has it: on a CPU it halved the update's time
    # against torch's per-tensor default (a 1.2M-parameter reward model), on a GPU it saves the
    # launches of the foreach path. Same update rule; elsewhere torch's default implementation.
    fused = {"fused": True} if _fused_adamw_supported(params) else {}
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=learning_rate,
                                            weight_decay=weight_decay, **fused)
    else:
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, **fused)
    if schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
        return optimizer, scheduler
    if schedule not in LR_SCHEDULES:
        raise TrainingSetupError(f"lr_scheduler: {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if not total_steps or total_steps <= warmup_steps:
        raise TrainingSetupError(f"lr_scheduler {schedule}: the rate decays to 0 at the last step, so it needs the "
                                 f"number of steps (got {total_steps}, with {warmup_steps} warm-up steps)")
    from transformers import get_scheduler

    return optimizer, get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps,
                                    num_training_steps=total_steps)


def _fused_adamw_supported(params: list) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, all on one device, of a
    type with the kernel (asked of torch by building one on a stand-in tensor, as its list of such
    devices is private)."""
    devices = {p.device for p in params}
    if not params or len(devices) != 1 or not all(p.is_floating_point() for p in params):
        return False
    if any(hasattr(p, "to_local") for p in params):
        return False  # FSDP's DTensor shards: torch's default (foreach) implementation handles them
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=devices.pop()))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def save_model(model, tokenizer, out_dir: Path) -> None:
    """HF checkpoint (safetensors) plus the tokenizer carrying the Gemma chat template. (A model
    sharded by FSDP is written by every rank through posttrain.sharded_save.save_hf_checkpoint.)"""
    from posttrain.modeling import save_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)


# --- where frozen models live --------------------------------------------------------------------

PLACEMENT_HELP = ("where a frozen model lives: 'accelerator' (the rank's GPU, else the CPU), 'cpu' (offloaded: "
                  "saves GPU memory, costs speed) or an explicit device such as 'cuda:1' (a GPU of its own)")


def resolve_placement(placement: str, accelerator_device: torch.device, key: str) -> torch.device:
    """The torch device for a placement option; `key` names the recipe option in errors."""
    if placement == "accelerator":
        return accelerator_device
    try:
        device = torch.device(placement)
    except RuntimeError:
        raise TrainingSetupError(f"{key}: {placement!r} is not a placement; expected {PLACEMENT_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingSetupError(f"{key}: {placement!r} asks for a GPU but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingSetupError(f"{key}: {placement!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def place_frozen(model, device: torch.device):
    """Eval mode, no gradients, on `device`: the anchor, the start model, a teacher."""
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


# --- the session ---------------------------------------------------------------------------------

@dataclass
class StepResult:
    grad_norm: float
    finite: bool


class TrainingSession:
    """One policy being trained by a hand-written loop, on accelerate.

        session = TrainingSession(precision="bf16", seed=0)
        policy = session.prepare(model, learning_rate=..., weight_decay=..., warmup_steps=...)
        for step ...:
            rows = session.shard(step_rows)                      # this rank's share
            total = session.all_sum(local_tokens)                # the global normaliser
            for mb in token_budget_batches(sizes, budget):
                with session.autocast():
                    loss = ... / total                           # this rank's share of the global mean
                loss.backward()
            result = session.step(max_grad_norm)                 # all-reduce, clip, skip non-finite, update
    """

    def __init__(self, precision: Precision = "fp32", seed: int = 0, sharding: str = "none", offload: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        from posttrain.sharding import SHARDING_MODES

        if sharding not in SHARDING_MODES:
            raise TrainingSetupError(f"sharding: {sharding!r} is not one of {', '.join(SHARDING_MODES)}")
        cuda = torch.cuda.is_available()
        # Precision is applied by `autocast()` below, per stage, rather than through accelerate:
        # its state is one per process, and a run's stages may differ (an fp32 distill, then a bf16
        # rl, after a TRL sft that set its own); asking accelerate for a different one would fail.
        self.accelerator = Accelerator(cpu=not cuda)
        kind = self.accelerator.distributed_type
        self._zero_stage_from_launch = None
        if kind == DistributedType.DEEPSPEED:
            self._zero_stage_from_launch = int(getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) or 0)
        if (self._zero_stage_from_launch or 0) >= 3:
            raise TrainingSetupError(
                "this launch uses DeepSpeed ZeRO-3; the distill, rl, reward_model and qat loops shard their models "
                "with torch's FSDP2 instead (set `sharding: fsdp` on the stage, or launch with accelerate config "
                "recipes/accelerate/fsdp.yaml). ZeRO-3 partitions parameters inside its own engine, which the loops' "
                "scoring and weight sync would have to go through; sft runs under ZeRO-3 as configured.")
        if kind == DistributedType.FSDP:
            # An accelerate FSDP launch asks for sharded training: the loops apply FSDP2 themselves.
            sharding = "fsdp"
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            offload = offload or bool(getattr(getattr(plugin, "cpu_offload", None), "offload_params", False))
        # One process has nothing to shard over; it trains whole, as `sharding: none`.
        self.sharding = sharding if self.world_size > 1 else "none"
        # Offloading moves the shards off an accelerator; without one they are in CPU memory already.
        self.offload = offload and self.sharding == "fsdp" and self.device.type != "cpu"
        self.precision = precision
        self.seed = seed
        self.sharded_optimizer = False
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self._params: list[torch.nn.Parameter] = []
        self._param_bytes: int | None = None

    # -- facts about the launch --
    @property
    def device(self) -> torch.device:
        device = self.accelerator.device
        # accelerate names the CPU of a multi-process CPU launch "cpu:RANK"; it is the one CPU.
        return torch.device("cpu") if device.type == "cpu" else device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def describe(self, global_batch: int, unit: str) -> dict[str, Any]:
        """The facts every stage records in its metrics: where it ran and how big a step was."""
        out = {"device": str(self.device), "device_type": self.device.type, "world_size": self.world_size,
               "precision": self.precision, "sharding": self.sharding, f"global_batch_{unit}": global_batch}
        if self._param_bytes is not None:
            # The trained model's parameters on this rank (its shards under fsdp); after a
            # release, those of the last model trained.
            out["param_bytes_per_rank"] = self._param_bytes
        return out

    @property
    def fsdp(self) -> bool:
        return self.sharding == "fsdp"

    # -- setting up --
    def prepare(self, model, learning_rate: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                gradient_checkpointing: bool = False, shard_optimizer: bool = False, schedule: str = "constant",
                total_steps: int | None = None):
        """Move the policy to the device, build AdamW + warm-up (and the `schedule` over
        `total_steps`) over its trainable parameters and note the parameters whose gradients `step`
        all-reduces. `shard_optimizer` (or a DeepSpeed ZeRO-1/2 launch) shards AdamW's state over
        the ranks (see adamw_with_warmup). Returns the model itself (unwrapped), for saving and
        syncing.

        Under `sharding: fsdp` the model is sharded (posttrain.sharding.shard_model) and AdamW runs
        over the shards, which already splits its state over the ranks (shard_optimizer is moot)."""
        if not self.fsdp:
            model = model.to(self.device)
        if gradient_checkpointing:
            # Non-reentrant checkpointing works with peft's frozen inputs.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        model.train()
        if self.fsdp:
            from posttrain.sharding import is_sharded, shard_model

            if not is_sharded(model):  # a second prepare (a resumed test) keeps the sharding it has
                model = shard_model(model, self.device, bf16=self.precision == "bf16", offload=self.offload)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.sharded_optimizer = (self.world_size > 1 and not self.fsdp
                                  and (shard_optimizer or self._zero_stage_from_launch in (1, 2)))
        optimizer, scheduler = adamw_with_warmup(self._params, learning_rate, weight_decay, warmup_steps,
                                                 shard=self.sharded_optimizer, schedule=schedule,
                                                 total_steps=total_steps)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        from posttrain.sharding import parameter_bytes_on_rank

        self._param_bytes = parameter_bytes_on_rank(model)
        return model

    def place_frozen(self, model, placement: str, key: str):
        """A frozen model (EMA anchor, start model, teacher, reward model): under fsdp with its
        placement 'accelerator', sharded like the policy (each rank holds 1/W of it, gathered a
        layer at a time for its forward passes); else placed whole where `placement` says
        (`key` names the option in errors)."""
        if self.fsdp and placement == "accelerator":
            from posttrain.sharding import shard_model

            model.eval()
            model.requires_grad_(False)
            return shard_model(model, self.device, bf16=self.precision == "bf16", offload=self.offload)
        return place_frozen(model, resolve_placement(placement, self.device, key))

    def save_output_model(self, model, tokenizer, out_dir: Path) -> None:
        """The stage's output model as a whole Hugging Face checkpoint, LoRA merged in; every rank
        calls it. Under fsdp it is streamed from the shards (posttrain.sharded_save: no rank holds
        the whole model); otherwise rank 0 saves it."""
        if self.fsdp:
            from posttrain.sharded_save import save_hf_checkpoint

            save_hf_checkpoint(model, tokenizer, out_dir, self.is_main)
        elif self.is_main:
            save_model(model.merge_and_unload() if hasattr(model, "merge_and_unload") else model, tokenizer, out_dir)
        self.barrier()  # the other ranks return once the model is on disk

    # -- data parallelism --
    def shard(self, items: Sequence, what: str = "items") -> list:
        """This rank's contiguous share of a step's items. The global batch must split evenly, so
        that a step means the same number of samples whatever the number of ranks."""
        n, w = len(items), self.world_size
        if n % w:
            raise TrainingSetupError(f"{what}: {n} per step do not split evenly over {w} processes; "
                                     f"use a multiple of {w}")
        share = n // w
        return list(items[self.rank * share:(self.rank + 1) * share])

    def all_sum(self, value: float) -> float:
        """Sum of a number over the ranks (token counts for the global loss normaliser)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def gather_lists(self, values: list) -> list:
        """Concatenate a Python list from every rank, in rank order (metrics, evaluation results)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, list(values))
        return [v for box in boxes for v in box]

    def broadcast_object(self, value):
        """Rank 0's value on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_max(self, value: int) -> int:
        """Largest of an integer over the ranks."""
        if self.world_size == 1:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def even_micro_batches(self, micro: Sequence[slice]) -> list[tuple[slice, bool]]:
        """(micro-batch, real) pairs to run. Without sharding, the micro-batches themselves.

        Under fsdp every rank must run as many forward and backward passes through the sharded
        model as every other (each layer's all-gather and reduce-scatter is a collective), but the
        ranks' shares of a step split into different numbers of micro-batches under a token
        budget. The ranks with fewer run their first micro-batch again, `real` False: the loop then
        multiplies its loss by 0 (the gradient is unchanged, the collectives line up) and counts
        nothing of it in its statistics."""
        pairs = [(mb, True) for mb in micro]
        if not self.fsdp:
            return pairs
        most = self.all_max(len(pairs))
        if most and not pairs:
            raise TrainingSetupError("sharding: fsdp: a rank has nothing to score in a step the others train on; "
                                     "use a batch that gives every rank at least one row")
        return pairs + [(pairs[0][0], False)] * (most - len(pairs))

    # -- one step --
    def autocast(self):
        """bf16 autocast for forward passes (trained and frozen models alike) when precision is bf16."""
        if self.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, max_grad_norm: float | None) -> StepResult:
        """Sum gradients over ranks, clip, then apply the update unless the gradient is not finite;
        always clears gradients. Every rank must call it once per step (it is collective).

        Under fsdp the gradients were already summed into each rank's shards by the backward
        passes; the norm is then a DTensor over the shards, made whole (the global norm) before
        clipping with it."""
        if self.fsdp:
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self._params, max_grad_norm, norm)
        else:
            self._all_reduce_gradients()
            norm = torch.nn.utils.clip_grad_norm_(self._params, max_grad_norm or float("inf"))
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm, finite)

    def _all_reduce_gradients(self, bucket_elements: int = 2**25) -> None:
        """Sum each trainable parameter's gradient over the ranks, in flat buckets (few, large
        collectives). A parameter a rank did not reach (an empty share) contributes zeros."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: list[list[torch.Tensor]] = []
        for p in self._params:
            last = buckets[-1] if buckets else None
            if (last is None or last[0].dtype != p.grad.dtype
                    or sum(g.numel() for g in last) + p.grad.numel() > bucket_elements):
                buckets.append([p.grad])
            else:
                last.append(p.grad)
        for bucket in buckets:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def release(self) -> None:
        """Drop the model, optimizer and schedule this session holds and hand their memory back to
        the device. Between models trained one after another in one session (the reward-model
        members), so that the next is not loaded while the last still holds its weights and AdamW
        state."""
        self.model = self.optimizer = self.scheduler = None
        self._params = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the session's and accelerate's references to the models (its process group stays for the runner)."""
        self.release()
        self.accelerator.free_memory()


def token_budget_batches(sizes: Sequence[int], budget: int | None, group_size: int = 1) -> list[slice]:
    """Split items into consecutive micro-batches of whole groups whose token count fits `budget`.

    `sizes[i]` is the number of tokens item i puts through the model (prompt + completion); a group
    (RL's n samples of one prompt) is never split, because its prompt runs once for all of them.
    A group larger than the budget gets a micro-batch of its own. `budget` None: one batch.
    """
    n = len(sizes)
    if n % group_size:
        raise ValueError(f"token_budget_batches: {n} items do not split into groups of {group_size}")
    if budget is None or n == 0:
        return [slice(0, n)] if n else []
    out, start, used = [], 0, 0
    for g in range(0, n, group_size):
        cost = sum(sizes[g:g + group_size])
        if g > start and used + cost > budget:
            out.append(slice(start, g))
            start, used = g, 0
        used += cost
    out.append(slice(start, n))
    return out


# --- checkpoints ---------------------------------------------------------------------------------

def checkpoint_dirs(stage_dir: Path) -> list[Path]:
    """Complete checkpoints (their state.json exists), oldest first."""
    root = Path(stage_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
                  and (p / "state.json").exists())


def save_checkpoint(session: TrainingSession, stage_dir: Path, step: int, models: dict[str, torch.nn.Module],
                    state: dict, keep: int) -> Path | None:
    """checkpoints/step_N with the named models' weights, optimizer, schedule and RNG states.

    Rank 0 writes (data-parallel ranks hold identical weights); every rank's RNG states are
    gathered into it, so a resumed run continues each rank's random streams. Under fsdp every
    rank writes its own shards of the models and optimizer state (torch.distributed.checkpoint,
    posttrain.sharded_save) into the same directory. The directory is written under a temporary
    name and renamed, with state.json last: a checkpoint cut short by a crash is never taken for
    complete. Returns the path on rank 0.
    """
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = session.gather_lists([rng])
    if session.sharded_optimizer:
        session.optimizer.consolidate_state_dict(to=0)  # collective: rank 0 receives every rank's shard
    root = Path(stage_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if session.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if session.fsdp:
        from posttrain.sharded_save import save_dcp
        from posttrain.sharding import reshard_all

        session.barrier()  # the directory exists before any rank writes into it
        for model in models.values():
            reshard_all(model)
        save_dcp(tmp / "sharded", models, session.model, session.optimizer)
        session.barrier()  # every rank's shards are on disk before the checkpoint is marked complete
    if session.is_main:
        if not session.fsdp:
            for name, model in models.items():
                torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp / f"{name}.pt")
            torch.save({"optimizer": session.optimizer.state_dict(), "scheduler": session.scheduler.state_dict()},
                       tmp / "optimizer.pt")
        else:
            torch.save({"scheduler": session.scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(all_rng, tmp / "rng.pt")
        _write_json(tmp / "state.json", {**state, "step": step, "world_size": session.world_size,
                                         "sharding": session.sharding})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(stage_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    session.barrier()
    return final if session.is_main else None


def load_checkpoint(session: TrainingSession, path: Path, models: dict[str, torch.nn.Module]) -> dict:
    """Restore what save_checkpoint wrote, on every rank; returns its state (with `step`)."""
    state = json.loads((path / "state.json").read_text())
    written = state.get("sharding", "none")
    if written != session.sharding:
        raise TrainingSetupError(f"{path}: this checkpoint was written with sharding {written!r} and this run uses "
                                 f"{session.sharding!r}; resume with the sharding it was written with")
    if session.fsdp:
        from posttrain.sharded_save import load_dcp

        load_dcp(path / "sharded", models, session.model, session.optimizer)
    else:
        for name, model in models.items():
            weights = torch.load(path / f"{name}.pt", weights_only=True, map_location="cpu")
            model.load_state_dict(weights)
    opt = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    if not session.fsdp:
        session.optimizer.load_state_dict(opt["optimizer"])
    session.scheduler.load_state_dict(opt["scheduler"])
    all_rng = torch.load(path / "rng.pt", weights_only=False)
    if len(all_rng) == session.world_size:
        rng = all_rng[session.rank]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    # A different world size resumes the weights and optimizer; the loops' data order is a
    # function of (seed, step), so only their private random streams start afresh.
    return state


def latest_checkpoint(stage_dir: Path) -> Path | None:
    found = checkpoint_dirs(stage_dir)
    return found[-1] if found else None


def resume_latest(session: "TrainingSession", stage_dir: Path, models: dict[str, torch.nn.Module],
                  metrics_path: Path | None, metrics_offset: int = 0) -> dict:
    """Resume from the newest complete checkpoint under `stage_dir`, if there is one.

    Restores the named models, the optimizer, the schedule and the RNG states on every rank, and
    drops the rows of `metrics_path` logged after the checkpoint (rank 0), since those steps are
    about to be redone; `metrics_offset` is added to the checkpoint's step for a loop whose metrics
    continue another's numbering (reward_model's members). Returns the checkpoint's state with
    `step` (0 and nothing else when starting afresh) and `path`.
    """
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is None:
        return {"step": 0, "path": None}
    state = load_checkpoint(session, checkpoint, models)
    if session.is_main and metrics_path is not None:
        truncate_metrics(metrics_path, metrics_offset + state["step"])
    return {**state, "path": checkpoint}


def checkpoint_due(step: int, every: int, max_steps: int) -> bool:
    """Whether a loop that has just finished `step` (1-based) saves a checkpoint: every `every`
    steps, never after the last one (the stage's output model is written then instead)."""
    return bool(every) and step % every == 0 and step < max_steps


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop logged rows of steps after the checkpoint: they are about to be redone."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


@contextmanager
def engine_asleep(engine, enabled: bool):
    """Free the rollout engine's GPU memory (weights, KV cache) during the backward and optimizer
    step, when the recipe asks (rollout.enable_sleep_mode) and the engine can; it wakes on exit,
    and the caller then pushes the new weights."""
    asleep = enabled and bool(getattr(engine, "can_sleep", False))
    if asleep:
        engine.sleep()
    try:
        yield
    finally:
        if asleep:
            engine.wake_up()
