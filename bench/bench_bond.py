"""J-BOND / BOND in the tiny-model world: the paper's claims and their cost, through the `rl` stage.

Every run is the real `rl` stage (tiny random Gemma3, toy math prompts, a length reward defined
below so a random model has something to learn), each in a fresh process:

1. front    J-BOND (jeffreys_beta 0.5) against REINFORCE + RLOO with a KL penalty, beta in
            --betas, at the same number of sampled completions: J-BOND samples 1 policy + 2 anchor
            completions per prompt, so RLOO gets num_generations = 3. Plotted: reward against the
            KL to the starting model, one curve per run (bond_front.png).
2. entropy  J-BOND backward-only (jeffreys_beta 1), forward-only (0) and both (0.5): the policy's
            per-token entropy over steps (bond_entropy.png). Claim: backward-only collapses it,
            forward-only spreads it.
3. cost     seconds per step of J-BOND against RLOO at the same completions per step, with the
            time split (generate / generate_anchor / reward / train / anchor / sync).
4. anchor   how the anchor samples: swap (its weights into the one engine, the policy's back) or a
            second engine; per-step time and the second engine's start-up, per engine in --engines.

Prints a table per part and writes results.json and the PNGs into --out. Where a claim does not
hold at this scale, the summary says so (it does not assert).

    python bench/bench_bond.py                              # all parts, transformers engine
    python bench/bench_bond.py --parts cost,anchor --engines transformers,vllm

Why `anchor_rollout: swap` is the default: the anchor moves after every step (EMA), so both
ways push two weight sets per step (swap: anchor in, policy back; engine: policy to one engine,
anchor to the other) and generate the same samples; a second engine adds its start-up and a
second copy of the weights and KV cache. The `anchor` part measures both; numbers in the
README's BOND section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def brevity(prompts, completions, **columns):
    """1 for an empty completion, 0 at 40 characters or more: learnable from a random model, graded."""
    return [1.0 - min(len(c), 40) / 40.0 for c in completions]


# --- one run, in its own process -----------------------------------------------------------------

def build_world(work: Path, hidden: int, layers: int) -> None:
    from posttrain.data import write_jsonl
    from posttrain.modeling import load_tokenizer
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tasks import generate
    from posttrain.toy.tokenizer import build_toy_tokenizer

    build_toy_tokenizer(work / "tok")
    tok = load_tokenizer(work / "tok")
    spec = TinyModelSpec(hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 64), num_kv_heads=1,
                         head_dim=32, intermediate_size=hidden * 2)
    build_tiny_model(spec, tok, work / "model")
    write_jsonl(work / "prompts.jsonl", generate("math", 256, seed=0, split="train", fmt="prompt"))


def run_one(work: Path, name: str, overrides: dict, args) -> dict:
    """One `rl` stage run; returns its metrics rows and the engine start-up time."""
    from posttrain.rollout import create_engine
    from posttrain.rollout.types import RolloutConfig
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import RLStageConfig, run_rl

    base = dict(model=str(work / "model"), dataset=str(work / "prompts.jsonl"),
                rewards=[{"name": "brevity", "fn": f"{Path(__file__).resolve()}:brevity"}],
                prompts_per_step=args.prompts, max_steps=args.steps, max_new_tokens=args.length, temperature=1.0,
                learning_rate=args.lr, checkpoint_every=0, rollout={"backend": "transformers", "verify_sync": False})
    base.update(overrides)
    cfg = RLStageConfig(**base)
    stage_dir = work / name
    stage_dir.mkdir()
    t0 = time.perf_counter()
    run_rl(cfg, StageContext(name=name, kind="rl", stage_dir=stage_dir, run_dir=work, seed=0, recipe_name="bench"))
    wall = time.perf_counter() - t0
    # What a second engine adds at start-up, measured after the run (libraries already imported).
    t0 = time.perf_counter()
    create_engine(cfg.model, RolloutConfig(**cfg.rollout.model_dump())).close()
    startup = time.perf_counter() - t0
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "overrides": overrides, "rows": rows, "engine_startup_s": startup, "wall_s": wall}


def launch(work: Path, name: str, overrides: dict, args) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--one", name, json.dumps(overrides), "--work", str(work), "--out", str(out),
           "--steps", str(args.steps), "--prompts", str(args.prompts), "--length", str(args.length), "--lr", str(args.lr)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result


# --- summaries -----------------------------------------------------------------------------------

def _tail_mean(rows: list[dict], key: str, frac: float = 0.25) -> float:
    vals = [r[key] for r in rows if key in r]
    tail = vals[-max(1, int(len(vals) * frac)):]
    return sum(tail) / len(tail)


def step_time(rows: list[dict]) -> dict:
    timed = rows[1:] or rows  # the first step carries one-off warm-up
    out = {"step_s": statistics.median(r["time/step"] for r in timed)}
    for phase in ("generate", "generate_anchor", "reward", "train", "anchor", "sync"):
        out[phase] = statistics.median(r.get(f"time/{phase}", 0.0) for r in timed)
    return out


def _running_mean(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def _new_plot(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")  # files only: the bench runs without a display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_front(results: list[dict], path: Path) -> None:
    fig, ax = _new_plot((6, 4.5))
    for res in results:
        rows = res["rows"]
        window = max(1, len(rows) // 8)  # smoothed: one step's reward over 8 prompts is noisy
        kl = _running_mean([r["kl_start"] for r in rows], window)
        rw = _running_mean([r["reward/mean"] for r in rows], window)
        ax.plot(kl, rw, marker="o" if res["name"].startswith("jbond") else ".", markersize=3, label=res["name"])
    _save_plot(fig, ax, path, xlabel="KL(pi || pi_start) per sequence (nats, running mean)",
               ylabel="reward of policy samples (running mean)",
               title="J-BOND vs REINFORCE+RLOO with a KL penalty, same completions/step")


def plot_entropy(results: list[dict], path: Path) -> None:
    fig, ax = _new_plot((6, 4))
    for res in results:
        ax.plot([r["step"] for r in res["rows"]], [r["entropy"] for r in res["rows"]], label=res["name"])
    _save_plot(fig, ax, path, xlabel="step", ylabel="policy entropy per token (nats)",
               title="J-BOND: backward-only vs forward-only vs both")


def main(args) -> None:
    parts = set(args.parts.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench_bond_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_world(work, args.hidden, args.layers)
    report: dict = {"settings": vars(args)}
    claims: list[str] = []
    runs: dict[str, dict] = {}

    def get(name: str, overrides: dict) -> dict:
        if name not in runs:
            runs[name] = launch(work, name, overrides, args)
        return runs[name]

    if "front" in parts or "cost" in parts:
        print("front: J-BOND vs RLOO + KL penalty at 3 completions per prompt", flush=True)
        front = [get("jbond", {"algorithm": "jbond"})]
        for beta in [float(b) for b in args.betas.split(",")]:
            front.append(get(f"rloo_beta{beta:g}", {"algorithm": "rloo", "num_generations": 3, "beta": beta,
                                                     "anchor_ema": 0.02}))
        table = {}
        for res in front:
            rows = res["rows"]
            table[res["name"]] = {"reward_first": _tail_mean(rows[:max(1, len(rows) // 4)], "reward/mean", 1.0),
                                  "reward_last": _tail_mean(rows, "reward/mean"), "kl_start_last": _tail_mean(rows, "kl_start")}
        report["front"] = table
        print(f"{'run':<16}{'reward first':>14}{'reward last':>13}{'KL start last':>15}")
        for name, v in table.items():
            print(f"{name:<16}{v['reward_first']:>14.3f}{v['reward_last']:>13.3f}{v['kl_start_last']:>15.3f}")
        if "front" in parts:
            plot_front(front, out / "bond_front.png")
            j = table["jbond"]
            dominated_by = [n for n, v in table.items() if n != "jbond" and v["reward_last"] >= j["reward_last"]
                            and v["kl_start_last"] <= j["kl_start_last"]]
            claims.append("front: J-BOND " + ("is dominated by " + ", ".join(dominated_by) + " (claim does not hold here)"
                                              if dominated_by else "is not dominated by any RLOO beta (claim holds)"))

    if "cost" in parts:
        cost = {name: step_time(runs[name]["rows"]) for name in ("jbond", "rloo_beta0.1") if name in runs}
        report["cost"] = cost
        print("cost (median seconds per step after the first):")
        for name, v in cost.items():
            print(f"  {name:<14} step {v['step_s']:.3f}  " + "  ".join(f"{k} {v[k]:.3f}" for k in v if k != "step_s"))

    if "entropy" in parts:
        print("entropy: backward-only / forward-only / both", flush=True)
        ent = [get("jbond_backward_only", {"algorithm": "jbond", "jeffreys_beta": 1.0}),
               get("jbond_forward_only", {"algorithm": "jbond", "jeffreys_beta": 0.0}),
               get("jbond", {"algorithm": "jbond"})]
        plot_entropy(ent, out / "bond_entropy.png")
        table = {res["name"]: {"entropy_first": res["rows"][0]["entropy"], "entropy_last": _tail_mean(res["rows"], "entropy")}
                 for res in ent}
        report["entropy"] = table
        for name, v in table.items():
            print(f"  {name:<22} entropy {v['entropy_first']:.3f} -> {v['entropy_last']:.3f}")
        b, f = table["jbond_backward_only"], table["jbond_forward_only"]
        claims.append("entropy: backward-only " + ("collapses" if b["entropy_last"] < b["entropy_first"] else
                                                   "does NOT collapse") + " it, forward-only "
                      + ("spreads" if f["entropy_last"] > f["entropy_first"] else "does NOT spread") + " it")

    if "anchor" in parts:
        print("anchor: swap vs second engine", flush=True)
        anchor = {}
        for engine in args.engines.split(","):
            rollout = {"backend": engine, "verify_sync": False}
            for mode in ("swap", "engine"):
                res = get(f"jbond_{engine}_{mode}", {"algorithm": "jbond", "anchor_rollout": mode, "rollout": rollout,
                                                     "max_steps": args.anchor_steps})
                anchor[f"{engine}/{mode}"] = {**step_time(res["rows"]), "engine_startup_s": res["engine_startup_s"]}
        report["anchor"] = anchor
        for name, v in anchor.items():
            print(f"  {name:<24} step {v['step_s']:.3f}  generate_anchor {v['generate_anchor']:.3f}  "
                  f"sync {v['sync']:.3f}  engine start-up {v['engine_startup_s']:.2f}")

    report["claims"] = claims
    for c in claims:
        print("claim:", c)
    (out / "results.json").write_text(json.dumps({**report, "runs": {n: r["rows"] for n, r in runs.items()}}, indent=1))
    print(f"wrote {out}/results.json and the PNGs")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="front,entropy,cost,anchor")
    p.add_argument("--betas", default="0.01,0.1,1.0", help="RLOO KL coefficients for the front")
    p.add_argument("--engines", default="transformers", help="engines for the anchor comparison: transformers,vllm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--anchor-steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default="bench_bond_out")
    p.add_argument("--one", nargs=2, metavar=("NAME", "OVERRIDES"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        result = run_one(Path(a.work), a.one[0], json.loads(a.one[1]), a)
        Path(a.out).write_text(json.dumps(result))
    else:
        main(a)
