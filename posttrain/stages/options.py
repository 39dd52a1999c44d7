"""The options every hand-written training loop shares, declared and documented once.

`distill`, `rl`, `reward_model` and `qat` inherit `TrainingOptions`; `distill` and `qat`, which
both train towards a teacher's distribution, also inherit `DistillationOptions` (the loss of
posttrain.losses.distillation). Their configs hold only what is particular to their method. A stage whose method wants another default for a shared
option (rl checkpoints every 50 steps, distill never) re-declares it with `stage_default`, which
keeps the shared description, bounds and type and changes the default alone, so the wording
cannot drift between stages.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic.fields import FieldInfo

from posttrain.losses.distillation import DistillationObjective, Divergence, Target
from posttrain.stages.base import StageConfig
from posttrain.trackers import ReportTo
from posttrain.training import PLACEMENT_HELP, ChunkSize, LoraSpec


class TrainingOptions(StageConfig):
    """Optimizer, schedule, precision, memory, LoRA, checkpoints and trackers of a training loop."""

    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {"sharding": "none", "fsdp_offload": False}

    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (constant after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: no clipping).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: mixed precision, the forward passes of every model in the loop run under "
        "torch.autocast(bfloat16) while the trained weights, optimizer state, log-probabilities and the loss stay "
        "float32, as TRL's bf16=True does. Several times faster matmuls on GPUs and AMX CPUs; log-probabilities "
        "carry bf16 rounding.")
    max_tokens_per_microbatch: int | None = Field(
        None, ge=1, description="Bound each forward/backward micro-batch by this many tokens (whole sequences, or "
        "whole prompt groups where the method compares samples of one prompt; a unit larger than the budget gets "
        "a micro-batch of its own) and accumulate them into the step's update: memory per micro-batch is set by "
        "this budget, not by the batch size or the vocabulary. null: the whole batch at once.")
    shard_optimizer: bool = Field(
        False, description="Data-parallel launches: shard AdamW's state over the ranks (ZeRO stage 1, torch's "
        "ZeroRedundancyOptimizer); the weights stay whole on every rank. On automatically under a DeepSpeed "
        "ZeRO-1/2 launch.")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: shard the trained model, its gradients and AdamW state, and the frozen models "
        "placed on the accelerator (EMA anchor, start model, teacher), over the ranks with torch's FSDP2, one unit "
        "per decoder layer (bf16 parameters with float32 gradient reduction on GPUs under precision bf16): each "
        "rank holds 1/W of each model, so models larger than one device train. Chosen automatically under an "
        "accelerate FSDP launch; one process trains unsharded.")
    fsdp_offload: bool = Field(
        False, description="sharding fsdp: keep the parameter shards, gradients and optimizer state in CPU memory "
        "(FSDP's CPUOffloadPolicy), copied to the device a layer at a time; less device memory, slower steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the trained model's activations in backward: less memory, about a third "
        "more compute.")
    lora: LoraSpec | None = Field(
        None, description="Train a LoRA adapter instead of all weights; the saved model has the adapter merged.")
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint every this many steps (0: never); re-running the stage "
        "resumes from the newest one with the same data order.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest this many checkpoints.")
    report_to: ReportTo = Field(
        default_factory=list, description="Extra trackers: tensorboard, wandb, trackio (the `trackers` extra "
        "installs them).")


class DistillationOptions(StageConfig):
    """The loss of a loop that trains towards a teacher's token distribution (GKD's divergences,
    Gemma 3's sparse targets; posttrain.losses.distillation), and where the teacher lives."""

    divergence: Divergence = Field(
        "jsd", description="Token-level divergence for target: full. forward_kl = KL(teacher||student), "
        "reverse_kl = KL(student||teacher), jsd = generalised JSD with mix beta.")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mix; 0 is exactly forward KL, 1 exactly reverse KL.")
    temperature: float = Field(
        1.0, gt=0, description="Applied to teacher and student logits in the loss and to the student's sampling.")
    target: Target = Field(
        "full", description="Teacher target: the full distribution; its exact top-k renormalised; Gemma 3 sampled "
        "logits (k ids drawn from the teacher, target renormalised over them); or sampled_counts (k draws with "
        "replacement, target = counts / k, unbiased). Sparse targets train a cross-entropy (needs forward_kl).")
    k: int = Field(256, ge=1, description="Ids per position for top_k / sampled / sampled_counts targets.")
    with_replacement: bool = Field(
        False, description="sampled: draw the k ids with replacement (duplicates merged). sampled_counts always does.")
    student_normalisation: Literal["vocab", "set"] = Field(
        "vocab", description="Sparse targets: student log-probs from the softmax over the whole vocabulary, or "
        "renormalised over the sampled ids only.")
    reduction: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="Average the divergence over all completion tokens of the batch, or per "
        "sequence first (GKD's (1/L) sum_n) and then over sequences.")
    chunk_size: ChunkSize = Field(
        "auto", description="Completion positions per loss chunk: teacher and student hidden states are projected "
        "to the vocabulary (and the float32 loss computed) one chunk at a time, recomputed in backward, so "
        "[batch, length, vocab] logits never exist. auto: as many positions as fit 2**25 logits, so a chunk's "
        "memory is the same whatever the vocabulary; null uses the models' full logits at once.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Teacher weights and logits dtype (bfloat16 halves teacher memory on GPUs).")
    teacher_placement: str = Field("accelerator", description="Where the teacher lives: " + PLACEMENT_HELP + ".")

    @model_validator(mode="after")
    def _sparse_targets_train_the_forward_direction(self):
        if self.target != "full" and self.divergence != "forward_kl":
            raise ValueError(f"divergence: target {self.target!r} is a sparse teacher distribution, trained with a "
                             "cross-entropy towards the teacher (the forward direction); set divergence: forward_kl, "
                             "or target: full to use reverse_kl/jsd")
        return self

    def objective(self, chunk_size: int | None) -> DistillationObjective:
        """The loss these settings train (posttrain.losses.distillation), `chunk_size` resolved."""
        return DistillationObjective(self.divergence, self.beta, self.temperature, self.target, self.k,
                                     self.with_replacement, self.student_normalisation, self.reduction, chunk_size)


def stage_default(option: str, default: Any) -> FieldInfo:
    """A shared option (of `TrainingOptions` or `DistillationOptions`) with another default for one stage kind.

    Use as `learning_rate: float = stage_default("learning_rate", 5e-5)` in a subclass."""
    shared = {**DistillationOptions.model_fields, **TrainingOptions.model_fields}[option]
    return FieldInfo.merge_field_infos(shared, default=default)
