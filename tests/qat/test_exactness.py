"""The weights an engine reads back from each exported file equal, tensor by tensor, the fake-quantised
weights the qat stage trains with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posttrain.modeling import load_policy
from posttrain.quantization import (QuantSpec, attach_fake_quantization, fake_quantize_q4_0, fake_quantize_q8_0,
                                    fake_quantize_weight, quantised_modules)
from posttrain.quantized_export import (GGUFLayout, read_compressed_tensors_weights,
                                        read_gguf_weights, write_compressed_tensors, write_gguf)


def _awkward_weights() -> torch.Tensor:
    """Random rows plus the cases rounding gets wrong: ties, zero blocks, a block whose extreme is positive or
    negative, values just below .5 after scaling."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * 0.05
    w[0, :32] = 0.0
    w[1, :32] = torch.linspace(-1, 1, 32)
    w[2, :32] = -torch.linspace(-1, 1, 32)
    w[3, :32] = torch.arange(32) / 16.0 - 1.0  # exact halves on the Q4_0 grid
    w[4, :32] = torch.full((32,), 0.49999997)
    w[4, 0] = 1.0
    return w


@pytest.mark.parametrize("qtype,fake", [("Q4_0", fake_quantize_q4_0), ("Q8_0", fake_quantize_q8_0)])
def test_torch_block_quantisers_equal_the_gguf_reference_bit_for_bit(qtype, fake):
    from gguf import GGMLQuantizationType, quants

    w = _awkward_weights()
    kind = getattr(GGMLQuantizationType, qtype)
    reference = quants.dequantize(quants.quantize(w.numpy(), kind), kind)
    assert np.array_equal(fake(w).numpy(), reference)


def test_straight_through_estimator_passes_the_gradient_unchanged():
    w = _awkward_weights().requires_grad_(True)
    module = torch.nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        module.weight.copy_(w)
    from torch.nn.utils import parametrize

    from posttrain.quantization import StraightThroughFakeQuant

    parametrize.register_parametrization(module, "weight", StraightThroughFakeQuant(QuantSpec()), unsafe=True)
    assert torch.equal(module.weight, fake_quantize_q4_0(w.detach()))
    x = torch.randn(3, 128)
    module(x).sum().backward()
    latent = module.parametrizations.weight.original
    assert torch.allclose(latent.grad, x.sum(0).expand(48, 128))  # d/dW of sum(x W^T) with Q'(w) taken as 1


def _trained_weights(model, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """{module name: weight as the qat stage's forward sees it}."""
    attach_fake_quantization(model, spec)
    with torch.no_grad():
        return {name: m.weight.detach().clone() for name, m in quantised_modules(model, spec).items()}


def test_gguf_q4_0_holds_exactly_the_weights_int4_per_block_trains_with(tmp_path, tiny_gemma3_dir):
    import gguf

    model, tok = load_policy(tiny_gemma3_dir)
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, GGUFLayout("q4_0"))
    stored = read_gguf_weights(path)
    trained = _trained_weights(model, GGUFLayout("q4_0").spec())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, model.config.num_hidden_layers)
    assert "model.embed_tokens" in trained and "lm_head" in trained  # tied: one token_embd serves both
    checked = 0
    for name, weight in trained.items():
        if name == "lm_head":
            continue
        gguf_name = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        assert torch.equal(torch.from_numpy(stored[gguf_name]), weight), name
        checked += 1
    assert checked == 1 + 7 * model.config.num_hidden_layers


def test_transformers_gguf_loader_reads_back_the_trained_weights(tmp_path, tiny_gemma3_dir):
    from transformers import AutoModelForCausalLM

    model, tok = load_policy(tiny_gemma3_dir)
    write_gguf(model, tok, tmp_path / "m.gguf", GGUFLayout("q4_0"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    trained = _trained_weights(model, GGUFLayout("q4_0").spec())
    loaded_modules = dict(loaded.named_modules())
    for name, weight in trained.items():
        assert torch.equal(loaded_modules[name].weight, weight), name


@pytest.mark.parametrize("scheme,qat_spec", [
    ("int4_per_channel", QuantSpec("int4_per_channel")),
    ("int4_per_group", QuantSpec("int4_per_block", 32, "compressed_tensors")),
    ("fp8", QuantSpec("fp8")),
])
def test_compressed_tensors_holds_exactly_the_weights_the_scheme_trains_with(tmp_path, tiny_gemma3_dir, scheme,
                                                                              qat_spec):
    from transformers import AutoModelForCausalLM

    model, tok = load_policy(tiny_gemma3_dir)
    write_compressed_tensors(model, tok, tmp_path / "ct", scheme, group_size=32)
    stored = read_compressed_tensors_weights(tmp_path / "ct", scheme, group_size=32)
    trained = _trained_weights(model, qat_spec)
    assert set(stored) == set(trained) and "lm_head" not in trained
    for name, weight in trained.items():
        assert torch.equal(stored[name].to(weight.dtype), weight), name
    # and transformers, loading the checkpoint as users do, computes with those same weights
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    ids = torch.tensor([[2, 4, 100, 200, 300]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_fake_quantised_weights_are_on_the_schemes_grid():
    w = _awkward_weights()
    per_channel = fake_quantize_weight(w, QuantSpec("int4_per_channel"))
    assert all(len(torch.unique(row)) <= 16 for row in per_channel)
    per_block = fake_quantize_weight(w, QuantSpec("int4_per_block"))
    assert all(len(torch.unique(block)) <= 16 for block in per_block.reshape(-1, 32))
    fp8 = fake_quantize_weight(w, QuantSpec("fp8"))
    assert not torch.equal(fp8, w) and (fp8 - w).abs().max() < 0.1 * w.abs().max()


def test_export_says_which_files_round_as_the_qat_stage_trained():
    from posttrain.quantized_export import rounds_as_trained

    q4_0 = {"scheme": "int4_per_block", "block_format": "gguf_q4_0", "block_size": 32, "quantize_embeddings": True}
    assert rounds_as_trained(q4_0, "gguf", "q4_0", 32, True)
    assert not rounds_as_trained(q4_0, "gguf", "q4_0", 32, False)  # embeddings rounded in training, f16 in file
    assert not rounds_as_trained(q4_0, "compressed-tensors", "int4_per_group", 32, True)
    group = {"scheme": "int4_per_block", "block_format": "compressed_tensors", "block_size": 32,
             "quantize_embeddings": False}
    assert rounds_as_trained(group, "compressed-tensors", "int4_per_group", 32, True)
    assert not rounds_as_trained(group, "compressed-tensors", "int4_per_group", 128, True)
    fp8 = {"scheme": "fp8", "block_format": "gguf_q4_0", "block_size": 32, "quantize_embeddings": False}
    assert rounds_as_trained(fp8, "compressed-tensors", "fp8", 32, True)
    assert not rounds_as_trained(fp8, "compressed-tensors", "int4_per_channel", 32, True)
