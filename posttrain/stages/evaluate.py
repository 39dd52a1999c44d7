"""`evaluate`: answers to held-out prompt sets, scored by task, every figure with n and a 95% interval.

Each set's task comes from its columns (`answer` -> math accuracy by the verifier, `tests` -> code
pass@k in the sandbox, `instruction_id_list` -> IFEval prompt/instruction-level accuracy, strict
and loose), or from `rewards` given here. Every set also gets mean reward, stop rate, answer
length and safety rates (toxicity, personal information, wrong self-identification). With
`side_by_side`, a second model answers the same prompts and a reward model judges the pairs:
the win rate of the evaluated model, ties counted one half. The figures and intervals are
computed by `posttrain.evaluation`; this stage reads the sets and writes the results.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from posttrain.data import DataError, iter_rows, write_json, write_jsonl
from posttrain.evaluation import (TASK_BY_COLUMN, SafetyChecks, SetScoring, default_reward_specs, evaluate_prompts,
                                  side_by_side, task_for_row)
from posttrain.images import prompt_has_images
from posttrain.rollout import RolloutConfig, SamplingParams, create_engine
from posttrain.stages.base import StageConfig, StageContext, StageResult, register_stage
from rewards.combine import CombinedReward, FaultPolicy, RewardSpec


class SafetyConfig(BaseModel):
    """Safety rates of the answers, measured with the filter stage's detectors."""

    model_config = ConfigDict(extra="forbid")

    toxicity_threshold: float = Field(0.9, ge=0.0, le=1.0, description="An answer is toxic from this classifier score.")
    name: str = Field("Gemma", description="The assistant name the model may claim (wrong self-identification check).")
    developer: str = Field("Google DeepMind", description="The developer the model may claim.")


class SideBySideConfig(BaseModel):
    """Win rate of the evaluated model against another, judged by a reward model."""

    model_config = ConfigDict(extra="forbid")

    against: str = Field(description="The other model (path or ${stages.X.model}); it answers the same prompts.")
    judge: list[str] = Field(min_length=1, description="Reward-model checkpoint(s); several are weight-averaged (WARM).")
    sets: list[str] | None = Field(None, description="Sets to compare on; default: all.")
    tie_margin: float = Field(0.0, ge=0.0, description="Scores closer than this count as a tie.")


class EvaluateStageConfig(StageConfig):
    """Answer held-out prompts; report accuracy, pass@k, IFEval, safety and length, each with n and a 95% interval."""

    # Added after run directories were made with this stage (StageConfig.hash_form).
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {"rewards[].tolerate_all_faults": False}


    model: str = Field(description="Model to evaluate.")
    datasets: dict[str, str] = Field(description="Named prompt sets: {name: ${datasets.X} or a path}; rows need `prompt` plus reward columns.")
    rewards: list[RewardSpec] | None = Field(None, description="Rewards for every set; default: chosen per set from its columns (answer, tests, instruction_id_list).")
    fault_policy: FaultPolicy = Field("zero", description="Reward faults score 0 (zero), drop the sample (skip) or fail the stage (fail).")
    success_threshold: float = Field(1.0, description="A sample counts as correct when its reward reaches this value.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N prompts of each set.")
    samples_per_prompt: int = Field(1, ge=1, description="Completions per prompt (accuracy averages over them; pass@k needs k of them).")
    pass_k: list[int] = Field([1], description="k values of pass@k for code sets (unbiased estimator from samples_per_prompt samples).")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=96),
                                     description="Sampling; temperature 0 is greedy.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation engine.")
    safety: SafetyConfig | None = Field(default_factory=SafetyConfig, description="Safety rates of the answers; null turns them off.")
    side_by_side: SideBySideConfig | None = Field(None, description="Win rate against another model, judged by a reward model.")


def load_prompt_set(path: str, limit: int | None) -> list[dict]:
    rows = []
    for where, row in iter_rows(path):
        if "prompt" not in row:
            raise DataError(f"{where}: evaluation rows need a 'prompt'; the row has {sorted(row)}")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no prompts to evaluate")
    return rows


@register_stage("evaluate", EvaluateStageConfig, outputs=("report",))
def run_evaluate(cfg: EvaluateStageConfig, ctx: StageContext) -> StageResult:
    """Held-out figures of a model on prompt sets, each with its sample count and 95% interval."""
    bad_k = [k for k in cfg.pass_k if not 1 <= k <= cfg.samples_per_prompt]
    if bad_k:
        raise ValueError(f"pass_k: {bad_k} outside 1..samples_per_prompt ({cfg.samples_per_prompt}); "
                         "pass@k needs at least k samples per prompt")
    sets = {name: load_prompt_set(path, cfg.limit) for name, path in cfg.datasets.items()}
    base_dir = str(ctx.recipe_dir) if ctx.recipe_dir else None
    tasks = {}
    for name, rows in sets.items():
        if cfg.rewards:
            tasks[name] = "reward"
            for column, task in TASK_BY_COLUMN.items():
                if column in rows[0]:
                    tasks[name] = task  # keep the task's own figures (pass@k, IFEval) next to the given rewards
                    break
        else:
            if not any(column in rows[0] for column in TASK_BY_COLUMN):
                raise DataError(f"{cfg.datasets[name]}: cannot choose a reward: rows have none of the columns "
                                f"{', '.join(TASK_BY_COLUMN)} (has {sorted(rows[0])}); give `rewards` in the stage config")
            tasks[name] = task_for_row(rows[0])
    safety = SafetyChecks(cfg.safety.toxicity_threshold, cfg.safety.name, cfg.safety.developer) if cfg.safety else None
    device = "cuda" if torch.cuda.is_available() else None  # the rank's GPU when there is one
    metrics: dict[str, float] = {}
    figures: dict[str, dict] = {}
    records: list[dict] = []
    answers: dict[str, list[str]] = {}
    images = any(prompt_has_images(r["prompt"]) for rows in sets.values() for r in rows)
    engine = create_engine(cfg.model, cfg.rollout, device=device, images=images)
    try:
        with ctx.progress(len(sets), "evaluate") as advance:
            for name, rows in sets.items():
                specs = cfg.rewards or [RewardSpec(**s) for s in default_reward_specs(tasks[name])]
                scorer = CombinedReward(specs, fault_policy=cfg.fault_policy, base_dir=base_dir)
                scoring = SetScoring(task=tasks[name], scorer=scorer, success_threshold=cfg.success_threshold,
                                     k_values=cfg.pass_k, safety=safety)
                result = evaluate_prompts(engine, rows, sampling=cfg.sampling, scoring=scoring,
                                          samples=cfg.samples_per_prompt)
                metrics.update(result.flat(f"{name}/"))
                figures[name] = {"task": tasks[name], "prompts": len(rows),
                                 "figures": {k: e.as_dict() for k, e in result.metrics.items()}}
                answers[name] = [r["completions"][0] for r in result.records]
                for r in result.records:
                    for j, text in enumerate(r["completions"]):
                        records.append({"set": name, "prompt": r["prompt"], "completion": text,
                                        "finish_reason": r["finish_reasons"][j], "reward": r["rewards"][j]})
                advance(1)
    finally:
        engine.close()
    if cfg.side_by_side is not None:
        sbs = _side_by_side(cfg, sets, answers, device)
        for name, est in sbs.items():
            metrics.update({k: v for k, v in _flat_sbs(name, est).items()})
            figures[name].setdefault("side_by_side", {k: e.as_dict() for k, e in est.items()})
            figures[name]["side_by_side"]["against"] = cfg.side_by_side.against
    report = ctx.stage_dir / "generations.jsonl"
    write_jsonl(report, records)
    write_json(ctx.stage_dir / "evaluation.json", {"model": cfg.model, "sets": figures})
    return StageResult(outputs={"report": str(report)}, metrics=metrics)


def _side_by_side(cfg: EvaluateStageConfig, sets: dict, answers: dict, device) -> dict:
    from rewards.reward_model import RewardModelScorer

    sbs = cfg.side_by_side
    names = sbs.sets or list(sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise ValueError(f"side_by_side.sets: {unknown} are not among the datasets ({', '.join(sets)})")
    # The baseline answers with the same decoding, its first sample per prompt against ours.
    baseline: dict[str, list[str]] = {}
    images = any(prompt_has_images(r["prompt"]) for name in names for r in sets[name])
    with create_engine(sbs.against, cfg.rollout, device=device, images=images) as engine:
        for name in names:
            groups = engine.generate([r["prompt"] for r in sets[name]], n=1, sampling=cfg.sampling)
            baseline[name] = [g[0].text for g in groups]
    judge = RewardModelScorer(sbs.judge, device=device)
    out = {}
    for name in names:
        prompts = [r["prompt"] for r in sets[name]]
        out[name] = side_by_side(prompts, answers[name], baseline[name], judge.score, tie_margin=sbs.tie_margin)
    return out


def _flat_sbs(name: str, est: dict) -> dict:
    from posttrain.evaluation import flatten

    return flatten(f"{name}/side_by_side/", est)
