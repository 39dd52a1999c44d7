"""Weight sync a bucket at a time: from an FSDP2-sharded model (torchrun, 2 CPU ranks, gloo) into
each rank's own transformers engine, and the bucket plan itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.modeling import load_causal_lm
from posttrain.rollout import RolloutConfig, create_engine, sync_weights, weights_for_engine
from posttrain.rollout.sync import WeightStream, plan_buckets
from posttrain.rollout.weights import PlannedTensor, engine_tensor_plan

WORKER = Path(__file__).with_name("sync_worker.py")


@pytest.fixture(scope="module")
def sharded_sync(tiny_gemma3_dir, tmp_path_factory, launch_ranks):
    out = tmp_path_factory.mktemp("sync")
    launch_ranks([str(WORKER), str(tiny_gemma3_dir), str(out)], ranks=2, cwd=out, timeout=240)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", ["plain", "lora"])
def test_sharded_sync_holds_one_bucket_of_full_tensors_at_a_time(sharded_sync, case):
    for rank in sharded_sync:
        r = rank[case]
        assert r["sharded"]
        # Measured: the full tensors alive at once never exceed a bucket (here a quarter of the
        # model), or a single tensor when one is larger; the whole-model gather, measured the same
        # way, holds the whole model, and nothing is left alive after the sync.
        assert r["peak_live_bytes"] <= max(r["bucket_bytes"], r["largest_tensor_bytes"])
        assert r["whole_gather_peak_bytes"] == r["model_bytes"] > 3 * r["bucket_bytes"]
        assert r["live_after"] == 0
        assert r["stats"]["buckets"] >= 4


@pytest.mark.parametrize("case", ["plain", "lora"])
def test_sharded_sync_pushes_exactly_the_unsharded_weights(sharded_sync, case):
    for rank in sharded_sync:
        r = rank[case]
        # Sizes come from the whole tensors, not from this rank's shards (half of them here).
        assert r["stats"]["bytes"] == r["model_bytes"]
        assert r["local_param_bytes"] < 0.6 * r["model_bytes"]
        # The engine holds the weights of the model before sharding (LoRA merged), shapes included.
        assert r["shapes_equal"]
        assert r["max_abs_diff"] <= (1e-6 if case == "lora" else 0.0)
        assert r["engine_version"] == 2  # one version per sync, not one per bucket
    assert sharded_sync[0][case]["names"] == sharded_sync[1][case]["names"]


def _planned(name: str, numel: int) -> PlannedTensor:
    return PlannedTensor(name, (numel,), torch.float32, lambda: torch.zeros(numel))


def test_buckets_never_split_a_decoder_layer_and_respect_the_size():
    plan = [_planned("model.embed_tokens.weight", 100)]
    for layer in range(3):
        plan += [_planned(f"model.layers.{layer}.self_attn.{p}.weight", 10) for p in ("q_proj", "k_proj", "v_proj")]
    plan += [_planned("model.norm.weight", 5)]
    buckets = plan_buckets(plan, bucket_bytes=70 * 4)
    names = [[p.name.split(".")[2] if ".layers." in p.name else p.name for p in b] for b in buckets]
    # The embedding is larger than a bucket: alone. Two layers (60 elements) fit in 70; the third
    # layer and the norm make the next bucket.
    assert names == [["model.embed_tokens.weight"], ["0"] * 3 + ["1"] * 3, ["2"] * 3 + ["model.norm.weight"]]


def test_stream_sizes_a_sharded_tensor_by_its_whole_shape(tiny_gemma3_dir):
    """The ZeRO-3 pitfall: a bucket plan must use the unsharded size. A plan entry's size is its
    declared shape's, and a gathered tensor of another shape is refused."""
    wrong = PlannedTensor("model.norm.weight", (128,), torch.float32, lambda: torch.zeros(64))
    with pytest.raises(RuntimeError, match="planned as \\(128,\\) and gathered as \\(64,\\)"):
        list(WeightStream([wrong], bucket_bytes=1 << 20))


def test_unsharded_model_syncs_through_the_same_stream(tiny_gemma3_dir):
    model = load_causal_lm(tiny_gemma3_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    engine = create_engine(str(tiny_gemma3_dir), RolloutConfig(backend="transformers", sync_bucket_mb=0.05))
    stats = sync_weights(engine, model)
    plan = engine_tensor_plan(model)
    assert stats.tensors == len(plan) and stats.buckets > 2
    held = engine.model.state_dict()
    for name, tensor in weights_for_engine(model):
        assert torch.equal(held[name], tensor), name


def test_server_mode_declares_the_stream_to_vllm_without_gathering_anything():
    """The server engine announces names, dtypes and whole shapes before the broadcast; the plan
    gives them without a gather (here a gather would fail). The NCCL broadcast itself needs GPUs."""
    pytest.importorskip("vllm")
    from posttrain.rollout.vllm_server import _StreamedWeights

    def never():
        raise AssertionError("gathered while declaring")

    plan = [PlannedTensor("model.embed_tokens.weight", (1000, 64), torch.bfloat16, never),
            PlannedTensor("model.norm.weight", (64,), torch.float32, never)]
    meta = _StreamedWeights(WeightStream(plan, bucket_bytes=1 << 20)).metadata()
    assert [(m.name, m.dtype, tuple(m.shape)) for m in meta] == [
        ("model.embed_tokens.weight", torch.bfloat16, (1000, 64)), ("model.norm.weight", torch.float32, (64,))]
