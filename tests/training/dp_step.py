"""One `rl` update on fixed completions, run by test_data_parallel.py under torchrun and alone.

    python dp_step.py MODEL_DIR OUT_DIR [TOKEN_BUDGET|-] [sgd|adamw|adamw-sharded] [none|fsdp]

Every rank takes its share of the same global batch (4 prompts x 4 completions with fixed token
ids and rewards), runs the rl stage's policy-gradient pass and one optimizer step through
posttrain.training, then the EMA anchor update; each rank saves its policy and anchor (whole
tensors, gathered from the shards under fsdp) and its statistics.
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
from posttrain.rollout import weights_for_engine
from posttrain.rollout.types import Completion
from posttrain.stages.rl import Learner, RLStageConfig, policy_gradient_pass
from posttrain.sharding import full_tensor, is_sharded
from posttrain.training import TrainingSession
from posttrain.weights import ema_update_

PROMPTS, N = 4, 4


def fixed_batch(tokenizer):
    rng = random.Random(1234)
    low, high = 10, min(400, len(tokenizer) - 1)
    prompts = [[tokenizer.bos_token_id] + [rng.randrange(low, high) for _ in range(rng.randint(3, 9))]
               for _ in range(PROMPTS)]
    # Lengths differ a lot, so a token budget splits the two ranks' shares into different numbers
    # of micro-batches.
    lengths = [1, 2, 3, 2, 14, 12, 16, 9, 2, 3, 1, 4, 1, 2, 2, 1]
    completions = [Completion(token_ids=[rng.randrange(low, high) for _ in range(k)], text="", logprobs=[],
                              finish_reason="length") for k in lengths]
    rewards = [rng.random() for _ in completions]
    return prompts, completions, rewards


def whole(model) -> dict:
    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}


def main(model_dir: str, out_dir: str, budget: int | None, optimizer: str = "sgd", sharding: str = "none") -> None:
    out = Path(out_dir)
    session = TrainingSession("fp32", seed=0, sharding=sharding)
    tokenizer = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir)
    anchor = session.place_frozen(copy.deepcopy(policy), "accelerator", "anchor_placement")
    policy = session.prepare(policy, learning_rate=1e-2, shard_optimizer=optimizer == "adamw-sharded")
    if optimizer == "sgd":
        # Plain SGD for comparisons across launches: the update is then proportional to the summed
        # gradient, so they differ only by float rounding. (Adam's first step divides each gradient
        # by its own magnitude and blows rounding differences on near-zero gradients up to a step.)
        session.optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
        session.scheduler = torch.optim.lr_scheduler.LambdaLR(session.optimizer, lambda step: 1.0)
    config = RLStageConfig(model=model_dir, dataset="unused.jsonl", rewards=[{"name": "math"}], num_generations=N,
                           prompts_per_step=PROMPTS, beta=0.1, max_tokens_per_microbatch=budget)
    prompts, completions, rewards = fixed_batch(tokenizer)
    mine = session.shard(list(range(PROMPTS)), "prompts")
    learner = Learner(config, session, policy, anchor, None, tokenizer.pad_token_id)
    stats, finite = policy_gradient_pass(
        learner, [prompts[i] for i in mine], [completions[i * N + j] for i in mine for j in range(N)],
        [rewards[i * N + j] for i in mine for j in range(N)])
    assert finite
    result = session.step(config.max_grad_norm)
    ema_update_(anchor, policy if is_sharded(policy) else dict(weights_for_engine(policy)), 0.5)
    torch.save(whole(policy), out / f"policy_rank{session.rank}.pt")
    torch.save(whole(anchor), out / f"anchor_rank{session.rank}.pt")
    (out / f"stats_rank{session.rank}.json").write_text(json.dumps({
        "grad_norm": result.grad_norm, "loss": session.all_sum(stats.loss), "micro_batches": stats.micro_batches,
        **session.describe(PROMPTS * N, "sequences")}))
    if is_sharded(policy):
        # The output model, streamed from the shards into files of at most 1 MB (so several).
        from posttrain.sharded_save import save_hf_checkpoint

        save_hf_checkpoint(policy, tokenizer, out / "model", session.is_main, shard_mb=1)
    if optimizer != "sgd":
        # A checkpoint of the (possibly sharded) optimizer, restored into a fresh one.
        from posttrain.training import load_checkpoint, save_checkpoint

        save_checkpoint(session, out, 1, {"policy": policy}, {}, keep=1)
        before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        session.prepare(policy, learning_rate=1e-2, shard_optimizer=optimizer == "adamw-sharded")
        load_checkpoint(session, out / "checkpoints" / "step_000001", {"policy": policy})
        assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
        state = session.optimizer.state_dict() if not session.sharded_optimizer else None
        if state is not None:
            assert len(state["state"]) > 0  # the moments came back
    session.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None,
         sys.argv[4] if len(sys.argv) > 4 else "sgd", sys.argv[5] if len(sys.argv) > 5 else "none")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

    # Leave without the interpreter's teardown: gloo's threads can still be unwinding while Python
    # destroys objects at exit, and C++ then aborts ("terminate called without an active exception")
    # after the script has done and written everything (seen once in a CI run of this test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
