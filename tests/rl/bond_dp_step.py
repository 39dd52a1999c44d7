"""One J-BOND update on fixed completions, run by test_bond_data_parallel.py under torchrun and alone.

    python bond_dp_step.py MODEL_DIR OUT_DIR ALGORITHM [TOKEN_BUDGET|-] [none|fsdp]

Every rank takes its share of the same global batch (4 prompts, each with one policy completion
and k anchor completions, fixed token ids and rewards), runs the rl stage's J-BOND/BOND pass and
one optimizer step through posttrain.training; each rank saves its policy (whole tensors, gathered
from the shards under fsdp) and step statistics.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
from pathlib import Path

import torch

from posttrain.modeling import load_causal_lm, load_tokenizer
from posttrain.rollout.types import Completion
from posttrain.stages.rl import BondBatch, Learner, RLStageConfig, bond_gradient_pass
from posttrain.sharding import full_tensor
from posttrain.training import TrainingSession

PROMPTS = 4


def fixed_batch(tokenizer, k: int):
    rng = random.Random(99)
    low, high = 10, min(400, len(tokenizer) - 1)
    prompts = [[tokenizer.bos_token_id] + [rng.randrange(low, high) for _ in range(rng.randint(3, 9))]
               for _ in range(PROMPTS)]

    def completion():
        # Lengths differ a lot, so a token budget splits the ranks' shares into different micro-batches.
        return Completion(token_ids=[rng.randrange(low, high) for _ in range(rng.choice([1, 2, 9, 14]))], text="",
                          logprobs=[], finish_reason="length")

    policy = [completion() for _ in range(PROMPTS)]
    anchors = [[completion() for _ in range(k)] for _ in range(PROMPTS)]
    rewards = [float(rng.randrange(3)) for _ in range(PROMPTS * (1 + k))]  # small integers: ties happen
    return prompts, policy, anchors, rewards


def main(model_dir: str, out_dir: str, algorithm: str, budget: int | None, sharding: str = "none") -> None:
    out = Path(out_dir)
    session = TrainingSession("fp32", seed=0, sharding=sharding)
    tokenizer = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir)
    anchor = copy.deepcopy(policy)
    with torch.no_grad():  # an anchor apart from the policy, so the log-ratios are not all 0
        for p in anchor.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    anchor = session.place_frozen(anchor, "accelerator", "anchor_placement")  # sharded under fsdp
    policy = session.prepare(policy, learning_rate=1e-2)
    # Plain SGD, as in tests/training/dp_step.py: the update is proportional to the summed gradient.
    session.optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    session.scheduler = torch.optim.lr_scheduler.LambdaLR(session.optimizer, lambda step: 1.0)
    extra = {"bond_n": 3} if algorithm == "bond" else {}
    config = RLStageConfig(model=model_dir, dataset="unused.jsonl", rewards=[{"name": "math"}], algorithm=algorithm,
                           prompts_per_step=PROMPTS, max_tokens_per_microbatch=budget, kl_gamma=0.1, **extra)
    k = config.anchor_samples
    prompts, pol, anchors, rewards = fixed_batch(tokenizer, k)
    mine = session.shard(list(range(PROMPTS)), "prompts")
    batch = BondBatch([prompts[i] for i in mine], [pol[i] for i in mine], [anchors[i] for i in mine],
                      [rewards[i * (1 + k) + j] for i in mine for j in range(1 + k)])
    stats, finite = bond_gradient_pass(Learner(config, session, policy, anchor, None, tokenizer.pad_token_id), batch)
    assert finite
    result = session.step(config.max_grad_norm)
    torch.save({k: full_tensor(v).detach().cpu() for k, v in policy.state_dict().items()},
               out / f"policy_rank{session.rank}.pt")
    (out / f"stats_rank{session.rank}.json").write_text(json.dumps({
        "grad_norm": result.grad_norm, "loss": session.all_sum(stats.loss), "forward": session.all_sum(stats.forward),
        "backward": session.all_sum(stats.backward), "micro_batches": stats.micro_batches,
        **session.describe(PROMPTS, "prompts")}))
    session.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None,
         sys.argv[5] if len(sys.argv) > 5 else "none")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

    # Leave without the interpreter's teardown: gloo's threads can still be unwinding while Python
    # destroys objects at exit, and C++ then aborts ("terminate called without an active exception")
    # after the script has done and written everything (seen once in a CI run of this test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
