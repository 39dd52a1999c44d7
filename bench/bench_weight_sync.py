"""Weight-sync time per update against model size, and its share of an RL step.

For Gemma3 models of growing size, with a colocated in-process vLLM engine: the time of
`update_weights(weights_for_engine(model))` (median of 3; with and without the post-update
parameter check), and one stand-in RL step for scale: generate (8 prompts x n=8, 32 tokens),
recompute logprobs with gradient, REINFORCE-style backward, AdamW step, sync. The sync share is
sync / whole step.

    python bench/bench_weight_sync.py
    python bench/bench_weight_sync.py --sizes 128x2 512x8
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


def random_reward_step(policy, optimizer, prompt_ids, completions, pad_token_id: int) -> None:
    """One REINFORCE update of `policy` on its own samples with random rewards: the training work
    between two weight syncs (what it learns does not matter to the timings)."""
    import torch

    from posttrain.scoring import sequence_logprobs

    logps = sequence_logprobs(policy, prompt_ids, [c.token_ids for c in completions], requires_grad=True,
                              pad_token_id=pad_token_id)
    rewards = torch.randn(len(logps))
    loss = -(torch.stack([lp.sum() for lp in logps]) * (rewards - rewards.mean())).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def spec_for(size: str) -> dict:
    hidden, layers = (int(x) for x in size.split("x"))
    heads = max(4, hidden // 64)
    return dict(arch="gemma3", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 2),
                head_dim=max(32, hidden // heads), intermediate_size=4 * hidden)


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["128x2", "256x4", "512x8"], help="hidden x layers")
    args = parser.parse_args()

    import torch

    from posttrain.rollout import RolloutConfig, SamplingParams, create_engine, weights_for_engine
    from posttrain.rollout.prompts import prompt_to_ids
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tasks import generate as toy_rows
    from posttrain.toy.tokenizer import build_toy_tokenizer

    prompts = [row["prompt"] for row in toy_rows("math", 8, seed=0, split="eval", fmt="prompt")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=32, seed=0, stop_at_end_of_turn=False)
    print(f"{'size':>8} {'params':>8} {'MB fp32':>8} {'sync s':>8} {'+check s':>9} {'RL step s':>10} {'sync share':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_toy_tokenizer(Path(tmp) / "tok")
        for size in args.sizes:
            path = Path(tmp) / size
            model = build_tiny_model(TinyModelSpec(**spec_for(size)), tok, path)
            params = sum(p.numel() for p in model.parameters())
            fast = create_engine(str(path), RolloutConfig(backend="vllm", max_model_len=256, verify_sync=False))
            sync = timed(lambda: fast.update_weights(weights_for_engine(model)))
            fast.config = fast.config.model_copy(update={"verify_sync": True})
            sync_checked = timed(lambda: fast.update_weights(weights_for_engine(model)))

            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            prompt_ids = [prompt_to_ids(tok, p, "p") for p in prompts for _ in range(8)]

            def rl_step():
                completions = [c for g in fast.generate(prompts, n=8, sampling=sampling) for c in g]
                random_reward_step(model, optimizer, prompt_ids, completions, tok.pad_token_id)
                fast.update_weights(weights_for_engine(model))

            step = timed(rl_step, repeats=2)
            fast.close()
            print(f"{size:>8} {params / 1e6:7.2f}M {params * 4 / 2**20:8.1f} {sync:8.3f} {sync_checked:9.3f} "
                  f"{step:10.2f} {sync_checked / step:9.1%}")


if __name__ == "__main__":
    main()
