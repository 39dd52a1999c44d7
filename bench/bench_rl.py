"""Throughput of the `rl` stage against TRL's GRPOTrainer, side by side in one run.

Same tiny Gemma3 model (random init, so both sample completions of nearly the full length),
same toy math prompts in the Gemma IT format, same group size, completion length, temperature,
reward (`rewards.math`, its workers started before the first step on both sides), KL
coefficient (beta = 0.1, so both score a reference/anchor model every step), learning rate and
trainer precision (`--precision`: bf16 mixed precision, TRL's default, or fp32 on both sides).
Measured: completion tokens trained per second over the steps after the first (warm-up) one,
and our per-step time split. Every contender runs in its own fresh process.

TRL's own vLLM path fails on the CPU build of vLLM (its weight push), so TRL runs with
transformers `generate` (under bf16 autocast when bf16). Ours runs with each engine named in
`--engines`: vLLM eager, vLLM compiled (`rollout.enforce_eager: false`; the compile happens at
start-up, outside the timed steps), vLLM compiled with bfloat16 weights (`rollout.dtype`), and
transformers.

    python bench/bench_rl.py                          # bf16 on both sides
    python bench/bench_rl.py --precision fp32
    python bench/bench_rl.py --hidden 512 --layers 8  # 31.9M parameters: compute dominates
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_world(work: Path, hidden: int, layers: int, n_prompts: int):
    from posttrain.data import write_jsonl
    from posttrain.modeling import load_tokenizer
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tasks import generate
    from posttrain.toy.tokenizer import build_toy_tokenizer

    build_toy_tokenizer(work / "tok")
    tok = load_tokenizer(work / "tok")
    spec = TinyModelSpec(hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 64), num_kv_heads=1,
                         head_dim=64, intermediate_size=hidden * 2)
    build_tiny_model(spec, tok, work / "model")
    rows = generate("math", n_prompts, seed=0, split="train", fmt="prompt")
    write_jsonl(work / "prompts.jsonl", rows)
    return rows


def run_ours(work: Path, engine: str, args) -> dict:
    # "vllm-compiled-bf16": vLLM, compiled with torch.compile, weights in bfloat16 inside the engine.
    backend, *variant = engine.split("-")
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import RLStageConfig, run_rl

    stage_dir = work / f"ours_{engine}"
    stage_dir.mkdir()
    cfg = RLStageConfig(
        model=str(work / "model"), dataset=str(work / "prompts.jsonl"), rewards=[{"name": "math"}],
        num_generations=args.group, prompts_per_step=args.prompts, max_steps=args.steps, max_new_tokens=args.length,
        temperature=1.0, beta=0.1, anchor_ema=0.01, learning_rate=1e-5, log_kl_to_start=False, checkpoint_every=0,
        precision=args.precision,
        rollout={"backend": backend, "verify_sync": False, "enforce_eager": "compiled" not in variant,
                 "dtype": "bfloat16" if "bf16" in variant else "float32"})
    ctx = StageContext(name="rl", kind="rl", stage_dir=stage_dir, run_dir=work, seed=0, recipe_name="bench")
    t0 = time.perf_counter()
    run_rl(cfg, ctx)
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # the first step includes one-off warm-up (allocations, kernel selection)
    tokens = sum(r["completion_length"] * args.prompts * args.group for r in timed)
    seconds = sum(r["time/step"] for r in timed)
    split = {k[5:]: sum(r.get(k, 0.0) for r in timed) / seconds for k in
             ("time/generate", "time/reward", "time/train", "time/anchor", "time/sync")}
    return {"name": f"posttrain rl ({engine})", "tokens_per_s": tokens / seconds, "step_s": seconds / len(timed),
            "mean_length": tokens / len(timed) / (args.prompts * args.group), "wall_s": total, "split": split,
            "model_compute_fraction": split["generate"] + split["train"]}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_trl(work: Path, rows: list[dict], args) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.modeling import load_causal_lm, load_tokenizer
    from rewards.math import math_reward, warm_up

    # Conversational prompts: TRL renders them with the tokenizer's chat template (the Gemma one).
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                       for r in rows])
    tok = load_tokenizer(work / "model")
    model = load_causal_lm(work / "model")
    step_times: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    cfg = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=args.length, temperature=1.0, beta=0.1,
        learning_rate=1e-5, max_steps=args.steps, logging_steps=1, report_to="none", use_cpu=not _cuda(),
        save_strategy="no", disable_tqdm=True, seed=0, use_vllm=False, bf16=args.precision == "bf16")
    trainer = GRPOTrainer(model=model, args=cfg, reward_funcs=[math_reward], train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    warm_up()  # ours starts the math-verify workers before its first step; so does TRL's run here
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    timed, timed_len = step_times[1:], lengths[1:]
    tokens = sum(L * args.prompts * args.group for L in timed_len)
    assert trainer.args.bf16 == (args.precision == "bf16")
    return {"name": "TRL GRPOTrainer (transformers generate)", "tokens_per_s": tokens / sum(timed),
            "step_s": sum(timed) / len(timed), "mean_length": sum(timed_len) / len(timed_len), "wall_s": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--length", type=int, default=64, help="max completion tokens")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--engines", default="vllm-compiled-bf16,vllm-compiled,vllm,transformers",
                    help="ours: vllm (eager), vllm-compiled (torch.compile; start-up not timed), vllm-compiled-bf16 "
                    "(also bfloat16 weights in the engine), transformers")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="trainer precision on both sides: bf16 mixed precision (TRL's default) or fp32")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one contender
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        work = Path(args.work)
        if args.worker == "trl":
            from posttrain.data import iter_rows

            result = run_trl(work, [row for _, row in iter_rows(str(work / "prompts.jsonl"))], args)
        else:
            result = run_ours(work, args.worker, args)
        Path(args.json).write_text(json.dumps(result))
        return

    import torch

    from posttrain.rollout import vllm_available

    work = Path(tempfile.mkdtemp(prefix="bench_rl_"))
    build_world(work, args.hidden, args.layers, n_prompts=max(64, args.prompts * args.steps))
    print(f"model: gemma3 hidden {args.hidden} x {args.layers} layers; {args.prompts} prompts x {args.group} "
          f"completions x {args.length} tokens per step; {args.steps} steps (first excluded); trainer precision "
          f"{args.precision} on both sides; torch threads {torch.get_num_threads()}")
    contenders = []
    for engine in args.engines.split(","):
        if engine.startswith("vllm") and not vllm_available():
            print(f"vllm not installed; skipping {engine}")
            continue
        contenders.append(engine)
    # Each contender runs in a fresh process: process-wide state (vLLM's thread and NUMA binding,
    # our malloc settings, allocator caches) must not carry over from one to the next.
    results = []
    for name in contenders + ["trl"]:
        out = work / f"result_{name}.json"
        passthrough = [f"--{k}={getattr(args, k)}" for k in ("steps", "prompts", "group", "length", "hidden", "layers",
                                                              "precision")]
        subprocess.run([sys.executable, __file__, "--worker", name, "--work", str(work), "--json", str(out),
                        *passthrough], check=True)
        results.append(json.loads(out.read_text()))
    trl = results[-1]
    print(f"\n{'run':44s} {'tokens/s':>9s} {'s/step':>7s} {'len':>5s} {'vs TRL':>7s}")
    for r in results:
        print(f"{r['name']:44s} {r['tokens_per_s']:9.1f} {r['step_s']:7.2f} {r['mean_length']:5.1f} "
              f"{r['tokens_per_s'] / trl['tokens_per_s']:6.2f}x")
    for r in results[:-1]:
        split = ", ".join(f"{k} {v:.0%}" for k, v in r["split"].items())
        print(f"{r['name']}: time split {split}; model compute (generate + forward/backward) "
              f"{r['model_compute_fraction']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
