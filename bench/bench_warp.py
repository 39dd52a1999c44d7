"""WARP's claims (docs/algorithms.md#warp) checked at toy scale on a run of recipes/warp.yaml.

    python bench/bench_warp.py                       # runs the recipe if its warp stage is not complete
    python bench/bench_warp.py --run-dir runs/warp   # an existing run directory

Claims, each reported as measured (a claim that fails at toy scale is printed as such, not tuned):

1. SLERP of the two runs of iteration 1 has a higher held-out reward than each run.
2. Linear averaging of the same runs has a lower KL to the SFT model than SLERP (it shrinks the
   task vector by the cosine of half the angle between them).
3. Task vectors of separate runs are nearly orthogonal (cosine over the whole model).
4. Iteration 2 improves on iteration 1 (held-out reward of the merges; the LITI points as well).
5. The LITI front lies above the RL trajectories: the share of the first iteration's trajectory
   points whose reward is at most the front's reward at the same KL (front linearly interpolated).

Writes bench_warp.json and bench_warp.md into the warp stage's front/ directory, next to the
stage's own front.png (which shows the front, the runs, merges and trajectories).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _front_reward_at(front: list[tuple[float, float]], kl: float) -> float | None:
    """The front's reward at `kl` by linear interpolation along increasing KL (None outside it)."""
    pts = sorted(front)
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return r0 if k1 == k0 else r0 + (r1 - r0) * (kl - k0) / (k1 - k0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "warp.yaml"))
    ap.add_argument("--run-dir", default=None, help="run directory of the recipe (default: its output_dir)")
    ap.add_argument("--stage", default="warp", help="name of the warp stage in the recipe")
    args = ap.parse_args()

    from posttrain.pipeline.recipe import load_recipe
    from posttrain.pipeline.runner import run_recipe
    from posttrain.stages.rl.warp import PointEvaluator, WarpStageConfig, read_weights
    from posttrain.weights import merge_checkpoints
    import torch

    recipe = load_recipe(args.recipe)
    run_dir = Path(args.run_dir) if args.run_dir else recipe.output_dir
    manifest_path = run_dir / args.stage / "manifest.json"
    if not (manifest_path.exists() and json.loads(manifest_path.read_text()).get("status") == "complete"):
        print(f"running {args.recipe} (its {args.stage} stage is not complete in {run_dir})")
        run_recipe(args.recipe)
    manifest = json.loads(manifest_path.read_text())
    config = WarpStageConfig.model_validate(manifest["config"])
    stage = run_dir / args.stage
    front_dir = Path(manifest["outputs"]["front"])
    points = {json.loads(line)["point"]: json.loads(line) for line in (front_dir / "front.jsonl").read_text().splitlines()}
    trajectories = json.loads((front_dir / "trajectories.json").read_text())

    # The linear average of iteration 1's runs, scored like every other point.
    linear_dir = front_dir / "bench_linear_iteration_1"
    run_models = [stage / "iteration_1" / f"run_{m}" / "model" for m in range(1, config.runs + 1)]
    merge_checkpoints(config.model, run_models, linear_dir, "linear")
    evaluator = PointEvaluator(config, config.model, recipe.source.parent if recipe.source else None,
                               torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    try:
        linear = evaluator.score(read_weights(linear_dir))
    finally:
        evaluator.close()

    it1 = {m: points[f"iteration_1/run_{m}"] for m in range(1, config.runs + 1)}
    slerp1, slerp2 = points["iteration_1/merge"], points.get("iteration_2/merge")
    liti1, liti2 = points["iteration_1/liti"], points.get("iteration_2/liti")
    tv = json.loads((stage / "iteration_1" / "merge" / "task_vectors.json").read_text())["all"]
    front = [(v["kl"], v["reward"]) for k, v in points.items() if k.startswith("front/")]
    traj_pts = [(kl, r) for t in trajectories.values() for kl, r in t[1:]]  # after step 0 (the SFT model)
    below = [r <= f for kl, r in traj_pts if (f := _front_reward_at(front, kl)) is not None]

    claims = [
        ("SLERP of 2 runs beats each run (held-out reward)",
         all(slerp1["reward"] > v["reward"] for v in it1.values()),
         f"slerp {slerp1['reward']:.4f} vs runs " + ", ".join(f"{v['reward']:.4f}" for v in it1.values())),
        ("linear averaging has a lower KL than SLERP",
         linear["kl"] < slerp1["kl"], f"linear KL {linear['kl']:.4f} (reward {linear['reward']:.4f}) vs "
                                      f"slerp KL {slerp1['kl']:.4f} (reward {slerp1['reward']:.4f})"),
        ("task vectors of separate runs are nearly orthogonal",
         tv["cosine"] is not None and abs(tv["cosine"]) < 0.2, f"cosine {tv['cosine']} (angle {tv['angle_deg']} deg)"),
    ]
    if slerp2 is not None:
        claims.append(("iteration 2 improves on iteration 1", slerp2["reward"] > slerp1["reward"],
                       f"merge reward {slerp1['reward']:.4f} -> {slerp2['reward']:.4f}; "
                       f"LITI {liti1['reward']:.4f} -> {liti2['reward']:.4f}; "
                       f"KL {slerp1['kl']:.4f} -> {slerp2['kl']:.4f}"))
    claims.append(("the LITI front lies above the RL trajectories",
                   bool(below) and sum(below) / len(below) >= 0.8,
                   f"{sum(below)}/{len(below)} trajectory points on or below the front "
                   f"({len(traj_pts) - len(below)} outside the front's KL range)"))

    result = {"claims": [{"claim": c, "holds": bool(h), "measured": m} for c, h, m in claims],
              "points": points, "linear_iteration_1": linear, "task_vectors_iteration_1": tv}
    (front_dir / "bench_warp.json").write_text(json.dumps(result, indent=2))
    lines = ["| claim | holds at toy scale | measured |", "|---|---|---|"]
    lines += [f"| {c} | {'yes' if h else 'no'} | {m} |" for c, h, m in claims]
    (front_dir / "bench_warp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nfront table: {front_dir / 'front.md'}\nfigure: {front_dir / 'front.png'}")


if __name__ == "__main__":
    main()
