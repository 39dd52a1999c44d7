"""`warp`: Weight Averaged Rewarded Policies (Rame et al. 2024; docs/algorithms.md#warp).

One iteration, from a start point theta_init (the SFT model at first):

    1. RL       M independent runs of the `rl` stage's loop (REINFORCE/RLOO, KL to an EMA anchor)
                from theta_init; they differ in seed, hence in prompt order and samples
    2. merge    theta_slerp = SLERP of the task vectors theta_m - theta_init, per parameter tensor
    3. LITI     theta_init <- (1 - eta) * theta_init + eta * theta_slerp; the next iteration starts here

After the last iteration the LITI front {(1 - eta) * theta_sft + eta * theta_slerp : eta in front_etas}
is scored on held-out prompts: greedy reward (as the rl stage's eval/reward) and the KL to the SFT
model, estimated on the point's own samples at the training temperature as
mean_y [log pi(y|x) - log pi_sft(y|x)] (the estimator of the rl stage's kl_start). The front, the
runs, merges and LITI points of every iteration go into `front/front.jsonl`, `front/front.md` and
`front/front.png`, with the first iteration's RL trajectories (eval/reward against kl_start from
their metrics.jsonl, where the start model is the SFT model).

The RL runs are the rl stage itself (`run_rl`), each with its own directory
`iteration_<i>/run_<m>/` and seed. Resuming after a kill: a run, merge or LITI directory whose
`manifest.json` says complete (posttrain.manifests, as for the runner's stages) is skipped; a run
cut short resumes from its rl checkpoints (`checkpoint_every`); evaluated points are kept in
`front/points.json`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from posttrain.data import load_prompts, write_json, write_jsonl
from posttrain.images import prompt_has_images
from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.manifests import completed, mark_complete
from posttrain.modeling import (checkpoint_tensors_for_model, load_causal_lm, load_processor, load_tokenizer,
                                output_rows)
from posttrain.rollout import SamplingParams, create_engine, sync_weights
from posttrain.evaluation import evaluate_with_rewards
from posttrain.scoring import score_completions
from posttrain.stages.base import StageContext, StageResult, register_stage
# warp composes the rl stage itself (its config and its loop), as WARP's first stage; nothing else of rl.
from posttrain.stages.rl.config import RLStageConfig
from posttrain.stages.rl.loop import run_rl
from posttrain.training import latest_checkpoint, place_frozen, resolve_placement
from posttrain.weights import CheckpointReader, flat_task_vector_metrics, liti_tensor, merge_checkpoints
from rewards.combine import CombinedReward, dataset_columns

log = logging.getLogger(__name__)

DEFAULT_FRONT = [round(0.1 * i, 1) for i in range(11)]


class WarpStageConfig(RLStageConfig):
    """WARP: M rl runs per iteration, SLERP of their task vectors, LITI towards the start, iterated; the LITI front."""

    runs: int = Field(2, ge=1, description="M: independent rl runs per iteration (different seeds, hence prompt "
                      "orders and samples), merged into one policy (WARP: 2; more is better, up to 5 in the paper).")
    iterations: int = Field(3, ge=1, description="I: WARP iterations, each starting from the previous LITI point "
                            "(the paper runs 5; its gains flatten after 3).")
    eta: float = Field(0.3, ge=0, le=1, description="LITI step: theta_init <- (1 - eta) theta_init + eta theta_slerp.")
    merge_method: Literal["slerp", "linear"] = Field("slerp", description="How the runs are merged: slerp of task "
                                                     "vectors (WARP) or a linear average (lower KL, lower reward).")
    front_etas: list[float] = Field(default_factory=lambda: list(DEFAULT_FRONT), description="LITI front scored after "
                                    "the last iteration: (1 - eta) theta_sft + eta theta_slerp for each eta; [] skips it.")
    front_kl_samples: int = Field(4, ge=1, description="Samples per held-out prompt for the KL-to-SFT estimate.")
    evaluate_iterations: bool = Field(True, description="Also score every run, merge and LITI point on the held-out "
                                      "prompts (reward and KL to SFT), as points of the front plot.")
    output_eta: float | None = Field(None, ge=0, le=1, description="Output model: None gives the last LITI point; "
                                     "a value gives that front point (1 - eta) theta_sft + eta theta_slerp.")

    @model_validator(mode="after")
    def _check_warp(self):
        bad = [e for e in self.front_etas if not 0.0 <= e <= 1.0]
        if bad:
            raise ValueError(f"front_etas: every eta must lie in [0, 1], got {bad[0]}")
        if (self.front_etas or self.evaluate_iterations) and not self.eval_dataset:
            raise ValueError("eval_dataset: the LITI front and the iteration points are scored on held-out prompts; "
                             "name them (eval_dataset: ${datasets.NAME}) or set front_etas: [] and "
                             "evaluate_iterations: false")
        if self.lora is not None:
            raise ValueError("lora: warp merges full task vectors between iterations; train full weights "
                             "(a merge stage merges LoRA adapters)")
        return self

    def rl_config(self, start_model: str) -> RLStageConfig:
        """The rl stage's config for one run from `start_model`: every rl field as given here."""
        fields = self.model_dump(include=set(RLStageConfig.model_fields))
        return RLStageConfig.model_validate({**fields, "model": start_model})


def run_seed(seed: int, iteration: int, run: int) -> int:
    """The seed of run `run` of iteration `iteration`: prompt order, sampling and initial RNG state
    differ between runs and iterations, and are reproducible from the recipe's seed."""
    return random.Random(f"warp:{seed}:{iteration}:{run}").randrange(2**31)


def _barrier() -> None:
    """Ranks wait for rank 0's merges and evaluation (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- held-out reward and KL to the SFT model ------------------------------------------------------

class PointEvaluator:
    """Scores weight-space points on held-out prompts: greedy reward with the rl stage's rewards, and
    KL(pi || pi_sft) from the point's own samples. One engine and one trainer-side model are
    loaded once; each point's weights are copied into them."""

    def __init__(self, config: WarpStageConfig, sft_dir: str, recipe_dir: Path | None, device: torch.device):
        tokenizer = load_tokenizer(sft_dir)
        processor = load_processor(sft_dir)  # a composite model's: held-out prompts with images (None: text only)
        self.pad_id = tokenizer.pad_token_id
        rows, ids, _ = load_prompts(config.eval_dataset, tokenizer, config.max_prompt_tokens, processor=processor)
        self.rows, self.ids = rows[:config.eval_max_prompts], ids[:config.eval_max_prompts]
        # The rewards see the columns of the training prompts and of the whole held-out set, also
        # when the scored share holds no row of some task (rewards.combine.columns_from_rows).
        train_rows, _, _ = load_prompts(config.dataset, tokenizer, config.max_prompt_tokens, processor=processor)
        self.columns = sorted(set(dataset_columns(train_rows)) | set(dataset_columns(rows)))
        self.config = config
        self.reward = CombinedReward(config.rewards, config.fault_policy, base_dir=str(recipe_dir) if recipe_dir else None)
        self.device = device
        frozen = resolve_placement(config.anchor_placement, device, "anchor_placement")
        self.reference = place_frozen(load_causal_lm(sft_dir), frozen)
        self.policy = place_frozen(load_causal_lm(sft_dir), device)
        self.engine = create_engine(sft_dir, config.rollout, device=device,
                                    images=any(prompt_has_images(p) for p in self.ids))
        vocab = output_rows(self.policy)
        self.chunk_size = resolve_chunk_size(config.logprob_chunk_size, vocab)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        weights = checkpoint_tensors_for_model(self.policy, weights)
        result = self.policy.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"warp: the point has tensor {result.unexpected_keys[0]!r}, which the SFT model lacks")
        tied = set(getattr(self.policy, "_tied_weights_keys", None) or [])
        untied = [k for k in result.missing_keys if k not in tied and k != "lm_head.weight"]
        if untied:
            raise ValueError(f"warp: the point lacks tensor {untied[0]!r} of the SFT model")
        sync_weights(self.engine, self.policy)

    @torch.no_grad()
    def score(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        self.load(weights)
        c = self.config
        out = evaluate_with_rewards(self.engine, self.reward, self.rows, self.ids, c.max_new_tokens, columns=self.columns)
        sampling = SamplingParams(temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                  seed=0, logprobs=False)
        n = c.front_kl_samples
        groups = self.engine.generate(self.ids, n=n, sampling=sampling)
        completions = [x.token_ids for g in groups for x in g]
        prompts = [p for p in self.ids for _ in range(n)]
        kls = []
        for s in range(0, len(completions), 64):  # bounded batches: held-out sets may be large
            sl = slice(s, s + 64)
            kw = dict(prompt_ids=prompts[sl], completion_ids=completions[sl], temperature=c.temperature,
                      pad_token_id=self.pad_id, chunk_size=self.chunk_size)
            logp, mask, _ = score_completions(self.policy, **kw)
            ref, _, _ = score_completions(self.reference, **kw)
            kls += ((logp - ref.to(logp.device)) * mask).sum(-1).tolist()
        return {"reward": out["eval/reward"], "kl": sum(kls) / len(kls),
                **{k.removeprefix("eval/"): v for k, v in out.items() if k != "eval/reward"}}

    def close(self) -> None:
        self.engine.close()


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read from its safetensors files (CPU)."""
    reader = CheckpointReader(model_dir)
    return {n: reader.get(n) for n in reader.names()}


def _front_weights(sft: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], eta: float) -> dict:
    return {n: liti_tensor(sft[n], merged[n], eta) for n in sft}


def run_trajectory(run_dir: Path) -> list[tuple[float, float]]:
    """(KL to the run's start, held-out reward) along an rl run, from its metrics.jsonl: every
    eval/reward record (before training, every eval_every steps, after) with the kl_start of
    that step (0 before training, the last step's after it)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kl_at: dict[int, float] = {0: 0.0}
    for r in rows:
        if "kl_start" in r:
            kl_at[r["step"]] = r["kl_start"]
    out = []
    for r in rows:
        if "eval/reward" in r:
            kl = kl_at.get(r["step"], kl_at[max(k for k in kl_at if k <= r["step"])])
            out.append((float(kl), float(r["eval/reward"])))
    return out


# --- the stage --------------------------------------------------------------------------------------

@register_stage("warp", WarpStageConfig, outputs=("model", "front"), distributed=True)
def run_warp(config: WarpStageConfig, ctx: StageContext) -> StageResult:
    """WARP: M rl runs, SLERP of their task vectors, LITI towards the start, I iterations; scores the LITI front."""
    stage_dir = Path(ctx.stage_dir)
    sft = config.model
    start = sft
    summary: dict[str, Any] = {}
    last_merge: Path | None = None
    iteration_points: list[tuple[str, Path]] = []
    for it in range(1, config.iterations + 1):
        it_dir = stage_dir / f"iteration_{it}"
        run_models = []
        for m in range(1, config.runs + 1):
            run_dir = it_dir / f"run_{m}"
            seed = run_seed(ctx.seed, it, m)
            if completed(run_dir) is None:
                # A run killed before its first checkpoint starts over (its metrics would repeat steps).
                if ctx.is_main and run_dir.exists() and latest_checkpoint(run_dir) is None:
                    shutil.rmtree(run_dir)
                _barrier()
                run_dir.mkdir(parents=True, exist_ok=True)
                sub = StageContext(name=f"{ctx.name}.iteration_{it}.run_{m}", kind="rl", stage_dir=run_dir,
                                   run_dir=ctx.run_dir, seed=seed, recipe_name=ctx.recipe_name, lineage=ctx.lineage,
                                   progress_factory=ctx.progress_factory, recipe_dir=ctx.recipe_dir, is_main=ctx.is_main)
                result = run_rl(config.rl_config(start), sub)
                if ctx.is_main:
                    mark_complete(run_dir, kind="rl", seed=seed, start=start, outputs=result.outputs,
                                  metrics=result.metrics)
                _barrier()
            run_models.append(run_dir / "model")
            iteration_points.append((f"iteration_{it}/run_{m}", run_dir / "model"))
        merge_dir, liti_dir = it_dir / "merge", it_dir / "liti"
        if ctx.is_main:
            if completed(merge_dir) is None:
                report = merge_checkpoints(start, run_models, merge_dir / "model", config.merge_method,
                                           scratch_dir=merge_dir / "_merged_adapters")
                write_json(merge_dir / "task_vectors.json", report)
                mark_complete(merge_dir, kind="merge", method=config.merge_method, models=[str(p) for p in run_models])
            if completed(liti_dir) is None:
                merge_checkpoints(start, [merge_dir / "model"], liti_dir / "model", "linear", eta=config.eta)
                mark_complete(liti_dir, kind="liti", eta=config.eta, init=start, merged=str(merge_dir / "model"))
            report = json.loads((merge_dir / "task_vectors.json").read_text())
            summary.update({f"iteration_{it}/{k}": v for k, v in flat_task_vector_metrics(report).items()
                            if k.count("/") == 1})  # the whole-model figures; per group in task_vectors.json
        _barrier()
        iteration_points += [(f"iteration_{it}/merge", merge_dir / "model"), (f"iteration_{it}/liti", liti_dir / "model")]
        last_merge = merge_dir / "model"
        start = str(liti_dir / "model")

    front_dir = stage_dir / "front"
    out_model = Path(start)
    if ctx.is_main:
        front_dir.mkdir(parents=True, exist_ok=True)
        if config.output_eta is not None:
            out_model = stage_dir / "model"
            if completed(out_model) is None:
                merge_checkpoints(sft, [last_merge], out_model, "linear", eta=config.output_eta)
                mark_complete(out_model, kind="liti", eta=config.output_eta, init=sft, merged=str(last_merge))
        summary.update(_evaluate_and_plot(config, ctx, sft, last_merge, iteration_points, front_dir))
    _barrier()
    return StageResult(outputs={"model": str(out_model), "front": str(front_dir)}, metrics=summary)


def _evaluate_and_plot(config: WarpStageConfig, ctx: StageContext, sft: str, last_merge: Path,
                       iteration_points: list[tuple[str, Path]], front_dir: Path) -> dict:
    points_file = front_dir / "points.json"
    scored: dict[str, dict] = json.loads(points_file.read_text()) if points_file.exists() else {}
    todo: list[tuple[str, Any]] = []
    if config.evaluate_iterations:
        todo += [(label, path) for label, path in iteration_points]
    if config.front_etas:
        todo += [(f"front/eta_{eta:g}", eta) for eta in config.front_etas]
    todo = [(label, what) for label, what in todo if label not in scored]
    if todo:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        evaluator = PointEvaluator(config, sft, ctx.recipe_dir, device)
        sft_w, merged_w = read_weights(Path(sft)), read_weights(last_merge)
        try:
            with ctx.progress(len(todo), "scoring the front") as advance:
                for label, what in todo:
                    weights = _front_weights(sft_w, merged_w, what) if isinstance(what, float) else read_weights(what)
                    scored[label] = evaluator.score(weights)
                    write_json(points_file, scored)  # each point once, even across a kill
                    advance(1)
        finally:
            evaluator.close()
    trajectories = {f"iteration_1/run_{m}": run_trajectory(ctx.stage_dir / "iteration_1" / f"run_{m}")
                    for m in range(1, config.runs + 1)
                    if (ctx.stage_dir / "iteration_1" / f"run_{m}" / "metrics.jsonl").exists()}
    rows = [{"point": label, **values} for label, values in scored.items()]
    front = sorted(((float(label.split("_", 1)[1]), v) for label, v in scored.items() if label.startswith("front/")),
                   key=lambda t: t[0])
    for eta, v in front:
        for r in rows:
            if r["point"] == f"front/eta_{eta:g}":
                r["eta"] = eta
    write_jsonl(front_dir / "front.jsonl", rows)
    write_json(front_dir / "trajectories.json", trajectories)
    _write_table(front_dir / "front.md", rows)
    if rows:
        _plot(front_dir / "front.png", scored, front, trajectories)
    metrics = {f"{label}/{k}": round(v, 4) for label, values in scored.items() for k, v in values.items()
               if k in ("reward", "kl") and isinstance(v, float)}
    return metrics


def _write_table(path: Path, rows: list[dict]) -> None:
    lines = ["| point | held-out reward | KL to SFT |", "|---|---|---|"]
    lines += [f"| {r['point']} | {r['reward']:.4f} | {r['kl']:.4f} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, scored: dict, front: list, trajectories: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, traj in trajectories.items():
        if traj:
            ax.plot([p[0] for p in traj], [p[1] for p in traj], "--", marker=".", alpha=0.6,
                    label=f"RL trajectory {label}")
    if front:
        ax.plot([v["kl"] for _, v in front], [v["reward"] for _, v in front], "-o", color="black", label="LITI front")
        for eta, v in front:
            ax.annotate(f"{eta:g}", (v["kl"], v["reward"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    markers = {"run": "x", "merge": "*", "liti": "s"}
    for kind, marker in markers.items():
        pts = [(v["kl"], v["reward"], label) for label, v in scored.items()
               if label.startswith("iteration_") and label.split("/")[-1].split("_")[0] == kind]
        for kl, reward, label in pts:
            ax.scatter([kl], [reward], marker=marker, s=60)
            ax.annotate(label.replace("iteration_", "it"), (kl, reward), fontsize=6, textcoords="offset points",
                        xytext=(3, -8))
    ax.set_xlabel("KL(pi || pi_sft) on held-out prompts (nats per completion)")
    ax.set_ylabel("held-out reward (greedy)")
    ax.set_title("WARP: LITI front, merges and RL runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
