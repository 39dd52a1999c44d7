"""On-policy distillation (GKD, lambda >= 0.5) against supervised KD (lambda = 0) at equal steps,
and the size of the offline teacher cache against full-vocabulary rows.

The tiny-model world: a teacher (a larger tiny Gemma3, SFT-trained for a few minutes on toy
math) and a student (a smaller tiny Gemma3 after a short SFT) share the toy tokenizer. From the
same student checkpoint, the `distill` stage runs once with lambda_on_policy = 0 (supervised
KD on the dataset's sequences) and once per on-policy lambda, same divergence, steps, batch
size and learning rate. Both are scored on held-out prompts (toy split "eval"): KL(teacher ||
student) per token on the student's own samples, and greedy accuracy with the math reward.

    python bench/bench_distill.py                # about 10-20 minutes on 2 CPU cores
    python bench/bench_distill.py --steps 100 --teacher-steps 600 --out runs/bench_distill
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _ctx(root: Path, name: str, seed: int):
    from posttrain.stages.base import StageContext

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").unlink(missing_ok=True)
    return StageContext(name=name, kind=name, stage_dir=d, run_dir=root, seed=seed, recipe_name="bench_distill")


def build_world(root: Path, teacher_steps: int, student_steps: int, seed: int) -> dict[str, str]:
    """Tokenizer, teacher and student checkpoints, and the data files (reused when present)."""
    from posttrain.data import write_jsonl
    from posttrain.modeling import load_tokenizer
    from posttrain.stages.sft import SFTStageConfig, run_sft
    from posttrain.toy import tasks
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    paths = {k: str(root / v) for k, v in {
        "tokenizer": "tokenizer", "teacher_init": "teacher_init", "student_init": "student_init",
        "sft_data": "data/math_chat.jsonl", "prompts": "data/math_prompts.jsonl", "eval": "data/math_eval.jsonl",
        "teacher": "teacher_sft/model", "student": "student_sft/model"}.items()}
    if not Path(paths["tokenizer"]).exists():
        build_toy_tokenizer(paths["tokenizer"], seed=seed)
    tok = load_tokenizer(paths["tokenizer"])
    write_jsonl(paths["sft_data"], tasks.generate("math", 4000, seed=seed, fmt="chat"))
    write_jsonl(paths["prompts"], tasks.generate("math", 512, seed=seed + 1, fmt="chat"))
    write_jsonl(paths["eval"], tasks.generate("math", 256, seed=seed, split="eval", fmt="prompt"))
    if not Path(paths["teacher"]).exists():
        build_tiny_model(TinyModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                                       intermediate_size=768, seed=seed), tok, paths["teacher_init"])
        run_sft(SFTStageConfig(model=paths["teacher_init"], dataset=paths["sft_data"], max_steps=teacher_steps,
                               batch_size=32, learning_rate=1e-3, warmup_ratio=0.05, logging_steps=50),
                _ctx(root, "teacher_sft", seed))
    if not Path(paths["student"]).exists():
        build_tiny_model(TinyModelSpec(hidden_size=128, num_layers=2, seed=seed + 1), tok, paths["student_init"])
        run_sft(SFTStageConfig(model=paths["student_init"], dataset=paths["sft_data"], max_steps=student_steps,
                               batch_size=32, learning_rate=1e-3, warmup_ratio=0.05, logging_steps=50),
                _ctx(root, "student_sft", seed))
    return paths


def distill(paths: dict, root: Path, name: str, lam: float, steps: int, seed: int, args) -> dict:
    from posttrain.stages.distill import DistillStageConfig, run_distill

    cfg = DistillStageConfig(
        model=paths["student"], teacher=paths["teacher"], dataset=paths["prompts"], eval_dataset=paths["eval"],
        eval_limit=args.eval_prompts, eval_teacher=(name == "supervised_kd"), lambda_on_policy=lam,
        divergence=args.divergence, beta=args.beta, max_steps=steps, batch_size=args.batch_size,
        learning_rate=args.lr, max_new_tokens=args.max_new_tokens, rollout={"backend": args.backend})
    started = time.time()
    result = run_distill(cfg, _ctx(root, name, seed))
    return {**result.metrics, "wall_seconds": round(time.time() - started, 1)}


def cache_sizes(paths: dict, root: Path, seed: int) -> dict:
    """Bytes per token of a real cache of the toy world, and the arithmetic for Gemma 3's 262k vocabulary."""
    import shutil

    from posttrain.stages.distill_cache import DistillCacheStageConfig, run_distill_cache
    from posttrain.teacher_cache import bytes_per_token, full_row_bytes

    shutil.rmtree(root / "cache", ignore_errors=True)
    res = run_distill_cache(DistillCacheStageConfig(teacher=paths["teacher"], dataset=paths["prompts"], k=256, limit=256),
                            _ctx(root, "cache", seed))
    gemma_vocab = 262_144
    return {
        "toy_cache": {k: res.metrics[k] for k in ("sequences", "scored_tokens", "k", "vocab_size", "bytes_per_token",
                                                  "stored_bytes_per_token", "full_row_bytes_fp32")},
        "gemma3_vocab_262k": {
            "cache_bytes_per_token_k256": bytes_per_token(256),
            "full_row_bytes_fp32": full_row_bytes(gemma_vocab, 4),
            "full_row_bytes_bf16": full_row_bytes(gemma_vocab, 2),
            "ratio_vs_fp32_row": round(full_row_bytes(gemma_vocab, 4) / bytes_per_token(256), 1),
            "ratio_vs_bf16_row": round(full_row_bytes(gemma_vocab, 2) / bytes_per_token(256), 1),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_distill")
    ap.add_argument("--steps", type=int, default=80, help="distillation steps for every method")
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=60)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0], help="on-policy lambdas to compare with 0")
    ap.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "auto"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    paths = build_world(root, args.teacher_steps, args.student_steps, args.seed)
    runs = {"supervised_kd": distill(paths, root, "supervised_kd", 0.0, args.steps, args.seed, args)}
    for lam in args.lambdas:
        runs[f"on_policy_lambda_{lam:g}"] = distill(paths, root, f"on_policy_lambda_{lam:g}", lam, args.steps, args.seed, args)
    sizes = cache_sizes(paths, root, args.seed)

    base = runs["supervised_kd"]
    print(f"\nteacher accuracy {base.get('accuracy_teacher', float('nan')):.3f}; student before: accuracy "
          f"{base['accuracy_before']:.3f}, KL(T||S) on its samples {base['eval_kl_teacher_student_before']:.3f}")
    print(f"{'method':<24}{'steps':>6}{'KL(T||S)':>10}{'KL(S||T)':>10}{'accuracy':>10}{'KL ratio vs KD':>16}{'seconds':>9}")
    for name, r in runs.items():
        ratio = r["eval_kl_teacher_student_after"] / base["eval_kl_teacher_student_after"]
        print(f"{name:<24}{r['steps']:>6}{r['eval_kl_teacher_student_after']:>10.3f}{r['eval_kl_student_teacher_after']:>10.3f}"
              f"{r['accuracy_after']:>10.3f}{ratio:>16.3f}{r['wall_seconds']:>9.1f}")
    g = sizes["gemma3_vocab_262k"]
    print(f"\ncache, K=256: {g['cache_bytes_per_token_k256']} B/token vs full 262k row {g['full_row_bytes_fp32']} B fp32 "
          f"({g['ratio_vs_fp32_row']}x smaller), {g['full_row_bytes_bf16']} B bf16 ({g['ratio_vs_bf16_row']}x smaller)")
    t = sizes["toy_cache"]
    print(f"toy cache on disk: {t['stored_bytes_per_token']} B per scored token (targets {t['bytes_per_token']} B + ids, "
          f"masks, header) vs {t['full_row_bytes_fp32']} B for a fp32 row of the toy vocabulary")
    (root / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs, "cache": sizes}, indent=2))


if __name__ == "__main__":
    main()
