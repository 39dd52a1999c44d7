"""One rank of the sharded weight-sync test, launched by torchrun (see test_sync.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 sync_worker.py MODEL_DIR OUT_DIR

The tiny model is sharded with FSDP2 (`fully_shard` per decoder layer, then the whole model),
plain and with a LoRA adapter, and pushed with `sync_weights` into each rank's own real
transformers engine. Every full tensor the sync assembles is tracked with a weakref finaliser,
so the bytes of full tensors alive at once are measured, whoever holds them. The rank writes
to OUT_DIR/rank{R}.json what it measured and whether the engine then held exactly the
unsharded weights.
"""

import json
import os
import sys
import weakref

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from posttrain.modeling import load_causal_lm
from posttrain.rollout import RolloutConfig, create_engine, sync_weights, weights_for_engine
from posttrain.rollout.sync import WeightStream


class LiveBytes:
    """Bytes of full tensors produced by the sync and not yet freed, and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


def tracked_sync(engine, model, bucket_mb: float, meter: LiveBytes):
    """sync_weights with every tensor the stream assembles counted by `meter`."""
    original = WeightStream._gathered

    def gathered(self, planned):
        name, tensor = original(self, planned)
        meter.track(tensor)
        return name, tensor

    WeightStream._gathered = gathered
    try:
        return sync_weights(engine, model, bucket_mb)
    finally:
        WeightStream._gathered = original


def shard(model):
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def engine_matches(engine, reference: dict[str, torch.Tensor]) -> dict:
    held = engine.model.state_dict()
    return {"shapes_equal": all(tuple(held[n].shape) == tuple(t.shape) for n, t in reference.items()),
            "max_abs_diff": max(float((held[n] - t).abs().max()) for n, t in reference.items())}


def run_case(model_dir: str, lora: bool) -> dict:
    torch.manual_seed(0)  # the same new weights (and adapter) on every rank
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights the engine (built from MODEL_DIR) does not hold yet
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    reference = {n: t.clone() for n, t in weights_for_engine(model)}  # before sharding: the whole tensors
    model = shard(model)
    params = list(model.parameters())
    engine = create_engine(model_dir, RolloutConfig(backend="transformers", verify_sync=False), device="cpu")
    total = sum(t.numel() * t.element_size() for t in reference.values())
    largest = max(t.numel() * t.element_size() for t in reference.values())
    bucket_mb = total / 4 / 2**20  # a quarter of the model
    small = LiveBytes()
    stats = tracked_sync(engine, model, bucket_mb, small)
    after_small = engine_matches(engine, reference)
    whole = LiveBytes()
    tracked_sync(engine, model, 1e6, whole)  # one bucket for everything: the whole-model gather
    return {
        "sharded": all(isinstance(p, DTensor) for p in params),
        "local_param_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
        "model_bytes": total, "largest_tensor_bytes": largest, "bucket_bytes": int(bucket_mb * 2**20),
        "peak_live_bytes": small.peak, "live_after": small.live, "whole_gather_peak_bytes": whole.peak,
        "stats": vars(stats), "names": sorted(reference), **after_small,
        "engine_version": engine.weight_version,
    }


def main(model_dir: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    result = {"plain": run_case(model_dir, lora=False), "lora": run_case(model_dir, lora=True)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
