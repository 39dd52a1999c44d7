"""recipes/quickstart_qat.yaml, shortened, runs end to end and ends in an int4 GGUF that transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_qat_ends_in_a_q4_0_gguf_that_loads_and_answers(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.pipeline.runner import run_recipe

    manifests = run_recipe(ROOT / "recipes" / "quickstart_qat.yaml", [
        f"output_dir={tmp_path / 'run'}", "datasets.chat.toy.n=200", "datasets.math_chat.toy.n=100",
        "datasets.math_prompts_eval.toy.n=4", "stages.sft.max_steps=4", "stages.sft.batch_size=8",
        "stages.qat.max_steps=2", "stages.qat.batch_size=4", "stages.qat.checkpoint_every=0",
        "stages.export.max_new_tokens=4"])
    qat = manifests["qat"]["metrics"]
    assert qat["scheme"] == "int4_per_block" and qat["eval_kl_teacher_student_before"] > 0
    export = manifests["export"]["metrics"]
    assert export["gguf_q4_0_probe_answer"] and export["gguf_q4_0_reload_max_logit_diff"] <= 1e-3
    assert export["gguf_q4_0_rounds_as_trained"] is True  # the qat stage's scheme is the file's
    model_dir = Path(manifests["export"]["outputs"]["model"])
    gguf = model_dir / "model-q4_0.gguf"
    assert gguf.exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf.name,
                                                  config=AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32)
    assert loaded.config.model_type == "gemma3_text"
