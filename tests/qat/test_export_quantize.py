"""export's quantize: quantised copies beside the full-precision checkpoint, each reloaded and probed."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from posttrain.stages.base import StageContext, StageError
from posttrain.stages.export import ExportStageConfig, run_export


def _ctx(tmp_path):
    stage_dir = tmp_path / "export"
    stage_dir.mkdir()
    return StageContext(name="export", kind="export", stage_dir=stage_dir, run_dir=tmp_path, seed=0, recipe_name="t")


def test_export_writes_gguf_and_compressed_tensors_copies_that_reload_and_answer(tmp_path, full_precision_dir):
    cfg = ExportStageConfig(model=str(full_precision_dir), require_end_of_turn=False, max_new_tokens=8, quantize=[
        {"format": "gguf", "type": "q4_0"}, {"format": "gguf", "type": "q8_0"},
        {"format": "compressed-tensors", "scheme": "int4_per_channel"},
        {"format": "compressed-tensors", "scheme": "fp8"}])
    result = run_export(cfg, _ctx(tmp_path))
    out = tmp_path / "export" / "model"
    assert (out / "model.safetensors").exists() and (out / "model-q4_0.gguf").exists()
    assert json.loads((out / "compressed-tensors-fp8" / "config.json").read_text())["quantization_config"][
        "quant_method"] == "compressed-tensors"
    m = result.metrics
    for label in ("gguf_q4_0", "gguf_q8_0", "compressed_tensors_int4_per_channel", "compressed_tensors_fp8"):
        assert m[f"{label}_reload_max_logit_diff"] <= 1e-3
        assert m[f"{label}_probe_answer"]
    # Q4_0 stores 4.5 bits per weight, Q8_0 8.5: the int4 file is well under the int8 one
    assert m["gguf_q4_0_bytes"] < 0.7 * m["gguf_q8_0_bytes"]


def test_gguf_holds_its_own_tokenizer(tmp_path, full_precision_dir):
    """llama.cpp needs nothing but the file: the tokenizer read from it alone encodes like the checkpoint's."""
    import shutil

    from transformers import AutoTokenizer

    from posttrain.chat import tokenize_prompt
    from posttrain.modeling import load_policy
    from posttrain.quantized_export import GGUFLayout, write_gguf

    model, tok = load_policy(full_precision_dir)
    alone = tmp_path / "alone"
    alone.mkdir()
    write_gguf(model, tok, alone / "m.gguf", GGUFLayout("q4_0"))
    assert sorted(p.name for p in alone.iterdir()) == ["m.gguf"]
    from_file = AutoTokenizer.from_pretrained(str(alone), gguf_file="m.gguf")
    for text in ("What is 12 + 7?", "Write a Python function that reverses a list.", "  spaces\tand\nnewlines"):
        assert tokenize_prompt(from_file, text) == tokenize_prompt(tok, text)
    shutil.rmtree(alone)


def test_a_quantize_entry_without_its_type_is_refused():
    with pytest.raises(ValidationError, match="type"):
        ExportStageConfig(model="m", quantize={"format": "gguf"})
    with pytest.raises(ValidationError, match="scheme"):
        ExportStageConfig(model="m", quantize={"format": "compressed-tensors"})


def test_gguf_export_of_a_non_gemma3_model_fails_loudly(tmp_path, tiny_llama_dir):
    cfg = ExportStageConfig(model=str(tiny_llama_dir), require_end_of_turn=False, max_new_tokens=4,
                            quantize={"format": "gguf", "type": "q4_0"})
    with pytest.raises(StageError, match="Gemma 3"):
        run_export(cfg, _ctx(tmp_path))
