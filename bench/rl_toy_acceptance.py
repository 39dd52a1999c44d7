"""Acceptance of the `rl` stage in the tiny-model world: does RL raise held-out accuracy?

1. Build the toy tokenizer and the quickstart's tiny Gemma3 student; finetune it (`sft` stage)
   on toy math and code conversations.
2. From that student, run the `rl` stage with the math verifier on math prompts, and with the
   code sandbox on code prompts; each reports greedy held-out accuracy before and after
   (eval split: prompts never seen in training) and its reward / KL curves.
3. Run math RL with beta = 0 and beta > 0 from the same start and compare how fast the KL to
   the starting model grows.

    python bench/rl_toy_acceptance.py --sft-steps 200 --rl-steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sft_student(work: Path, steps: int, start: str | None = None) -> str:
    from posttrain.data import write_jsonl
    from posttrain.modeling import load_tokenizer
    from posttrain.stages.base import StageContext
    from posttrain.stages.sft import SFTStageConfig, run_sft
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tasks import generate
    from posttrain.toy.tokenizer import build_toy_tokenizer

    if start is None:
        build_toy_tokenizer(work / "tok")
        build_tiny_model(TinyModelSpec(), load_tokenizer(work / "tok"), work / "student_base")
    base = start or str(work / "student_base")
    write_jsonl(work / "sft.jsonl", generate("mix", 3000, seed=0, fmt="chat", mix={"math": 1.0, "code": 1.0}))
    (work / "sft").mkdir()
    ctx = StageContext(name="sft", kind="sft", stage_dir=work / "sft", run_dir=work, seed=0, recipe_name="acceptance")
    t0 = time.perf_counter()
    res = run_sft(SFTStageConfig(model=base, dataset=str(work / "sft.jsonl"), max_steps=steps,
                                 batch_size=32, learning_rate=3e-3, warmup_ratio=0.05,
                                 logging_steps=max(1, min(50, steps // 4))), ctx)
    print(f"sft: {steps} steps in {time.perf_counter() - t0:.0f} s, loss {res.metrics['loss_first']:.3f} -> "
          f"{res.metrics['loss_last']:.3f}", flush=True)
    return res.outputs["model"]


def rl_run(work: Path, name: str, student: str, task: str, args, **overrides) -> dict:
    from posttrain.data import write_jsonl
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import RLStageConfig, run_rl
    from posttrain.toy.tasks import generate

    train, held_out = work / f"{task}_train.jsonl", work / f"{task}_eval.jsonl"
    if not train.exists():
        write_jsonl(train, generate(task, 512, seed=1, split="train", fmt="prompt"))
        write_jsonl(held_out, generate(task, args.eval_prompts, seed=2, split="eval", fmt="prompt"))
    settings = dict(model=student, dataset=str(train), eval_dataset=str(held_out), rewards=[{"name": task}],
                    max_steps=args.rl_steps, prompts_per_step=8, num_generations=args.group, max_new_tokens=48,
                    learning_rate=args.lr, beta=0.1, anchor_ema=0.01, temperature=0.9, checkpoint_every=0,
                    rollout={"backend": args.backend})
    settings.update(overrides)
    stage_dir = work / name
    stage_dir.mkdir()
    ctx = StageContext(name=name, kind="rl", stage_dir=stage_dir, run_dir=work, seed=0, recipe_name="acceptance")
    t0 = time.perf_counter()
    res = run_rl(RLStageConfig(**settings), ctx)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    return {"name": name, "seconds": seconds, "before": res.metrics.get("eval/reward_before"),
            "after": res.metrics.get("eval/reward_after"), "curve": steps}


def print_curve(run: dict, every: int) -> None:
    print(f"\n{run['name']}: held-out accuracy {run['before']:.3f} -> {run['after']:.3f} "
          f"(RL stage wall time {run['seconds']:.0f} s)")
    print(f"  {'step':>4s} {'reward':>7s} {'KL anchor':>9s} {'KL start':>8s} {'entropy':>7s} {'length':>6s}")
    curve = run["curve"]
    # Means over windows of `every` steps: single steps of 32 samples are noisy.
    for i in range(0, len(curve), every):
        w = curve[i:i + every]
        mean = lambda k: sum(r[k] for r in w) / len(w)  # noqa: E731
        print(f"  {w[-1]['step']:4d} {mean('reward/mean'):7.3f} {mean('kl_anchor'):9.3f} {mean('kl_start'):8.3f} "
              f"{mean('entropy'):7.3f} {mean('completion_length'):6.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--beta-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--student", default=None, help="skip SFT and start from this model directory")
    ap.add_argument("--sft-from", default=None, help="run the SFT steps from this model directory")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--only", default="math,code,beta")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rl_acceptance_"))
    student = args.student or sft_student(work, args.sft_steps, args.sft_from)
    runs = []
    for task in ("math", "code"):
        if task in args.only:
            runs.append(rl_run(work, f"rl_{task}", student, task, args))
            print_curve(runs[-1], every=max(1, args.rl_steps // 10))
    if "beta" in args.only:
        for beta in (0.0, 0.1):
            runs.append(rl_run(work, f"rl_math_beta{beta}", student, "math", args, beta=beta,
                               max_steps=args.beta_steps, eval_dataset=None))
        b0, b1 = runs[-2]["curve"], runs[-1]["curve"]
        print("\nKL to the starting model (mean of log pi/pi_start over samples), math RL, same start and data:")
        print(f"  {'step':>4s} {'beta=0':>8s} {'beta=0.1':>8s}")
        for i in range(0, len(b0), max(1, args.beta_steps // 10)):
            print(f"  {b0[i]['step']:4d} {b0[i]['kl_start']:8.3f} {b1[i]['kl_start']:8.3f}")
        last = max(1, len(b0) // 3)
        mean = lambda c: sum(r["kl_start"] for r in c[-last:]) / last  # noqa: E731
        print(f"  mean over the last {last} steps: beta=0 {mean(b0):.3f}, beta=0.1 {mean(b1):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2, default=str))


if __name__ == "__main__":
    main()
