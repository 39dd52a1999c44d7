"""SLERP of task vectors, LITI, and the streaming merge of checkpoints (posttrain.weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from posttrain.weights import (CheckpointReader, liti, merge_checkpoints, merge_state_dicts, slerp, task_vector_stats,
                               tensor_group)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _orthogonal_pair(n: int, seed: int, norm: float = 1.0):
    a, b = _rand(n, seed=seed), _rand(n, seed=seed + 1)
    b = b - (a @ b) / (a @ a) * a  # Gram-Schmidt
    return a / a.norm() * norm, b / b.norm() * norm


def _textbook_slerp(init, a, b, lam):
    d1, d2 = (a - init).double(), (b - init).double()
    omega = math.acos(float(d1 @ d2 / (d1.norm() * d2.norm())))
    return (init.double() + math.sin((1 - lam) * omega) / math.sin(omega) * d1
            + math.sin(lam * omega) / math.sin(omega) * d2).float()


def test_slerp_of_equal_norm_task_vectors_keeps_their_norm():
    init = _rand(64, seed=0)
    d1, d2 = _orthogonal_pair(64, seed=1, norm=3.0)
    for lam in (0.25, 0.5, 0.8):
        merged = slerp({"w": init}, [{"w": init + d1}, {"w": init + d2}], lam=lam)["w"]
        assert float((merged - init).norm()) == pytest.approx(3.0, rel=1e-5)
    # Linear averaging of the same orthogonal vectors shrinks the norm by cos(45 deg).
    linear = merge_state_dicts({"w": init}, [{"w": init + d1}, {"w": init + d2}], "linear")["w"]
    assert float((linear - init).norm()) == pytest.approx(3.0 / math.sqrt(2), rel=1e-5)


def test_slerp_equals_linear_interpolation_for_parallel_anti_parallel_and_zero_task_vectors():
    init, d = _rand(32, seed=2), _rand(32, seed=3)
    for other in (2.5 * d, -0.5 * d, torch.zeros(32)):
        models = [{"w": init + d}, {"w": init + other}]
        s = slerp({"w": init}, models, lam=0.3)["w"]
        lin = merge_state_dicts({"w": init}, models, "linear", lam=0.3)["w"]
        assert torch.isfinite(s).all()
        assert torch.allclose(s, lin, atol=1e-6)
    zero = slerp({"w": init}, [{"w": init.clone()}, {"w": init.clone()}])["w"]
    assert torch.equal(zero, init)


def test_three_way_slerp_is_the_recursion_of_its_definition():
    init = _rand(48, seed=4)
    thetas = [init + _rand(48, seed=10 + i) for i in range(3)]
    merged = slerp({"w": init}, [{"w": t} for t in thetas])["w"]
    two = _textbook_slerp(init, thetas[0], thetas[1], 1 / 2)
    expected = _textbook_slerp(init, two, thetas[2], 1 / 3)
    assert torch.allclose(merged, expected, atol=1e-5)


def test_liti_interpolates_towards_init():
    init, merged = {"w": torch.zeros(3)}, {"w": torch.full((3,), 2.0)}
    assert torch.allclose(liti(init, merged, 0.3)["w"], torch.full((3,), 0.6))
    assert torch.equal(liti(init, merged, 0.0)["w"], init["w"])
    with pytest.raises(ValueError, match="eta"):
        liti(init, merged, 1.5)


def _state(seed: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    return {"model.layers.0.proj.weight": _rand(8, 4, seed=seed) + shift,
            "model.layers.1.proj.weight": _rand(8, 4, seed=seed + 1) + shift,
            "model.norm.weight": _rand(4, seed=seed + 2) + shift,
            "model.embed.weight": _rand(16, 4, seed=seed + 3).to(torch.bfloat16),
            "model.position_ids": torch.arange(4)}


def _save(state: dict, d, shards: int = 1):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    if shards == 1:
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d
    names, weight_map = list(state), {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("method,lam,eta", [("slerp", None, 1.0), ("slerp", None, 0.3), ("linear", 0.7, 0.5)])
def test_streaming_merge_equals_the_in_memory_merge_bit_for_bit(tmp_path, method, lam, eta):
    init = _state(0)
    models = [_state(10 + 5 * i) for i in range(3 if lam is None else 2)]
    init_dir = _save(init, tmp_path / "init", shards=2)
    dirs = [_save(m, tmp_path / f"m{i}", shards=1 + i % 2) for i, m in enumerate(models)]
    # A shard limit below the model's size makes the writer produce several shards with an index.
    report = merge_checkpoints(init_dir, dirs, tmp_path / "out", method, lam, eta, max_shard_bytes=200)
    expected = merge_state_dicts(init, models, method, lam, eta)
    reader = CheckpointReader(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "config.json").exists()
    assert sorted(reader.names()) == sorted(expected)
    for name, tensor in expected.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert report["all"]["norms"] and set(report) >= {"model.layers.*.proj.weight", "model.norm.weight", "all"}


def test_merge_names_a_missing_tensor_or_a_shape_mismatch(tmp_path):
    init, a = _state(0), _state(1)
    missing = {k: v for k, v in _state(2).items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        slerp(init, [a, missing])
    misshaped = dict(_state(3), **{"model.layers.1.proj.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.proj\.weight"):
        slerp(init, [a, misshaped])
    init_dir, a_dir = _save(init, tmp_path / "init"), _save(a, tmp_path / "a")
    with pytest.raises(ValueError, match="model.norm.weight"):
        merge_checkpoints(init_dir, [a_dir, _save(missing, tmp_path / "missing")], tmp_path / "out")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.proj\.weight"):
        merge_checkpoints(init_dir, [a_dir, _save(misshaped, tmp_path / "bad")], tmp_path / "out2")


def test_task_vector_statistics_report_angles_and_norms_per_group():
    init = {"model.layers.0.w": torch.zeros(16), "model.layers.1.w": torch.zeros(16)}
    d1, d2 = _orthogonal_pair(16, seed=5, norm=2.0)
    stats = task_vector_stats(init, [{"model.layers.0.w": d1, "model.layers.1.w": d1},
                                     {"model.layers.0.w": d2, "model.layers.1.w": -d1}])
    assert tensor_group("model.layers.12.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
    group = stats["model.layers.*.w"]
    assert group["norms"] == pytest.approx([2 * math.sqrt(2), 2 * math.sqrt(2)], rel=1e-6)
    # layer 0: orthogonal, layer 1: opposite -> the group's cosine is (0 - 4) / 8
    assert group["cosine"] == pytest.approx(-0.5, abs=1e-6)
    assert group["angle_deg"] == pytest.approx(120.0, abs=1e-3)


def test_lora_adapters_are_merged_into_their_base_before_merging(tiny_gemma3_dir, tmp_path):
    from peft import get_peft_model

    from posttrain.modeling import load_causal_lm, load_lora_merged, load_tokenizer
    from posttrain.training import LoraSpec

    adapters = []
    for i in range(2):
        model = get_peft_model(load_causal_lm(tiny_gemma3_dir), LoraSpec(r=2, alpha=4).to_peft_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(_rand(*p.shape, seed=100 * i + len(name)) * 0.1)
        d = tmp_path / f"adapter{i}"
        model.save_pretrained(str(d))
        load_tokenizer(tiny_gemma3_dir).save_pretrained(str(d))
        adapters.append(d)
    report = merge_checkpoints(tiny_gemma3_dir, adapters, tmp_path / "out", "slerp")
    merged_models = [load_lora_merged(d)[0].state_dict() for d in adapters]
    init = load_causal_lm(tiny_gemma3_dir).state_dict()
    reader = CheckpointReader(tmp_path / "out")
    expected = slerp({k: init[k] for k in reader.names()}, [{k: m[k] for k in reader.names()} for m in merged_models])
    for name in reader.names():
        assert torch.equal(reader.get(name), expected[name]), name
    # Only the adapted (linear) weights moved; their task vectors are random and nearly orthogonal.
    assert abs(report["all"]["cosine"]) < 0.2
    assert load_causal_lm(tmp_path / "out") is not None
