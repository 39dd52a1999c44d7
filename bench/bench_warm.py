"""WARM's claims on the toy world, measured with the `reward_model` and `rl` stages.

1. Runs recipes/warm.yaml: SFT, three reward models trained on preferences with 25% flipped
   labels and their weight average (WARM), then RL from the SFT model against the single best
   member and against WARM (same seed, same steps), each logging the learned reward ("proxy")
   and the toy world's true preference ("gold") per step.
2. Trains the same three members again on clean labels (from the same SFT model), for the
   clean half of the accuracy claims.
3. Prints held-out pairwise accuracy of every member, their mean, the best member, the weight
   average and the prediction ensemble, for clean and noisy labels; and, for both RL runs, the
   step where the smoothed gold reward peaks (RL against WARM should keep it rising longer).
4. Writes warm_rl.png: proxy and gold reward per step for both RL runs.

    python bench/bench_warm.py [--out runs/warm_bench] [--set stages.rm.max_steps=80 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "warm.yaml"


def accuracy_row(label: str, metrics: dict, members: int) -> dict:
    accs = [metrics[f"member_{i}/accuracy"] for i in range(1, members + 1)]
    return {"labels": label, "members": accs, "mean": sum(accs) / len(accs), "best": max(accs),
            "average": metrics["average/accuracy"], "ensemble": metrics["ensemble/accuracy"]}


def clean_label_members(manifests: dict, work: Path, seed: int) -> dict:
    """The reward_model stage of the recipe again, on clean labels, in a directory of its own."""
    from posttrain.stages.base import StageContext
    from posttrain.stages.reward_model import RewardModelStageConfig, run_reward_model

    config = RewardModelStageConfig.model_validate({**manifests["rm"]["config"], "label_flip_rate": 0.0})
    stage_dir = work / "rm_clean"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name="rm_clean", kind="reward_model", stage_dir=stage_dir, run_dir=work, seed=seed,
                       recipe_name="bench_warm")
    return run_reward_model(config, ctx).metrics


def smoothed(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def rl_curves(stage_dir: Path) -> tuple[list[int], list[float], list[float]]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/proxy/mean" in r]
    return [r["step"] for r in rows], [r["reward/proxy/mean"] for r in rows], [r["reward/gold/mean"] for r in rows]


def plot(curves: dict[str, tuple], window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, (steps, proxy, gold) in curves.items():
        axes[0].plot(steps, smoothed(proxy, window), label=label)
        axes[1].plot(steps, smoothed(gold, window), label=label)
    axes[0].set_title(f"proxy reward (its own reward model), mean of {window} steps")
    axes[1].set_title(f"gold reward (true preference), mean of {window} steps")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "warm_bench"), help="work directory")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override key=value")
    parser.add_argument("--window", type=int, default=5, help="steps averaged in the curves")
    args = parser.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from posttrain.runner import run_recipe

    t0 = time.perf_counter()
    manifests = run_recipe(RECIPE, [f"output_dir={work / 'run'}", *args.overrides])
    seconds_recipe = time.perf_counter() - t0
    from posttrain.recipe import load_recipe

    clean = clean_label_members(manifests, work, load_recipe(RECIPE).seed)
    members = int(manifests["rm"]["config"]["members"])
    rows = [accuracy_row("clean", clean, members), accuracy_row("25% flipped", manifests["rm"]["metrics"], members)]

    print(f"\nrecipes/warm.yaml ran in {seconds_recipe:.0f} s\n")
    print("held-out pairwise accuracy (toy preference pairs never seen in training)")
    print(f"{'labels':<12} {'members':<24} {'mean':>6} {'best':>6} {'WARM':>6} {'ensemble':>9}")
    for r in rows:
        print(f"{r['labels']:<12} {' '.join(f'{a:.3f}' for a in r['members']):<24} {r['mean']:6.3f} {r['best']:6.3f} "
              f"{r['average']:6.3f} {r['ensemble']:9.3f}")
    for r in rows:
        print(f"  {r['labels']}: WARM >= mean of members: {r['average'] >= r['mean']}; "
              f"WARM >= best member: {r['average'] >= r['best']}")

    curves = {"RL vs best member": rl_curves(work / "run" / "rl_best_member"),
              "RL vs WARM": rl_curves(work / "run" / "rl_warm")}
    print("\nRL (same seed, same steps): step where the smoothed gold reward peaks, gold at start/peak/end")
    summary = {}
    for label, (steps, proxy, gold) in curves.items():
        g = smoothed(gold, args.window)
        p = smoothed(proxy, args.window)
        peak = max(range(len(g)), key=lambda i: g[i])
        summary[label] = {"gold_peak_step": steps[peak], "gold_start": g[0], "gold_peak": g[peak], "gold_end": g[-1],
                          "proxy_start": p[0], "proxy_end": p[-1]}
        print(f"  {label:<18} peak at step {steps[peak]:>3}; gold {g[0]:.3f} / {g[peak]:.3f} / {g[-1]:.3f}; "
              f"proxy {p[0]:.3f} -> {p[-1]:.3f}")
    png = work / "warm_rl.png"
    plot(curves, args.window, png)
    (work / "bench_warm.json").write_text(json.dumps({"accuracy": rows, "rl": summary}, indent=2))
    print(f"\nplot: {png}\nnumbers: {work / 'bench_warm.json'}")


if __name__ == "__main__":
    main()
