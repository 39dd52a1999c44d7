"""LoRA policy with a colocated vLLM engine: `rollout.lora_sync` merged against adapter.

For a Gemma3 of the given size with a LoRA adapter (rank --rank on every projection of every
layer), one stand-in RL step on each engine: sample (--prompts prompts x n=--group, --tokens new
tokens), a REINFORCE-style backward and AdamW step on the adapter, then the sync. Reported per
mode: bytes pushed per sync, sync seconds, generate seconds and whole-step seconds (median of
--steps), and the ratio adapter / merged (merged is the peer: the default).

Merged pushes every weight with the adapter folded in (vLLM's in-place reload); adapter writes
the adapter in peft's format and vLLM loads it as a new LoRA version, whose matmuls it then adds
to every generated token (vLLM's punica kernels; on the CPU these cost more than on GPUs).

    python bench/bench_lora_sync.py                     # 512x8 (about 40M parameters), rank 16
    python bench/bench_lora_sync.py --size 1024x12 --rank 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spec_for(size: str) -> dict:
    hidden, layers = (int(x) for x in size.split("x"))
    heads = max(4, hidden // 64)
    return dict(arch="gemma3", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 2),
                head_dim=max(32, hidden // heads), intermediate_size=4 * hidden)


def run_mode(mode: str, path: Path, tok, args) -> dict:
    import torch
    from bench_weight_sync import random_reward_step
    from peft import LoraConfig, get_peft_model

    from posttrain.modeling import load_causal_lm
    from posttrain.rollout import RolloutConfig, SamplingParams, create_engine, sync_weights
    from posttrain.rollout.prompts import prompt_to_ids
    from posttrain.toy.tasks import generate as toy_rows

    torch.manual_seed(0)
    policy = get_peft_model(load_causal_lm(path), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                             target_modules=TARGETS))
    engine = create_engine(str(path), RolloutConfig(backend="vllm", max_model_len=512, lora_sync=mode,
                                                    max_lora_rank=max(8, args.rank), verify_sync=False))
    prompts = [row["prompt"] for row in toy_rows("math", args.prompts, seed=0, split="eval", fmt="prompt")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.tokens, seed=0, stop_at_end_of_turn=False)
    prompt_ids = [prompt_to_ids(tok, p, "p") for p in prompts for _ in range(args.group)]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    sync_weights(engine, policy)  # warm-up: the first adapter load, the first reload
    rows = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        completions = [c for g in engine.generate(prompts, n=args.group, sampling=sampling) for c in g]
        t1 = time.perf_counter()
        random_reward_step(policy, optimizer, prompt_ids, completions, tok.pad_token_id)
        t2 = time.perf_counter()
        stats = sync_weights(engine, policy)
        t3 = time.perf_counter()
        rows.append({"generate": t1 - t0, "train": t2 - t1, "sync": t3 - t2, "step": t3 - t0, "bytes": stats.bytes})
    engine.close()
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x8", help="hidden x layers of the Gemma3")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_toy_tokenizer(Path(tmp) / "tok")
        model = build_tiny_model(TinyModelSpec(**spec_for(args.size)), tok, Path(tmp) / "model")
        params = sum(p.numel() for p in model.parameters())
        del model
        results = {mode: run_mode(mode, Path(tmp) / "model", tok, args) for mode in ("merged", "adapter")}
    print(f"Gemma3 {args.size} ({params / 1e6:.1f}M parameters), LoRA rank {args.rank} on {', '.join(TARGETS)}; "
          f"{args.prompts} prompts x {args.group} samples x {args.tokens} tokens; median of {args.steps} steps")
    print(f"{'lora_sync':>10} {'MB pushed':>10} {'sync s':>8} {'generate s':>11} {'train s':>8} {'step s':>8}")
    for mode, r in results.items():
        print(f"{mode:>10} {r['bytes'] / 2**20:10.2f} {r['sync']:8.3f} {r['generate']:11.3f} {r['train']:8.3f} "
              f"{r['step']:8.3f}")
    m, a = results["merged"], results["adapter"]
    print(f"adapter / merged: bytes {a['bytes'] / m['bytes']:.4f}, sync time {a['sync'] / m['sync']:.2f}x, "
          f"generate time {a['generate'] / m['generate']:.2f}x, step time {a['step'] / m['step']:.2f}x")


if __name__ == "__main__":
    main()
