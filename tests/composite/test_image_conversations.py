"""Image + text conversations for composite models: the toy vision world's rows, their tokenisation
with the processor, and the image reaching the model."""

from __future__ import annotations

import pytest
import torch
from tiny_recipes import recipe_header, stage

from posttrain.chat import ChatFormatError, tokenize_conversation, tokenize_image_conversation, image_model_inputs
from posttrain.toy.vision import exact_answer_reward, generate_vision

# A tiny composite Gemma 3 checkpoint: language model, vision tower and projector.
TINY_COMPOSITE = ("{tiny: {arch: gemma3, hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
                  "intermediate_size: 128, vision: {}}}")


@pytest.fixture(scope="module")
def processor(composite_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(composite_dir))


def test_the_toy_vision_world_draws_what_its_answers_say(tmp_path):
    from PIL import Image

    from posttrain.toy.vision import COLOURS

    rows = generate_vision("colour", 12, tmp_path, seed=1, fmt="prompt")
    for row in rows:
        image = Image.open(row["prompt"][0]["content"][0]["path"]).convert("RGB")
        assert COLOURS[row["answer"]] in {c for _, c in image.getcolors()}
    counts = generate_vision("count", 12, tmp_path, seed=1, fmt="chat")
    assert {r["messages"][1]["content"] for r in counts} <= {"1", "2", "3", "4"}
    eval_rows = generate_vision("colour", 12, tmp_path, seed=1, split="eval", fmt="prompt")
    assert [r["answer"] for r in eval_rows] != [r["answer"] for r in rows]  # another random stream
    assert exact_answer_reward(prompts=None, completions=["Red.", [{"role": "assistant", "content": "blue"}]],
                               answer=["red", "green"]) == [1.0, 0.0]


def test_an_image_part_becomes_the_processors_image_sequence_and_text_tokenises_as_before(processor, tmp_path):
    row = generate_vision("colour", 1, tmp_path, fmt="chat")[0]
    conv, images = tokenize_image_conversation(processor, row["messages"])
    tok = processor.tokenizer
    assert len(images) == 1 and images[0].size == (32, 32)
    assert conv.input_ids.count(tok.image_token_id) == processor.image_seq_length
    assert conv.input_ids.count(tok.boi_token_id) == 1 and conv.input_ids.count(tok.eoi_token_id) == 1
    # Loss on the answer and its <end_of_turn> only, never on the image.
    trained = [i for i, m in zip(conv.input_ids, conv.loss_mask) if m]
    assert tok.decode(trained) == row["messages"][1]["content"] + "<end_of_turn>"
    text_only = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."}]
    assert tokenize_image_conversation(processor, text_only)[0] == tokenize_conversation(tok, text_only)


def test_image_parts_are_refused_with_the_place_and_the_reason(processor, toy_tokenizer, tmp_path):
    row = generate_vision("colour", 1, tmp_path, fmt="chat")[0]
    with pytest.raises(ChatFormatError, match=r"messages\[0\]\.content\[0\].*'image' part.*text-only"):
        tokenize_conversation(toy_tokenizer, row["messages"])  # a text-only model's data
    remote = [{"role": "user", "content": [{"type": "image", "url": "https://example.org/a.png"}]}]
    with pytest.raises(ChatFormatError, match="remote URL"):
        tokenize_image_conversation(processor, remote)
    missing = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "none.png")}]}]
    with pytest.raises(ChatFormatError, match="cannot read the image"):
        tokenize_image_conversation(processor, missing)


def test_the_image_reaches_the_model_and_changes_its_answer(composite_dir, processor, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(composite_dir)).eval()
    question = "What colour is the shape?"
    logits = {}
    for name, colour in (("red", (220, 40, 40)), ("blue", (40, 80, 220))):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": question}]}]
        conv, images = tokenize_image_conversation(processor, messages, add_generation_prompt=True)
        with torch.no_grad():
            logits[name] = model(**image_model_inputs(processor, conv, images)).logits[0, -1]
    assert not torch.allclose(logits["red"], logits["blue"], atol=1e-4)


def test_sft_on_image_rows_trains_the_tower_only_when_asked(tmp_path):
    from safetensors.torch import load_file

    from posttrain.data import write_jsonl
    from posttrain.pipeline.runner import run_recipe

    write_jsonl(tmp_path / "train.jsonl", generate_vision("colour", 16, tmp_path / "images", fmt="chat"))
    recipe = tmp_path / "recipe.yaml"
    train = {"model": "${models.base}", "dataset": "${datasets.train}", "max_steps": 2, "batch_size": 4,
             "learning_rate": 1.0e-3}
    recipe.write_text(recipe_header("image_sft", output_dir=str(tmp_path / "run"), models={"base": TINY_COMPOSITE},
                                    datasets={"train": f"{{path: {tmp_path / 'train.jsonl'}}}"})
                      + stage("frozen", "sft", **train) + stage("trained", "sft", **train, train_vision_tower=True))
    manifests = run_recipe(recipe)
    assert manifests["trained"]["metrics"]["trained_tokens"] >= 16  # every row's answer
    base = load_file(str(tmp_path / "run" / "_inputs" / "models" / "base" / "model.safetensors"))
    vision = [n for n in base if n.startswith(("vision_tower.", "multi_modal_projector."))]
    frozen = load_file(manifests["frozen"]["outputs"]["model"] + "/model.safetensors")
    trained = load_file(manifests["trained"]["outputs"]["model"] + "/model.safetensors")
    assert all(torch.equal(frozen[n], base[n]) for n in vision)
    # Image rows give the tower gradients: trained when asked, and only then.
    assert any(not torch.equal(trained[n], base[n]) for n in vision if n.startswith("vision_tower."))
    assert not torch.equal(trained["multi_modal_projector.mm_input_projection_weight"],
                           base["multi_modal_projector.mm_input_projection_weight"])


def test_image_rows_for_a_text_only_model_are_an_error_naming_the_row(tmp_path, tiny_gemma3_dir):
    from posttrain.data import DataError, write_jsonl
    from posttrain.stages.base import StageContext
    from posttrain.stages.sft import SFTStageConfig, run_sft

    write_jsonl(tmp_path / "train.jsonl", generate_vision("colour", 2, tmp_path / "images", fmt="chat"))
    ctx = StageContext(name="sft", kind="sft", stage_dir=tmp_path / "sft", run_dir=tmp_path, seed=0, recipe_name="t")
    (tmp_path / "sft").mkdir()
    with pytest.raises(DataError, match=r"train.jsonl:1: .*'image' part"):
        run_sft(SFTStageConfig(model=str(tiny_gemma3_dir), dataset=str(tmp_path / "train.jsonl"), max_steps=1), ctx)


def test_filters_read_the_text_and_pass_image_parts_through_counted(tmp_path):
    import json

    from data_filters.config import FilterConfig
    from data_filters.pipeline import run_filters
    from posttrain.data import write_jsonl

    rows = generate_vision("colour", 3, tmp_path / "images", fmt="chat")
    rows[1]["messages"][0]["content"][1]["text"] = "Mail me at jane.doe@example.com. What colour is it?"
    write_jsonl(tmp_path / "in.jsonl", rows)
    report = run_filters(tmp_path / "in.jsonl", tmp_path / "out", FilterConfig(pii={"mode": "redact"}))
    kept = [json.loads(x) for x in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert report.kept_rows == 3 and report.redacted_rows == 1 and report.image_parts_passed == 3
    assert [r["messages"][0]["content"][0] for r in kept] == [r["messages"][0]["content"][0] for r in rows]
    assert "jane.doe@example.com" not in kept[1]["messages"][0]["content"][1]["text"]


def test_evaluate_answers_image_prompts_with_the_transformers_engine(tmp_path):
    from posttrain.data import write_jsonl
    from posttrain.pipeline.runner import run_recipe

    write_jsonl(tmp_path / "eval.jsonl", generate_vision("colour", 4, tmp_path / "images", split="eval", fmt="prompt"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_header("image_eval", output_dir=str(tmp_path / "run"), models={"base": TINY_COMPOSITE},
                                    datasets={"colours": f"{{path: {tmp_path / 'eval.jsonl'}}}"})
                      + stage("eval", "evaluate", model="${models.base}", datasets={"colours": "${datasets.colours}"},
                              rewards=[{"name": "exact", "fn": "posttrain.toy.vision:exact_answer_reward"}],
                              samples_per_prompt=2, sampling={"max_new_tokens": 4, "temperature": 1.0, "seed": 0},
                              rollout={"backend": "transformers"}, safety=None))
    metrics = run_recipe(recipe)["eval"]["metrics"]
    assert metrics["colours/accuracy_n"] == 4 and 0.0 <= metrics["colours/accuracy"] <= 1.0


def test_image_prompts_on_a_language_model_only_vllm_engine_say_what_to_do(composite_dir, tmp_path):
    from posttrain.rollout import RolloutConfig, RolloutError, create_engine, vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed")
    engine = create_engine(str(composite_dir), RolloutConfig(max_model_len=128))
    try:
        assert engine.language_model_only
        prompt = generate_vision("colour", 1, tmp_path, fmt="prompt")[0]["prompt"]
        with pytest.raises(RolloutError, match="rollout.backend: transformers"):
            engine.generate([prompt])
    finally:
        engine.close()
