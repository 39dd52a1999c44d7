"""Rollout throughput: vLLM against transformers `generate`, same model, same prompts, n = 8.

Both engines run side by side in one process through posttrain.rollout (so each includes
prompt rendering and Completion building). Two models: the tiny toy Gemma3 (overhead-bound)
and a ~33M-parameter Gemma3 (hidden 512, 8 layers) where compute dominates. Completions
sample at temperature 1 for a fixed number of tokens (random-init models rarely stop), and
tokens/s counts generated tokens over wall time after one warm-up call per engine.

    python bench/bench_rollout.py                  # both models
    python bench/bench_rollout.py --models tiny --prompts 32 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {
    "tiny": dict(arch="gemma3", hidden_size=128, num_layers=2),
    "33M": dict(arch="gemma3", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                intermediate_size=2048),
}


def build(name: str, root: Path):
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer(root / "tokenizer")
    model = build_tiny_model(TinyModelSpec(**MODELS[name]), tok, root / name)
    return root / name, sum(p.numel() for p in model.parameters())


def throughput(engine, prompts, n, sampling) -> tuple[float, int]:
    engine.generate(prompts[:2], n=2, sampling=sampling)  # warm-up
    start = time.perf_counter()
    groups = engine.generate(prompts, n=n, sampling=sampling)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for g in groups for c in g) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from posttrain.rollout import RolloutConfig, SamplingParams, create_engine
    from posttrain.toy.tasks import generate as toy_rows

    prompts = [row["prompt"] for row in toy_rows("math", args.prompts, seed=0, split="eval", fmt="prompt")]
    # Every completion runs to max_new_tokens (no stop) so both engines generate the same token count.
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0, stop_at_end_of_turn=False)
    print(f"{args.prompts} prompts x n={args.n}, {args.max_new_tokens} new tokens, {os.cpu_count()} CPU cores")
    print(f"{'model':>6} {'params':>8} {'vllm tok/s':>11} {'hf tok/s':>9} {'vllm/hf':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path, params = build(name, Path(tmp))
            vllm = create_engine(str(path), RolloutConfig(backend="vllm", max_model_len=512))
            hf = create_engine(str(path), RolloutConfig(backend="transformers", max_batch_size=args.prompts * args.n))
            v_tps, _ = throughput(vllm, prompts, args.n, sampling)
            h_tps, _ = throughput(hf, prompts, args.n, sampling)
            vllm.close()
            print(f"{name:>6} {params / 1e6:7.2f}M {v_tps:11.0f} {h_tps:9.0f} {v_tps / h_tps:8.2f}")


if __name__ == "__main__":
    main()
