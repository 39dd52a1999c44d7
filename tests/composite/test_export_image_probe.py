"""export's image probe: the reloaded composite checkpoint answers a question about an image through
the processor saved with it, the answer is recorded, and the image reaches the model; a probe
the checkpoint cannot answer (text-only model, no such image, a row without images) is refused
before anything is written, naming the key or the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.data import write_jsonl
from posttrain.stages.base import StageContext, StageError
from posttrain.stages.export import ExportStageConfig, ImageProbe, run_export
from posttrain.toy.vision import QUESTIONS, generate_vision


@pytest.fixture(scope="module")
def red_and_blue(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("probe_images")
    paths = {}
    for name, colour in (("red", (220, 40, 40)), ("blue", (40, 80, 220))):
        Image.new("RGB", (32, 32), colour).save(d / f"{name}.png")
        paths[name] = str(d / f"{name}.png")
    return paths


def _export(tmp_path, model_dir, name: str, recipe_dir=None, **options):
    stage_dir = tmp_path / name
    stage_dir.mkdir()
    ctx = StageContext(name="export", kind="export", stage_dir=stage_dir, run_dir=tmp_path, seed=0, recipe_name="t",
                       recipe_dir=recipe_dir)
    cfg = ExportStageConfig(model=str(model_dir), max_new_tokens=6, require_end_of_turn=False, **options)
    return run_export(cfg, ctx), stage_dir


def _native_greedy(model, processor, image_path: str, question: str, max_new_tokens: int):
    """The reloaded model's last-position logits and greedy new tokens for the question about the
    image, made the way transformers' own documentation does (chat template + processor call)."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.open(image_path).convert("RGB")]], return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"][0].tolist()


def test_the_reloaded_composite_answers_the_image_probe_and_the_image_decides_the_answer(tmp_path, composite_dir,
                                                                                          red_and_blue):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    question = "What colour is it?"
    results = {name: _export(tmp_path, composite_dir, name, image_probe={"image": path, "prompt": question})
               for name, path in red_and_blue.items()}
    export_dir = results["red"][0].outputs["model"]
    model = AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    native = {name: _native_greedy(model, processor, path, question, 6) for name, path in red_and_blue.items()}
    for name, (result, stage_dir) in results.items():
        probe = json.loads((stage_dir / "probe.json").read_text())["image_probe"]
        assert probe["images"] == [red_and_blue[name]] and probe["question"] == question
        assert result.metrics["image_probe_answer"] == probe["answer"][:80]
        assert result.metrics["image_probe_reload_max_logit_diff"] <= 1e-3
        # The stage's answer is the reloaded model's greedy answer given that very image.
        _, new_tokens, native_ids = native[name]
        eos = set(model.generation_config.eos_token_id)
        expected = processor.tokenizer.decode([t for t in new_tokens if t not in eos], skip_special_tokens=False)
        assert probe["answer"] == expected
        assert "Image probe" in (stage_dir / "model" / "README.md").read_text()
    # Both images ask with the same ids; only the pixels differ, and the model's prediction with them
    # (logits), and so the greedy answers the stage recorded (each equal to the native one above).
    assert native["red"][2] == native["blue"][2]
    assert not torch.allclose(native["red"][0], native["blue"][0], atol=1e-4)
    answers = [json.loads((d / "probe.json").read_text())["image_probe"]["answer"] for _, d in results.values()]
    assert answers[0] != answers[1]


def test_the_image_probe_can_be_a_prompt_row_of_the_recipes_data(tmp_path, composite_dir):
    rows = generate_vision("colour", 3, tmp_path / "img", split="eval", fmt="prompt")
    write_jsonl(tmp_path / "eval.jsonl", rows)
    result, stage_dir = _export(tmp_path, composite_dir, "export", image_probe={"dataset": str(tmp_path / "eval.jsonl"),
                                                                               "row": 2})
    probe = json.loads((stage_dir / "probe.json").read_text())["image_probe"]
    assert probe["images"] == [rows[2]["prompt"][0]["content"][0]["path"]]
    assert probe["question"] == QUESTIONS["colour"] and probe["source"].endswith("eval.jsonl:3)")
    assert result.metrics["image_probe_answer"] == probe["answer"][:80]


def test_an_image_probe_is_refused_on_a_text_only_model_and_for_a_missing_image(tmp_path, composite_dir,
                                                                                tiny_gemma3_dir, red_and_blue):
    with pytest.raises(StageError, match=r"image_probe: .* is a text-only model"):
        _export(tmp_path, tiny_gemma3_dir, "text_only", image_probe={"image": red_and_blue["red"]})
    assert not (tmp_path / "text_only" / "model.partial").exists()  # refused before anything was written
    missing = str(tmp_path / "nowhere.png")
    with pytest.raises(StageError, match=rf"image_probe.image: {missing}: no such image file"):
        _export(tmp_path, composite_dir, "missing", image_probe={"image": missing})
    # A relative path is the recipe's, as reward files are: named as resolved when it is not there...
    with pytest.raises(StageError, match=rf"image_probe.image: {tmp_path}/pictures/red.png: no such image file"):
        _export(tmp_path, composite_dir, "relative_missing", tmp_path, image_probe={"image": "pictures/red.png"})
    # ...and read from there when it is.
    red = Path(red_and_blue["red"])
    _, stage_dir = _export(tmp_path, composite_dir, "relative", red.parent.parent, image_probe={
        "image": f"{red.parent.name}/red.png"})
    assert json.loads((stage_dir / "probe.json").read_text())["image_probe"]["images"] == [str(red)]
    write_jsonl(tmp_path / "text.jsonl", [{"prompt": "What is 2 plus 2?"}])
    with pytest.raises(StageError, match=r"text.jsonl:1: expected a 'prompt' of messages with an image part"):
        _export(tmp_path, composite_dir, "text_row", image_probe={"dataset": str(tmp_path / "text.jsonl")})
    with pytest.raises(StageError, match=r"image_probe.row: 5 is past the last row"):
        _export(tmp_path, composite_dir, "past", image_probe={"dataset": str(tmp_path / "text.jsonl"), "row": 5})


def test_an_image_probe_takes_one_source():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of 'image'"):
        ImageProbe()
    with pytest.raises(ValidationError, match="exactly one of 'image'"):
        ImageProbe(image="a.png", dataset="d.jsonl")
    with pytest.raises(ValidationError, match="prompt: a dataset row brings its own question"):
        ImageProbe(dataset="d.jsonl", prompt="What?")
    with pytest.raises(ValidationError, match="row: picks a row of 'dataset'"):
        ImageProbe(image="a.png", row=1)


def test_the_vision_recipes_export_asks_about_a_held_out_image(tmp_path):
    """recipes/vision_toy.yaml's export stage as shipped, on the untrained base (the stage alone)."""
    from posttrain.pipeline.runner import run_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "vision_toy.yaml"
    manifests = run_recipe(recipe, [f"output_dir={tmp_path / 'run'}", "stages.export.model=${models.base}",
                                    "datasets.colour_eval.toy.n=2"], only="export")
    export = manifests["export"]
    probe = json.loads((Path(export["outputs"]["model"]).parent / "probe.json").read_text())["image_probe"]
    assert probe["question"] == QUESTIONS["colour"] and probe["source"].endswith("colour_eval.jsonl:1)")
    assert Path(probe["images"][0]).is_file() and export["metrics"]["image_probe_answer"] == probe["answer"][:80]
    assert export["metrics"]["architecture"] == "Gemma3ForConditionalGeneration"
