"""The qat stage on a tiny Gemma3: fake-quantised training towards the full-precision model."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from posttrain.stages.base import StageContext
from posttrain.stages.qat import QATStageConfig, run_qat


def _ctx(tmp_path, name="qat"):
    stage_dir = tmp_path / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, kind="qat", stage_dir=stage_dir, run_dir=tmp_path, seed=0, recipe_name="t")


def _config(model, data, **kw):
    base = dict(model=str(model), dataset=str(data / "math_chat.jsonl"), eval_dataset=str(data / "math_eval.jsonl"),
                eval_limit=8, max_new_tokens=16, max_steps=12, batch_size=8, learning_rate=1e-4, chunk_size=16)
    return QATStageConfig(**{**base, **kw})


# A finer grid needs a smaller step: Adam moves every latent weight by about the learning rate.
@pytest.mark.parametrize("scheme,learning_rate", [("int4_per_block", 1e-4), ("int4_per_channel", 3e-5), ("fp8", 1e-5)])
def test_qat_lowers_the_quantised_models_kl_to_the_full_precision_model(tmp_path, full_precision_dir, qat_data, scheme,
                                                                       learning_rate):
    result = run_qat(_config(full_precision_dir, qat_data, scheme=scheme, learning_rate=learning_rate), _ctx(tmp_path))
    m = result.metrics
    # "before" is the start checkpoint rounded to nearest (PTQ): the teacher is that checkpoint unquantised
    assert m["eval_kl_teacher_student_before"] > 0
    assert m["eval_kl_teacher_student_after"] < m["eval_kl_teacher_student_before"]
    saved = json.loads((tmp_path / "qat" / "model" / "quantization.json").read_text())
    assert saved["scheme"] == scheme and saved["modules"]
    assert saved["quantize_embeddings"] == (scheme == "int4_per_block")


def test_saved_model_holds_latent_float_weights_with_tied_embeddings(tmp_path, full_precision_dir, qat_data):
    from transformers import AutoModelForCausalLM

    result = run_qat(_config(full_precision_dir, qat_data, max_steps=3), _ctx(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(result.outputs["model"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    w = model.model.layers[0].mlp.down_proj.weight
    assert len(torch.unique(w[0, :32])) > 16  # not rounded onto a 16-level grid: the latent weights


def test_mixture_of_datasets_and_resume_from_checkpoint(tmp_path, full_precision_dir, qat_data):
    mixture = [{"path": str(qat_data / "math_chat.jsonl"), "weight": 3.0},
               {"path": str(qat_data / "chat_chat.jsonl"), "weight": 1.0}]
    straight = run_qat(_config(full_precision_dir, qat_data, dataset=mixture, max_steps=4, eval_dataset=None),
                       _ctx(tmp_path / "a"))
    ctx = _ctx(tmp_path / "b")
    run_qat(_config(full_precision_dir, qat_data, dataset=mixture, max_steps=2, checkpoint_every=1,
                    eval_dataset=None), ctx)
    assert (ctx.stage_dir / "checkpoints").is_dir()
    resumed = run_qat(_config(full_precision_dir, qat_data, dataset=mixture, max_steps=4, checkpoint_every=1,
                              eval_dataset=None), ctx)
    from safetensors.torch import load_file
    a = load_file(f"{straight.outputs['model']}/model.safetensors")
    b = load_file(f"{resumed.outputs['model']}/model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_gguf_q4_0_rejects_a_block_size_its_format_cannot_hold(full_precision_dir, qat_data):
    with pytest.raises(ValidationError, match="block_size"):
        _config(full_precision_dir, qat_data, scheme="int4_per_block", block_size=64)
    cfg = _config(full_precision_dir, qat_data, scheme="int4_per_block", block_size=64, block_format="compressed_tensors")
    assert cfg.quant_spec().block_size == 64
