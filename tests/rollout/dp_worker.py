"""One rank of the data-parallel rollout test, launched by torchrun (see test_data_parallel.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 dp_worker.py MODEL_DIR OUT_DIR BACKEND

Every rank builds its own engine through `create_engine`, generates greedily for its own
prompts before and after a weight update, and writes what it saw to OUT_DIR/rank{R}.json.
It also runs `gather_in_group` over a gloo group with uneven shares.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from posttrain.modeling import load_causal_lm
from posttrain.rollout import RolloutConfig, SamplingParams, create_engine, weights_for_engine
from posttrain.rollout.parallel import gather_in_group


def prompts_of(rank: int) -> list[str]:
    return [f"rank {rank} asks: what is {rank} + {k}?" for k in range(rank + 1)]  # uneven shares


def main(model_dir: str, out_dir: str, backend: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    engine = create_engine(model_dir, RolloutConfig(backend=backend, max_model_len=256),
                           device="cpu" if backend == "transformers" else None)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(prompts_of(rank), sampling=greedy)
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(123)  # the same new weights on both ranks
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    engine.update_weights(weights_for_engine(model))
    after = engine.generate(prompts_of(rank), sampling=greedy)
    report = {
        "backend": engine.backend,
        "before": [[c.token_ids for c in group] for group in before],
        "after": [[c.token_ids for c in group] for group in after],
        "weight_version": engine.weight_version,
    }
    # How a tensor-parallel group shares prompts: uneven shares, gathered in rank order.
    group, _ = dist.new_subgroups_by_enumeration([[0, 1]], backend="gloo")
    items, mine = gather_in_group([f"r{rank}-{k}" for k in range(rank + 1)], group, 2)
    report["gathered"], report["mine"] = items, [mine.start, mine.stop]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    engine.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

    # Leave without the interpreter's teardown: gloo's threads can still be unwinding while Python
    # destroys objects at exit, and C++ then aborts ("terminate called without an active exception")
    # after the script has done and written everything (seen once in a CI run of this test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
