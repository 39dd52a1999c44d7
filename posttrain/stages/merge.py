"""`merge`: merge checkpoints in weight space: linear average or SLERP of task vectors, then LITI.

    theta_merged = slerp(init, theta_1..theta_M)   or   sum_m w_m theta_m
    theta_out    = (1 - eta) * theta_init + eta * theta_merged      (LITI; eta = 1 keeps theta_merged)

The merge streams over the safetensors shards tensor by tensor (posttrain.weights), so memory
stays near one tensor per input plus one output shard whatever M is. LoRA adapter directories
are merged into their base model first. The manifest reports, per tensor group, the norms of the
task vectors theta_m - theta_init and the angle between them (near 90 degrees for independent
RL runs, which is why SLERP and linear averaging differ).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.data import write_json
from posttrain.stages.base import StageConfig, StageContext, StageResult, register_stage
from posttrain.weights import flat_task_vector_metrics, merge_checkpoints


class MergeStageConfig(StageConfig):
    """Merge models in weight space (linear or SLERP of task vectors), optionally interpolated towards init (LITI)."""

    method: Literal["linear", "slerp"] = Field("slerp", description="slerp: spherical interpolation of the task "
                                               "vectors theta_m - theta_init, per parameter tensor, M-way by "
                                               "recursion (WARP); linear: weighted average of the weights.")
    init: str | None = Field(None, description="The common starting point of the models (the SFT model): needed by "
                             "slerp and by LITI (eta < 1). ${stages.NAME.model}, ${models.NAME} or a path.")
    models: list[str] = Field(description="Models to merge (checkpoint or LoRA adapter directories), at least 2.")
    lam: float | None = Field(None, ge=0, le=1, description="Two models only: the weight of the second one "
                              "(default 1/M, i.e. uniform); M > 2 always uses the uniform recursion.")
    eta: float = Field(1.0, ge=0, le=1, description="LITI: (1 - eta) * init + eta * merged; 1 keeps the merge as it is.")
    max_shard_gib: float = Field(5.0, gt=0, description="Largest safetensors shard written for the merged model.")

    @model_validator(mode="after")
    def _check(self):
        if len(self.models) < 2:
            raise ValueError(f"models: a merge needs at least 2 models, got {len(self.models)}")
        if self.lam is not None and len(self.models) != 2:
            raise ValueError(f"lam: only for 2 models (got {len(self.models)}); M models merge uniformly")
        if self.init is None and self.method == "slerp":
            raise ValueError("init: slerp interpolates task vectors theta_m - theta_init; name the common start model")
        if self.init is None and self.eta < 1.0:
            raise ValueError(f"init: LITI with eta={self.eta} interpolates towards init; name the common start model")
        return self


@register_stage("merge", MergeStageConfig, outputs=("model",))
def run_merge(config: MergeStageConfig, ctx: StageContext) -> StageResult:
    """Merge models: SLERP of task vectors or a linear average, then LITI towards init."""
    out_dir = ctx.stage_dir / "model"
    report = merge_checkpoints(config.init, config.models, out_dir, config.method, config.lam, config.eta,
                               max_shard_bytes=int(config.max_shard_gib * 2**30),
                               scratch_dir=ctx.stage_dir / "_merged_adapters")
    write_json(ctx.stage_dir / "task_vectors.json", report)
    return StageResult(outputs={"model": str(out_dir)}, metrics=flat_task_vector_metrics(report))
