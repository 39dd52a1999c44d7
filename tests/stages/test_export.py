"""export: the shipped generation_config stops at the IT end tokens and carries no small answer cap."""

import json

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from posttrain.stages.base import StageContext
from posttrain.stages.export import ExportStageConfig, run_export


def test_generation_config_has_it_stop_tokens_and_no_tiny_answer_budget(tmp_path, tiny_gemma3_dir):
    stage_dir = tmp_path / "export"
    stage_dir.mkdir()
    ctx = StageContext(name="export", kind="export", stage_dir=stage_dir, run_dir=tmp_path, seed=0, recipe_name="t")
    # The probe's own budget is small; it must not leak into what users' generate/vLLM calls get.
    cfg = ExportStageConfig(model=str(tiny_gemma3_dir), max_new_tokens=4, require_end_of_turn=False)
    out = run_export(cfg, ctx).outputs["model"]

    raw = json.loads((stage_dir / "model" / "generation_config.json").read_text())
    assert "max_new_tokens" not in raw
    context = AutoConfig.from_pretrained(out).get_text_config().max_position_embeddings
    assert raw["max_length"] == context
    tok = AutoTokenizer.from_pretrained(out)
    assert raw["eos_token_id"] == [tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("<eos>")]
    loaded = GenerationConfig.from_pretrained(out)
    assert loaded.max_new_tokens is None and loaded.max_length == context
