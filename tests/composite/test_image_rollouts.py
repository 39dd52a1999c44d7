"""Image prompts in the loops that sample and score (rl, distill): prompts whose user turn holds an
image become ImagePrompts, the transformers engine generates from them with the images, and the
learner's, anchor's and teacher's log-probabilities are taken with the same images, so they
depend on the image; the vision tower stays byte-identical through rl and distill."""

from __future__ import annotations

import pytest
import torch
from tiny_recipes import recipe_header, stage

from posttrain.images import ImagePrompt
from posttrain.toy.models import TinyModelSpec, build_tiny_model
from posttrain.toy.vision import generate_vision

@pytest.fixture(scope="module")
def composite(tmp_path_factory, toy_tokenizer):
    """(model, processor, its directory): a tiny composite Gemma 3 built from config."""
    from transformers import AutoProcessor

    d = tmp_path_factory.mktemp("composite_rollouts")
    model = build_tiny_model(TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                           intermediate_size=128, vision={}), toy_tokenizer, d)
    return model.eval(), AutoProcessor.from_pretrained(str(d)), d


def _red_and_blue_prompts(processor, tmp_path):
    """The same question about a red and a blue square, as ImagePrompts (identical ids, other images)."""
    from PIL import Image

    from posttrain.images import tokenize_image_prompt

    prompts = []
    for name, colour in (("red", (220, 40, 40)), ("blue", (40, 80, 220))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{name}.png")
        prompts.append(tokenize_image_prompt(processor, [{"role": "user", "content": [
            {"type": "image", "path": str(tmp_path / f"{name}.png")}, {"type": "text", "text": "What colour?"}]}]))
    return prompts


def test_scoring_conditions_on_the_image_in_every_layout_as_the_engine_does(composite, tmp_path):
    from posttrain.rollout import RolloutConfig, RolloutError, SamplingParams
    from posttrain.rollout.transformers_engine import TransformersEngine
    from posttrain.scoring import score_completions

    model, processor, d = composite
    red, blue = _red_and_blue_prompts(processor, tmp_path)
    assert list(red) == list(blue) and processor.tokenizer.image_token_id in red
    engine = TransformersEngine(str(d), RolloutConfig(max_model_len=128), model=model, tokenizer=processor.tokenizer)
    groups = engine.generate([red], n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=5, seed=0))
    completions = [c.token_ids for c in groups[0]]
    with torch.no_grad():
        flat = score_completions(model, [red, red], completions, 1.0, 0, group_size=1)
        shared = score_completions(model, [red, red], completions, 1.0, 0, group_size=2)
        full = score_completions(model, [red, red], completions, 1.0, 0, chunk_size=None)
        swapped = score_completions(model, [blue, blue], completions, 1.0, 0)
        text_ids = score_completions(model, [list(red)] * 2, completions, 1.0, 0)  # the ids without the images
    torch.testing.assert_close(shared[0], flat[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[0], flat[0], atol=1e-5, rtol=1e-5)
    for i, c in enumerate(groups[0]):  # the engine's logprobs are the trainer's (no drift)
        torch.testing.assert_close(torch.tensor(c.logprobs), flat[0][i, :len(c.token_ids)], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(swapped[0], flat[0], atol=1e-4)
    assert not torch.allclose(text_ids[0], flat[0], atol=1e-4)
    # Image prompts of other lengths generate in one left-padded batch as they do alone.
    longer = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "blue.png")},
                                           {"type": "text", "text": "Look closely: what colour is it, in one word?"}]}]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    together = engine.generate([red, longer], sampling=greedy)
    assert [g[0].token_ids for g in together] == [engine.generate([p], sampling=greedy)[0][0].token_ids
                                                  for p in (red, longer)]
    with pytest.raises(RolloutError, match=r"prompts\[0\]: \d+ tokens with its images.*an image prompt is not cut"):
        engine.generate([red], sampling=SamplingParams(max_new_tokens=125))


def test_distillation_logits_condition_on_the_sequences_images(composite, tmp_path):
    from posttrain.data import TokenSequence
    from posttrain.sequences import pad_batch, shifted_logits

    model, processor, _ = composite
    red, blue = _red_and_blue_prompts(processor, tmp_path)
    answer = processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    logits = {}
    for name, prompt in (("red", red), ("blue", blue)):
        sequence = TokenSequence(prompt + answer, [0] * len(prompt) + [1] * len(answer), prompt)
        with torch.no_grad():
            chunked = shifted_logits(model, pad_batch([sequence], 0), chunk_size=8)
            logits[name] = shifted_logits(model, pad_batch([sequence], 0), chunk_size=None)
        torch.testing.assert_close(chunked.head(chunked.hidden), logits[name], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits["red"][0, -len(answer):], logits["blue"][0, -len(answer):], atol=1e-4)


def test_prompt_loaders_make_image_prompts_with_a_processor_and_refuse_images_without(composite, tmp_path,
                                                                                      toy_tokenizer):
    from posttrain.data import DataError, load_distill_rows, load_prompts, write_jsonl

    _, processor, _ = composite
    write_jsonl(tmp_path / "prompts.jsonl", generate_vision("colour", 3, tmp_path / "img", fmt="prompt"))
    write_jsonl(tmp_path / "chat.jsonl", generate_vision("colour", 2, tmp_path / "img", fmt="chat"))
    rows, ids, _ = load_prompts(str(tmp_path / "prompts.jsonl"), processor.tokenizer, processor=processor)
    assert len(rows) == 3 and all(isinstance(p, ImagePrompt) and len(p.image_parts) == 1 for p in ids)
    assert ids[0].pixel_values().shape == (1, 3, 32, 32)
    prompts, sequences = load_distill_rows(str(tmp_path / "chat.jsonl"), processor.tokenizer, 64, processor)
    assert all(isinstance(p, ImagePrompt) for p in prompts) and all(s.images is not None for s in sequences)
    assert sequences[0].input_ids[:len(prompts[0])] == list(prompts[0])
    with pytest.raises(DataError, match=r"prompts.jsonl:1: .*'image' part"):
        load_prompts(str(tmp_path / "prompts.jsonl"), toy_tokenizer)  # a text-only model's loader
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*over max_length 8"):
        load_distill_rows(str(tmp_path / "chat.jsonl"), processor.tokenizer, 8, processor)


def test_image_prompts_pick_the_transformers_engine_and_refuse_vllm_naming_the_key():
    from posttrain.rollout import RolloutConfig, RolloutError
    from posttrain.rollout.factory import choose_backend

    assert choose_backend(RolloutConfig(), False, False, True, images=True) == "transformers"
    assert choose_backend(RolloutConfig(), False, False, True) == "vllm"
    with pytest.raises(RolloutError, match="rollout.backend: vllm .*images; set rollout.backend: transformers"):
        choose_backend(RolloutConfig(backend="vllm"), False, False, True, images=True)


def test_rl_and_distill_on_image_prompts_train_the_language_model_alone(composite, tmp_path):
    import json

    from safetensors.torch import load_file

    from posttrain.data import write_jsonl
    from posttrain.pipeline.runner import run_recipe

    _, _, model_dir = composite
    write_jsonl(tmp_path / "prompts.jsonl", generate_vision("colour", 8, tmp_path / "img", fmt="prompt"))
    write_jsonl(tmp_path / "chat.jsonl", generate_vision("colour", 8, tmp_path / "img", fmt="chat"))
    # A reward that varies between samples, so that a random model's update is not zero.
    (tmp_path / "varied.py").write_text("def varied(completions, **_):\n"
                                        "    return [float(sum(map(ord, c[0]['content'])) % 7) for c in completions]\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        recipe_header("image_rl", output_dir=str(tmp_path / "run"), models={"base": f"{{path: {model_dir}}}"},
                      datasets={"prompts": f"{{path: {tmp_path / 'prompts.jsonl'}}}",
                                "chat": f"{{path: {tmp_path / 'chat.jsonl'}}}"})
        + stage("rl", "rl", model="${models.base}", dataset="${datasets.prompts}",
                rewards=[{"name": "varied", "fn": "varied.py:varied"}], max_steps=2, prompts_per_step=2,
                num_generations=2, max_new_tokens=4, learning_rate=1.0e-2, log_kl_to_start=True)
        + stage("distill", "distill", model="${models.base}", teacher="${stages.rl.model}",
                dataset="${datasets.chat}", lambda_on_policy=0.5, max_steps=2, batch_size=2, max_new_tokens=3,
                learning_rate=1.0e-2))
    manifests = run_recipe(recipe)  # rollout.backend auto: the transformers engine, for the images
    first_rl_step = json.loads((tmp_path / "run" / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_rl_step["grad_norm"] > 0
    assert first_rl_step["drift_mean_abs"] < 1e-4  # the engine and the learner score with the same images
    distill = manifests["distill"]["metrics"]
    assert distill["fraction_on_policy"] == 0.5 and distill["kl_teacher_student_last"] > 0
    base = load_file(str(model_dir / "model.safetensors"))
    vision = [n for n in base if n.startswith(("vision_tower.", "multi_modal_projector."))]
    language = [n for n in base if n not in vision]
    for name in ("rl", "distill"):
        trained = load_file(manifests[name]["outputs"]["model"] + "/model.safetensors")
        assert vision and all(torch.equal(trained[n], base[n]) for n in vision)
        assert any(not torch.equal(trained[n], base[n]) for n in language)


def test_validate_refuses_image_prompts_for_a_vllm_engine_naming_the_key(tmp_path):
    from posttrain.data import write_jsonl
    from posttrain.pipeline.recipe import RecipeError, load_recipe

    write_jsonl(tmp_path / "prompts.jsonl", generate_vision("colour", 2, tmp_path / "img", fmt="prompt"))
    recipe = tmp_path / "recipe.yaml"
    head = recipe_header("image_vllm", models={"base": "{tiny: {arch: gemma3, vision: {}}}"},
                         datasets={"prompts": f"{{path: {tmp_path / 'prompts.jsonl'}}}"})
    rl = dict(model="${models.base}", dataset="${datasets.prompts}",
              rewards=[{"name": "exact", "fn": "posttrain.toy.vision:exact_answer_reward"}])
    recipe.write_text(head + stage("rl", "rl", **rl, rollout={"backend": "vllm"}))
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: stages.rl.rollout.backend: \$\{datasets.prompts\} "
                                          r"\(dataset\) holds image prompts.*set rollout.backend: transformers"):
        load_recipe(recipe)
    recipe.write_text(head + stage("rl", "rl", **rl))  # auto: the transformers engine, chosen at run time
    load_recipe(recipe)


def test_an_image_column_is_mapped_into_the_user_turn_from_parquet_bytes_and_jsonl_paths(composite, tmp_path):
    import io

    import datasets
    from PIL import Image

    from posttrain.data import DataError, load_prompts, materialize_dataset, read_rows, write_jsonl
    from posttrain.pipeline.recipe import DatasetEntry

    _, processor, _ = composite
    encoded = []
    for colour in ((220, 40, 40), (40, 80, 220)):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    datasets.Dataset.from_dict({"question": ["What colour?"] * 2, "picture": encoded, "label": ["red", "blue"]}
                               ).to_parquet(str(tmp_path / "set.parquet"))
    entry = DatasetEntry.model_validate({"path": str(tmp_path / "set.parquet"), "columns": {
        "prompt": {"from": "question", "image": "picture"}, "answer": "label"}})
    materialize_dataset(str(tmp_path / "set.parquet"), entry.load_options(), tmp_path / "out" / "set.jsonl", "datasets.s",
                        "id")
    rows = read_rows(tmp_path / "out" / "set.jsonl")
    assert rows[1]["answer"] == "blue" and rows[1]["prompt"][0]["content"][1] == {"type": "text", "text": "What colour?"}
    assert Image.open(rows[1]["prompt"][0]["content"][0]["path"]).getpixel((0, 0)) == (40, 80, 220)
    _, ids, _ = load_prompts(str(tmp_path / "out" / "set.jsonl"), processor.tokenizer, processor=processor)
    assert not torch.equal(ids[0].pixel_values(), ids[1].pixel_values())

    # A JSONL file of conversations whose image column holds paths relative to the file.
    Image.new("RGB", (32, 32), (40, 170, 60)).save(tmp_path / "green.png")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Colour?"},
                                                        {"role": "assistant", "content": "green"}], "img": "green.png"},
                                          {"messages": [{"role": "user", "content": "Colour?"}], "img": "none.png"}])
    options = DatasetEntry.model_validate({"path": "chat.jsonl", "columns": {"messages": {"from": "messages",
                                                                                          "image": "img"}}}).load_options()
    with pytest.raises(DataError, match=r"datasets.c.columns.messages.image \(column 'img'\): image file 'none.png' "
                                        r"not found .*\(source row 1\)"):
        materialize_dataset(str(tmp_path / "chat.jsonl"), options, tmp_path / "out" / "chat.jsonl", "datasets.c", "id")
    options["limit"] = 1
    materialize_dataset(str(tmp_path / "chat.jsonl"), options, tmp_path / "out" / "chat.jsonl", "datasets.c", "id")
    (row,) = read_rows(tmp_path / "out" / "chat.jsonl")
    assert row["messages"][0]["content"] == [{"type": "image", "path": str((tmp_path / "green.png").resolve())},
                                             {"type": "text", "text": "Colour?"}]


def test_warp_scores_held_out_image_prompts_with_their_images(composite, tmp_path):
    """WARP's point evaluator reads image prompts through the model's processor and samples them
    on the transformers engine (auto), instead of failing with the text-only error."""
    from posttrain.data import write_jsonl
    from posttrain.rollout.transformers_engine import TransformersEngine
    from posttrain.stages.rl.warp import PointEvaluator, WarpStageConfig

    _, _, model_dir = composite
    write_jsonl(tmp_path / "prompts.jsonl", generate_vision("colour", 4, tmp_path / "img", fmt="prompt"))
    config = WarpStageConfig(model=str(model_dir), dataset=str(tmp_path / "prompts.jsonl"),
                             eval_dataset=str(tmp_path / "prompts.jsonl"), rewards=[{"name": "exact", "fn": "posttrain.toy.vision:exact_answer_reward"}])
    evaluator = PointEvaluator(config, str(model_dir), None, torch.device("cpu"))
    try:
        assert evaluator.ids and all(isinstance(p, ImagePrompt) and p.image_parts for p in evaluator.ids)
        assert isinstance(evaluator.engine, TransformersEngine)
    finally:
        evaluator.engine.close()
