"""WARM's claims on the toy world, measured with the `reward_model` and `rl` stages.

1. Runs recipes/warm.yaml: SFT, three reward models trained on preferences with 25% flipped
   labels and their weight average (WARM), then RL from the SFT model against the single best
   member and against WARM (same seed, same steps), each logging the learned reward ("proxy")
   and the toy world's true preference ("gold") per step.
2. Accuracy, over `--repeats` independent repetitions (each with its own label flips, probe and
   member seeds), for 25% flipped and for clean labels: the recipe's reward_model stage again,
   with two sets of held-out pairs. The validation pairs are the stage's eval_dataset (they
   pick the best member, as `best_member` does for RL); the test pairs, never used for a choice,
   give every number printed: each member, their mean, the best member (chosen on
   validation), the weight average and the prediction ensemble. Choosing and measuring on the
   same pairs would hand the best member the luck of the draw (the max of noisy estimates).
   The same numbers on `--ood-pairs` pairs of the toy world's `ood` split (the same tasks and
   true preferences on names, items, topics and small talk no reward model trained on), for
   the paper's claim that under label noise the weight average generalises out of distribution
   at least as well as the ensemble.
3. RL over reward-model draws and seeds: both RL stages (same seed, same steps) against the
   recipe's reward models and against the best member and average of `--rl-draws` further
   flipped-label repetitions (repetition 0 repeats the recipe's own stage): one draw of reward
   models decides which quirks the best member has and how much of them the average keeps.
   Each draw with `--rl-seeds` seeds; plus RL against the recipe's WARM with its reward scaled
   to the best member's spread (RLOO follows the raw reward, so a reward model with a smaller
   spread also pulls the policy more gently). Per run: the step where the smoothed gold reward
   peaks, gold at the end and over the second half of the run, and the KL to the SFT model;
   and in how many runs RL against WARM kept more gold over the second half than RL against
   the best member.
4. Writes warm_rl.png, each curve the step-by-step mean over the runs: proxy and gold reward
   per step, and gold against the KL to the SFT model (where the comparison no longer depends on
   the reward's scale).

    python bench/bench_warm.py [--out runs/warm_bench] [--repeats 3] [--rl-seeds 3] [--rl-draws 2]
                               [--test-pairs 5000] [--ood-pairs 2000] [--no-rl] [--labels both|flipped|clean]
                               [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "warm.yaml"


def held_out_sets(recipe, work: Path, n_validation: int, n_test: int, n_ood: int) -> tuple[Path, Path, Path]:
    """Validation and test preference pairs from the toy world's eval split (never trained on),
    with the recipe's task mix; two generator seeds, so the two sets share no draw. And pairs
    from its `ood` split: the same tasks and preferences on names, items, topics and small talk
    that neither the training nor the eval split uses (WARM's out-of-distribution claim)."""
    from posttrain.toy.tasks import generate

    mix = recipe.datasets["prefs"].toy.mix
    out = []
    for name, seed, split, n in (("validation", 101, "eval", n_validation), ("test", 202, "eval", n_test),
                                 ("ood", 303, "ood", n_ood)):
        path = work / f"held_out_{name}.jsonl"
        rows = generate("mix", n, seed=seed, split=split, fmt="preference", mix=mix)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(path)
    return out[0], out[1], out[2]


def test_accuracies(stage_dir: Path, sets: dict[str, Path], model_path: str, seed: int) -> dict[str, dict]:
    """Per set of pairs (`sets`: name -> file): the pairwise accuracy of every member, the
    average, the ensemble (mean of the members' rewards) and the best member by validation
    accuracy; `by_task` splits the members', the average's and the ensemble's by the pairs' toy
    task (math, instructions, chat). `average_vs_ensemble`: how closely the weight average
    behaves like the prediction ensemble, the correlation of their margins (r_chosen -
    r_rejected) and the fraction of pairs where the two margins agree in sign; WARM's argument is
    that fine-tuned members close to a shared start average in weights as they would in
    predictions. Each model is loaded once and scores every set."""
    from posttrain.modeling import load_tokenizer
    from posttrain.data import load_preference_pairs
    from posttrain.losses.preference import ensemble_scores, pairwise_accuracy
    from posttrain.stages.reward_model import load_reward_model, score_pairs
    from posttrain.training import TrainingSession
    from rewards.reward_model import MEMBERS_FILE

    listing = json.loads((stage_dir / "members" / MEMBERS_FILE).read_text())
    tokenizer = load_tokenizer(model_path)
    pairs = {name: load_preference_pairs(str(path), tokenizer, 128).pairs for name, path in sets.items()}
    session = TrainingSession("fp32", seed)

    def scores(path):
        model = load_reward_model(path, tokenizer.pad_token_id).to(session.device)  # scored only
        return {name: score_pairs(session, model, of_set, tokenizer.pad_token_id, 16384, 64)
                for name, of_set in pairs.items()}

    members = [scores(path) for path in listing["members"]]
    average = scores(str(stage_dir / "model"))
    session.close()
    out = {}
    for name, path in sets.items():
        of_members = [m[name] for m in members]
        chosen = [m for i, m in enumerate(of_members) if i + 1 in listing["averaged"]]
        of_average, ensemble = average[name], ensemble_scores(chosen)
        accs = [pairwise_accuracy(*m) for m in of_members]
        tasks = [json.loads(line)["task"] for line in path.read_text().splitlines()]

        def on(task, chosen_and_rejected):
            keep = [i for i, t in enumerate(tasks) if t == task]
            return pairwise_accuracy(*([side[i] for i in keep] for side in chosen_and_rejected))

        by_task = {task: {"members": [on(task, m) for m in of_members], "average": on(task, of_average),
                          "ensemble": on(task, ensemble)} for task in sorted(set(tasks))}
        margins = [[c - r for c, r in zip(*scored)] for scored in (of_average, ensemble)]
        agree = statistics.fmean((a > 0) == (e > 0) for a, e in zip(*margins))
        out[name] = {"members": accs, "mean": sum(accs) / len(accs), "best": accs[listing["best_member"] - 1],
                     "best_member": listing["best_member"], "average": pairwise_accuracy(*of_average),
                     "ensemble": pairwise_accuracy(*ensemble), "by_task": by_task,
                     "average_vs_ensemble": {"margin_correlation": statistics.correlation(*margins),
                                             "sign_agreement": agree}}
    return out


def reward_model_repeat(manifests: dict, work: Path, seed: int, repeat: int, flip_rate: float,
                        validation: Path, sets: dict[str, Path]) -> dict[str, dict]:
    """The recipe's reward_model stage with its own seed (label flips, probe) and member seeds,
    measured on each of `sets` (`test_accuracies`)."""
    from posttrain.stages.base import StageContext
    from posttrain.stages.reward_model import RewardModelStageConfig, run_reward_model

    base = manifests["rm"]["config"]
    member_seeds = [s + 1000 * repeat for s in (base.get("seeds") or range(1, int(base["members"]) + 1))]
    config = RewardModelStageConfig.model_validate({**base, "label_flip_rate": flip_rate, "seeds": member_seeds,
                                                    "eval_dataset": str(validation), "checkpoint_every": 0})
    label = "clean" if flip_rate == 0 else f"flip{int(flip_rate * 100)}"
    stage_dir = work / f"rm_{label}_{repeat}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name=stage_dir.name, kind="reward_model", stage_dir=stage_dir, run_dir=work,
                       seed=seed + repeat, recipe_name="bench_warm")
    run_reward_model(config, ctx)
    return test_accuracies(stage_dir, sets, base["model"], seed + repeat)


def rl_repeat(manifests: dict, work: Path, stage: str, seed: int, proxy_weight: float | None = None,
              label: str | None = None, proxy_checkpoints: str | None = None, draw: str = "") -> Path:
    """One of the recipe's RL stages again, with another seed; against the same reward models, or
    against `proxy_checkpoints` (another draw of them: `draw` names it); `proxy_weight` rescales
    the proxy reward (the scale-matched run)."""
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import RLStageConfig, run_rl

    config = dict(manifests[stage]["config"])
    rewards = []
    for r in config["rewards"]:
        if r["name"] == "proxy":
            r = {**r, **({"weight": proxy_weight} if proxy_weight is not None else {})}
            if proxy_checkpoints is not None:
                r["kwargs"] = {**r.get("kwargs", {}), "checkpoints": proxy_checkpoints}
        rewards.append(r)
    config["rewards"] = rewards
    stage_dir = work / f"{label or stage}{'_' + draw if draw else ''}_seed{seed}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name=stage, kind="rl", stage_dir=stage_dir, run_dir=work, seed=seed, recipe_name="bench_warm")
    run_rl(RLStageConfig.model_validate(config), ctx)
    return stage_dir


def rl_steps(stage_dir: Path) -> list[dict]:
    """The RL steps' rows of a stage's metrics.jsonl (evaluation rows left out)."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/proxy/mean" in r]


def first_step_proxy_std(stage_dir: Path) -> float:
    """The proxy reward's spread over the first step's samples. Both RL stages start from the
    same policy with the same seed, so their first steps score the very same completions."""
    steps = rl_steps(stage_dir)
    if not steps:
        raise RuntimeError(f"{stage_dir}: no RL step in metrics.jsonl")
    return steps[0]["reward/proxy/std"]


def smoothed(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def rl_curves(stage_dir: Path) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per RL step: the step, proxy and gold reward, and the KL to the start (SFT) model."""
    rows = rl_steps(stage_dir)
    return ([r["step"] for r in rows], [r["reward/proxy/mean"] for r in rows], [r["reward/gold/mean"] for r in rows],
            [r.get("kl_start", float("nan")) for r in rows])


def mean_curves(stage_dirs: list[Path]) -> tuple[list[int], list[float], list[float], list[float]]:
    """`rl_curves` averaged step by step over seeds (runs of the same length): one seed's curve
    swings by more than the difference the plot is meant to show."""
    runs = [rl_curves(d) for d in stage_dirs]
    steps = runs[0][0]
    if any(run[0] != steps for run in runs):
        raise RuntimeError(f"RL runs of different steps cannot be averaged: {', '.join(map(str, stage_dirs))}")
    return (steps, *([statistics.fmean(values) for values in zip(*(run[i] for run in runs))] for i in (1, 2, 3)))


def plot(curves: dict[str, tuple], window: int, path: Path, title: str = "") -> None:
    """Proxy and gold reward per step, and gold against the KL to the start model: a reward model
    with a smaller reward scale pulls the policy away more slowly, so per-step curves alone would
    credit its scale; at equal KL the comparison is of the rewards' quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for label, (steps, proxy, gold, kl) in curves.items():
        axes[0].plot(steps, smoothed(proxy, window), label=label)
        axes[1].plot(steps, smoothed(gold, window), label=label)
        axes[2].plot(smoothed(kl, window), smoothed(gold, window), label=label)
    if title:
        fig.suptitle(title)
    axes[0].set_title(f"proxy reward (its own reward model), mean of {window} steps")
    axes[1].set_title(f"gold reward (true preference), mean of {window} steps")
    axes[2].set_title("gold reward against KL(policy || SFT model)")
    for ax in axes[:2]:
        ax.set_xlabel("RL step")
    axes[2].set_xlabel("KL to the SFT model (nats per sequence)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +/- {sd:.3f}"


def report_accuracy(table: dict[str, list[dict]], title: str) -> dict[str, dict]:
    """Prints one set's accuracies (per label setting, per repetition) and returns the claims:
    WARM against its members' mean, the best member and the prediction ensemble."""
    print(f"\nheld-out pairwise accuracy on {title}")
    print(f"{'labels':<12} {'rep':>3}  {'members':<24} {'mean':>6} {'best':>6} {'WARM':>6} {'ensemble':>9}")
    claims = {}
    for label, rows in table.items():
        for r, row in enumerate(rows):
            print(f"{label:<12} {r:>3}  {' '.join(f'{a:.3f}' for a in row['members']):<24} {row['mean']:6.3f} "
                  f"{row['best']:6.3f} {row['average']:6.3f} {row['ensemble']:9.3f}")
        cols = {k: [row[k] for row in rows] for k in ("mean", "best", "average", "ensemble")}
        print(f"{label:<12} all  mean {mean_sd(cols['mean'])}, best {mean_sd(cols['best'])}, "
              f"WARM {mean_sd(cols['average'])}, ensemble {mean_sd(cols['ensemble'])}")
        gains = {other: [row["average"] - row[other] for row in rows] for other in ("mean", "best", "ensemble")}
        claims[label] = {**{f"warm_minus_{other}": g for other, g in gains.items()},
                         **{f"warm_ge_{other}": statistics.mean(g) >= 0 for other, g in gains.items()}}
        print(f"  {label}: " + "; ".join(f"WARM - {name} {mean_sd(gains[other])} (>= 0 in "
                                         f"{sum(g >= 0 for g in gains[other])}/{len(rows)})"
                                         for other, name in (("mean", "mean of members"), ("best", "best member"),
                                                             ("ensemble", "ensemble"))))
        closeness = [row["average_vs_ensemble"] for row in rows]
        print(f"    WARM against the ensemble: margins correlate at "
              f"{mean_sd([c['margin_correlation'] for c in closeness])}, same sign on "
              f"{mean_sd([c['sign_agreement'] for c in closeness])} of the pairs")
        for task in rows[0]["by_task"]:
            of_task = [row["by_task"][task] for row in rows]
            members_mean = statistics.mean(statistics.mean(t["members"]) for t in of_task)
            warm = statistics.mean(t["average"] for t in of_task)
            print(f"    on {task} pairs: members' mean {members_mean:.3f}, WARM {warm:.3f} ({warm - members_mean:+.3f}), "
                  f"ensemble {statistics.mean(t['ensemble'] for t in of_task):.3f}")
    return claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "warm_bench"), help="work directory")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override key=value")
    parser.add_argument("--window", type=int, default=10, help="steps averaged in the curves")
    parser.add_argument("--repeats", type=int, default=3, help="independent reward-model repetitions per label setting")
    parser.add_argument("--validation-pairs", type=int, default=1000,
                        help="held-out pairs that choose the best member (the stage's eval_dataset)")
    # Math near misses (about a sixth of the toy mix) are at chance for every reward model, so
    # each model's accuracy carries coin-flip noise: about +/-0.006 on 1,000 pairs, the size of
    # the WARM-minus-members differences measured; 5,000 pairs bring it to +/-0.003.
    parser.add_argument("--test-pairs", type=int, default=5000, help="held-out pairs that every number is measured on")
    parser.add_argument("--ood-pairs", type=int, default=2000,
                        help="out-of-distribution pairs (the toy world's ood split) every number is also measured on; "
                             "0: none")
    parser.add_argument("--rl-seeds", type=int, default=3, help="RL seeds (the recipe's, then the next ones)")
    parser.add_argument("--rl-draws", type=int, default=2,
                        help="besides the recipe's reward models, RL also against the best member and average of N "
                             "further flipped-label repetitions (other draws of the reward models; repetition 0 "
                             "repeats the recipe's own)")
    parser.add_argument("--no-rl", action="store_true",
                        help="accuracy only: run the recipe's sft and rm stages, skip every RL run and the plot")
    parser.add_argument("--labels", choices=("both", "flipped", "clean"), default="both",
                        help="which label settings the accuracy repetitions use")
    args = parser.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from posttrain.pipeline.recipe import load_recipe
    from posttrain.pipeline.runner import run_recipe

    t0 = time.perf_counter()
    run_args = [f"output_dir={work / 'run'}", *args.overrides]
    if args.no_rl:  # the two stages the accuracy repetitions build on, one after the other
        manifests = {**run_recipe(RECIPE, run_args, only="sft"), **run_recipe(RECIPE, run_args, only="rm")}
    else:
        manifests = run_recipe(RECIPE, run_args)
    seconds_recipe = time.perf_counter() - t0
    recipe = load_recipe(RECIPE, args.overrides)
    seed = recipe.seed

    # Accuracy claims, over repetitions, measured on test pairs never used for a choice.
    validation, test, ood = held_out_sets(recipe, work, args.validation_pairs, args.test_pairs, args.ood_pairs)
    sets = {"test": test, **({"ood": ood} if args.ood_pairs else {})}
    flip = float(manifests["rm"]["config"]["label_flip_rate"]) or 0.25
    table: dict[str, list[dict]] = {}
    settings = {"flipped": (f"{int(flip * 100)}% flipped", flip), "clean": ("clean", 0.0)}
    for label, rate in (settings.values() if args.labels == "both" else [settings[args.labels]]):
        table[label] = [reward_model_repeat(manifests, work, seed, r, rate, validation, sets)
                        for r in range(args.repeats)]

    print(f"\nrecipes/warm.yaml ran in {seconds_recipe:.0f} s")
    claims = {name: report_accuracy({label: [row[name] for row in rows] for label, rows in table.items()},
                                    f"{n} {'out-of-distribution' if name == 'ood' else 'test'} pairs (best member "
                                    f"chosen on {args.validation_pairs} validation pairs), {args.repeats} repetitions")
              for name, n in (("test", args.test_pairs), ("ood", args.ood_pairs)) if name in sets}

    if args.no_rl:
        (work / "bench_warm.json").write_text(json.dumps({"accuracy": table, "claims": claims}, indent=2))
        print(f"\nnumbers: {work / 'bench_warm.json'}")
        return

    # RL: the recipe's runs, then the same two stages with further seeds. RLOO follows the raw
    # reward, so a reward model with a smaller spread pulls the policy more gently: a third run
    # scales WARM's reward to the best member's spread on the same first-step samples, so that
    # "hacks later" cannot come from the scale alone.
    runs = {"RL vs best member": "rl_best_member", "RL vs WARM": "rl_warm"}
    # Reward-model draws: the recipe's rm stage, then each flipped-label repetition's (its own label
    # flips, probe and member seeds). One draw decides which quirks the best member has and how
    # much of them the average keeps, so the RL claim is measured over draws as well as seeds.
    draws = [("recipe", work / "run" / "rm")]
    if settings["flipped"][0] in table:
        # Repetition 0 has the recipe's seeds and flips: the recipe's draw again. The later ones are new draws.
        draws += [(f"rep{r}", work / f"rm_flip{int(flip * 100)}_{r}") for r in range(1, min(args.rl_draws + 1,
                                                                                            args.repeats))]

    def best_member_of(stage_dir: Path) -> str:
        listing = json.loads((stage_dir / "members" / "members.json").read_text())
        return listing["members"][listing["best_member"] - 1]

    dirs: dict[str, list[tuple[str, int, Path]]] = {label: [] for label in runs}
    for draw, rm_dir in draws:
        for k in range(args.rl_seeds):
            for label, stage in runs.items():
                if draw == "recipe" and k == 0:
                    dirs[label].append((draw, seed, work / "run" / stage))
                    continue
                proxy = None if draw == "recipe" else (best_member_of(rm_dir) if stage == "rl_best_member"
                                                       else str(rm_dir / "model"))
                dirs[label].append((draw, seed + k, rl_repeat(manifests, work, stage, seed + k,
                                                              proxy_checkpoints=proxy, draw=draw)))
    scale = first_step_proxy_std(work / "run" / "rl_best_member") / first_step_proxy_std(work / "run" / "rl_warm")
    scaled = "RL vs WARM x scale"
    dirs[scaled] = [("recipe", seed + k, rl_repeat(manifests, work, "rl_warm", seed + k, proxy_weight=scale,
                                                   label="rl_warm_scaled")) for k in range(args.rl_seeds)]
    print(f"\nWARM's reward scaled by {scale:.2f} in '{scaled}' (the best member's spread over WARM's, "
          "on the first step's samples of the recipe's reward models)")
    print(f"\nRL over {len(draws)} reward-model draws x {args.rl_seeds} seeds (same seeds, same steps): step where "
          "the smoothed gold reward peaks; gold at start/peak/end and its mean over the second half of the run; proxy; "
          "KL to the SFT model at the end")
    summary: dict[str, dict] = {}
    for label, runs_of_label in dirs.items():
        per_run = []
        for draw, run_seed, stage_dir in runs_of_label:
            steps, proxy, gold, kl = rl_curves(stage_dir)
            g, p, d = smoothed(gold, args.window), smoothed(proxy, args.window), smoothed(kl, args.window)
            peak = max(range(len(g)), key=lambda i: g[i])
            late = gold[len(gold) // 2:]
            per_run.append({"draw": draw, "seed": run_seed, "gold_peak_step": steps[peak], "gold_start": g[0],
                            "gold_peak": g[peak], "gold_end": g[-1], "gold_second_half": sum(late) / len(late),
                            "proxy_start": p[0], "proxy_end": p[-1], "kl_end": d[-1]})
            print(f"  {label:<18} {draw:<6} seed {run_seed}: peak at step {steps[peak]:>3}; gold {g[0]:.3f} / "
                  f"{g[peak]:.3f} / {g[-1]:.3f}, second half {per_run[-1]['gold_second_half']:.3f}; "
                  f"proxy {p[0]:.3f} -> {p[-1]:.3f}; KL {d[-1]:.2f}")
        summary[label] = {"runs": per_run, **({"proxy_weight": scale} if label == scaled else {}),
                          **{f"mean_{key}": statistics.mean(s[key] for s in per_run)
                             for key in ("gold_peak_step", "gold_end", "gold_second_half", "kl_end")}}
        print(f"  {label:<18} mean over runs: peak step {summary[label]['mean_gold_peak_step']:.1f}, gold at the end "
              f"{summary[label]['mean_gold_end']:.3f}, gold in the second half {summary[label]['mean_gold_second_half']:.3f}, "
              f"KL at the end {summary[label]['mean_kl_end']:.2f}")
    pairs = list(zip(summary["RL vs WARM"]["runs"], summary["RL vs best member"]["runs"]))
    longer = sum(w["gold_second_half"] >= b["gold_second_half"] for w, b in pairs)
    print(f"\nRL against WARM kept more gold over the second half than against the best member in {longer} of "
          f"{len(pairs)} runs (same draw, same seed)")
    png = work / "warm_rl.png"
    plot({label: mean_curves([d for _, _, d in runs_of_label]) for label, runs_of_label in dirs.items()},
         args.window, png, f"RL on the toy world: each curve is the mean of its runs ({len(dirs['RL vs WARM'])} "
         f"reward-model draws x seeds; x scale: the recipe's reward models, {args.rl_seeds} seeds)")
    (work / "bench_warm.json").write_text(json.dumps({"accuracy": table, "claims": claims, "rl": summary}, indent=2))
    print(f"\nplot: {png}\nnumbers: {work / 'bench_warm.json'}")


if __name__ == "__main__":
    main()
