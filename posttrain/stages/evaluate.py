"""`evaluate`: greedy (or sampled) answers on held-out prompt sets, scored by rewards.

Accuracy is the fraction of samples whose combined reward reaches `success_threshold`. With
no `rewards` given, each dataset is scored by what its columns ask for: `answer` -> math
ground truth, `tests` -> code execution, `instruction_id_list` -> instruction verifiers.
"""

from __future__ import annotations

import torch

from pydantic import Field

from posttrain.data import DataError, iter_rows, write_jsonl
from posttrain.rollout import RolloutConfig, SamplingParams, create_engine
from posttrain.stages.base import StageConfig, StageContext, StageResult, register_stage
from rewards.combine import CombinedReward, FaultPolicy, RewardSpec, columns_from_rows

# Which reward checks a prompt row, by the column that carries its ground truth.
REWARD_BY_COLUMN = {"answer": "math", "tests": "code", "instruction_id_list": "instructions"}


class EvaluateStageConfig(StageConfig):
    """Answer held-out prompts and report accuracy per dataset."""

    model: str = Field(description="Model to evaluate.")
    datasets: dict[str, str] = Field(description="Named prompt sets: {name: ${datasets.X} or a path}; rows need `prompt` plus reward columns.")
    rewards: list[RewardSpec] | None = Field(None, description="Rewards for every set; default: chosen per set from its columns (answer, tests, instruction_id_list).")
    fault_policy: FaultPolicy = Field("zero", description="Reward faults score 0 (zero), drop the sample (skip) or fail the stage (fail).")
    success_threshold: float = Field(1.0, description="A sample counts as correct when its reward reaches this value.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N prompts of each set.")
    samples_per_prompt: int = Field(1, ge=1, description="Completions per prompt (accuracy averages over them).")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=96),
                                     description="Sampling; temperature 0 is greedy.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation engine.")


def default_rewards(rows: list[dict], where: str) -> list[RewardSpec]:
    for column, reward in REWARD_BY_COLUMN.items():
        if column in rows[0]:
            return [RewardSpec(name=reward)]
    raise DataError(f"{where}: cannot choose a reward: rows have none of the columns {', '.join(REWARD_BY_COLUMN)}; "
                    "give `rewards` in the stage config")


@register_stage("evaluate", EvaluateStageConfig, outputs=("report",))
def run_evaluate(cfg: EvaluateStageConfig, ctx: StageContext) -> StageResult:
    """Held-out accuracy of a model on prompt sets, scored by the project's rewards."""
    sets = {}
    for name, path in cfg.datasets.items():
        rows = []
        for where, row in iter_rows(path):
            if "prompt" not in row:
                raise DataError(f"{where}: evaluation rows need a 'prompt'; the row has {sorted(row)}")
            rows.append(row)
            if cfg.limit and len(rows) >= cfg.limit:
                break
        if not rows:
            raise DataError(f"{path}: no prompts to evaluate")
        sets[name] = rows
    # The rank's GPU when there is one (the transformers engine otherwise stays on the CPU).
    engine = create_engine(cfg.model, cfg.rollout, device="cuda" if torch.cuda.is_available() else None)
    metrics: dict[str, float] = {}
    records = []
    try:
        with ctx.progress(len(sets), "evaluate") as advance:
            for name, rows in sets.items():
                specs = cfg.rewards or default_rewards(rows, cfg.datasets[name])
                scorer = CombinedReward(specs, fault_policy=cfg.fault_policy,
                                        base_dir=str(ctx.recipe_dir) if ctx.recipe_dir else None)
                groups = engine.generate([r["prompt"] for r in rows], n=cfg.samples_per_prompt, sampling=cfg.sampling)
                flat_rows = [r for r, g in zip(rows, groups) for _ in g]
                completions = [c for g in groups for c in g]
                batch = scorer.compute([r["prompt"] for r in flat_rows], [c.text for c in completions],
                                       columns_from_rows(flat_rows))
                scored = [v for v in batch.rewards if v is not None]
                correct = sum(v >= cfg.success_threshold for v in scored)
                metrics[f"{name}/accuracy"] = round(correct / max(len(scored), 1), 4)
                metrics[f"{name}/mean_reward"] = round(sum(scored) / max(len(scored), 1), 4)
                metrics[f"{name}/stop_rate"] = round(sum(c.finish_reason == "stop" for c in completions) / len(completions), 4)
                if any(batch.faults.values()):
                    metrics[f"{name}/reward_faults"] = sum(batch.faults.values())
                for r, c, v in zip(flat_rows, completions, batch.rewards):
                    records.append({"set": name, "prompt": r["prompt"], "completion": c.text,
                                    "finish_reason": c.finish_reason, "reward": v})
                advance(1)
    finally:
        engine.close()
    report = ctx.stage_dir / "generations.jsonl"
    write_jsonl(report, records)
    return StageResult(outputs={"report": str(report)}, metrics=metrics)
