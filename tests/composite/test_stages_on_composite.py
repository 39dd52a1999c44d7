"""Every stage kind on a composite Gemma 3 checkpoint (Gemma3ForConditionalGeneration: language
model, SigLIP vision tower, projector, processor), as Gemma 3 4B-27B ship, built tiny from a
config. One recipe runs them all through the runner, on text data; the tests then read what each
stage wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.pipeline.runner import run_recipe

TINY = "arch: gemma3, hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 128"
# weight_decay > 0 everywhere it exists: a vision tower left in the optimizer with zero (rather
# than absent) gradients would shrink under AdamW's decay.
RECIPE = """
name: composite
output_dir: {out}
seed: 0
models:
  base: {{tiny: {{{tiny}, vision: {{}}}}}}
  text: {{tiny: {{{tiny}}}}}
datasets:
  chat: {{toy: {{task: math, n: 48, split: train, format: chat}}}}
  prompts: {{toy: {{task: math, n: 16, split: train, format: prompt}}}}
  evalset: {{toy: {{task: math, n: 4, split: eval, format: prompt}}}}
  prefs: {{toy: {{task: chat, n: 32, split: train, format: preference}}}}
stages:
  - {{name: sft, kind: sft, model: "${{models.base}}", dataset: "${{datasets.chat}}", max_steps: 3, batch_size: 4,
      learning_rate: 1.0e-3, weight_decay: 0.1}}
  - name: rloo
    kind: rl
    model: ${{stages.sft.model}}
    dataset: ${{datasets.prompts}}
    rewards: [{{name: math, weight: 1.0}}]
    max_steps: 2
    prompts_per_step: 2
    num_generations: 2
    max_new_tokens: 4
    learning_rate: 1.0e-3
    weight_decay: 0.1
  - {{name: jbond, kind: rl, algorithm: jbond, model: "${{stages.sft.model}}", dataset: "${{datasets.prompts}}",
      rewards: [{{name: math}}], max_steps: 1, prompts_per_step: 2, max_new_tokens: 4, weight_decay: 0.1,
      rollout: {{backend: transformers}}}}
  - {{name: bond, kind: rl, algorithm: bond, bond_n: 2, model: "${{stages.sft.model}}", dataset: "${{datasets.prompts}}",
      rewards: [{{name: math}}], max_steps: 1, prompts_per_step: 2, max_new_tokens: 4, weight_decay: 0.1,
      rollout: {{backend: transformers}}}}
  - {{name: distill_student, kind: distill, model: "${{stages.sft.model}}", teacher: "${{models.text}}",
      dataset: "${{datasets.chat}}", lambda_on_policy: 0.5, max_steps: 2, batch_size: 2, max_new_tokens: 4,
      weight_decay: 0.1, rollout: {{backend: transformers}}}}
  - {{name: distill_teacher, kind: distill, model: "${{models.text}}", teacher: "${{stages.sft.model}}",
      dataset: "${{datasets.chat}}", lambda_on_policy: 0.5, max_steps: 2, batch_size: 2, max_new_tokens: 4,
      rollout: {{backend: transformers}}}}
  - {{name: rm, kind: reward_model, model: "${{stages.sft.model}}", dataset: "${{datasets.prefs}}", members: 2,
      seeds: [1, 2], max_steps: 2, batch_size: 4, max_length: 64, probe_steps: 1}}
  - {{name: merge, kind: merge, method: slerp, init: "${{stages.sft.model}}",
      models: ["${{stages.rloo.model}}", "${{stages.distill_student.model}}"], eta: 0.5}}
  - name: warp
    kind: warp
    model: ${{stages.sft.model}}
    dataset: ${{datasets.prompts}}
    eval_dataset: ${{datasets.evalset}}
    rewards: [{{name: math}}]
    runs: 2
    iterations: 1
    max_steps: 1
    prompts_per_step: 2
    num_generations: 2
    max_new_tokens: 4
    front_etas: [0.5]
    front_kl_samples: 1
    learning_rate: 1.0e-3
    weight_decay: 0.1
    checkpoint_every: 0
    rollout: {{backend: transformers}}
  - {{name: eval, kind: evaluate, model: "${{stages.rloo.model}}", datasets: {{math: "${{datasets.evalset}}"}},
      sampling: {{max_new_tokens: 6}}, safety: null}}
  - {{name: export, kind: export, model: "${{stages.rloo.model}}", max_new_tokens: 6, require_end_of_turn: false}}
"""

TRAINED_FROM_BASE = ("sft",)
TRAINED_FROM_SFT = ("rloo", "jbond", "bond", "distill_student", "merge", "warp", "export")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("composite")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=root / "run", tiny=TINY))
    manifests = run_recipe(recipe)
    return root / "run", manifests


def _tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _vision_names(tensors: dict) -> list[str]:
    return [n for n in tensors if n.startswith(("vision_tower.", "multi_modal_projector."))]


def test_every_stage_kind_completes_on_the_composite_checkpoint(run):
    _, manifests = run
    assert {m["kind"] for m in manifests.values()} == {"sft", "rl", "distill", "reward_model", "merge", "warp",
                                                         "evaluate", "export"}
    assert all(m["status"] == "complete" for m in manifests.values()), {k: m["status"] for k, m in manifests.items()}
    for name in TRAINED_FROM_BASE + TRAINED_FROM_SFT:
        config = json.loads((Path(manifests[name]["outputs"]["model"]) / "config.json").read_text())
        assert config["architectures"] == ["Gemma3ForConditionalGeneration"], name
        assert (Path(manifests[name]["outputs"]["model"]) / "processor_config.json").exists(), name


def test_text_post_training_leaves_the_vision_tower_byte_identical_and_moves_the_language_model(run):
    root, manifests = run
    base = _tensors(root / "_inputs" / "models" / "base")
    sft = _tensors(manifests["sft"]["outputs"]["model"])
    vision = _vision_names(base)
    assert len(vision) > 10
    for name, start in [("sft", base)] + [(n, sft) for n in TRAINED_FROM_SFT]:
        out = _tensors(manifests[name]["outputs"]["model"])
        for t in vision:
            assert out[t].dtype == start[t].dtype and torch.equal(out[t], start[t]), f"{name}: {t} changed"
        moved = [t for t in out if t.startswith("language_model.") and not torch.equal(out[t], start[t])]
        assert moved, f"{name}: no language-model tensor changed, so the stage did not train"


def test_reward_model_trunk_keeps_the_composite_vision_tower(run):
    _, manifests = run
    rm_dir = Path(manifests["rm"]["outputs"]["model"])
    assert json.loads((rm_dir / "config.json").read_text())["architectures"] == ["Gemma3ForSequenceClassification"]
    sft, rm = _tensors(manifests["sft"]["outputs"]["model"]), _tensors(rm_dir)
    for t in _vision_names(sft):
        assert torch.equal(rm[t], sft[t]), t
    from rewards.reward_model import reward_model_reward

    scores = reward_model_reward(prompts=["What is 2 plus 2?"] * 2, completions=["4", "five"], checkpoints=str(rm_dir))
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_distill_takes_the_composite_as_student_and_as_teacher(run):
    _, manifests = run
    for name in ("distill_student", "distill_teacher"):
        rows = [json.loads(x) for x in (Path(manifests[name]["outputs"]["model"]).parent / "metrics.jsonl")
                .read_text().splitlines()]
        assert rows and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows if "loss" in r), name
    text_student = json.loads((Path(manifests["distill_teacher"]["outputs"]["model"]) / "config.json").read_text())
    assert text_student["architectures"] == ["Gemma3ForCausalLM"]


def test_evaluate_reports_accuracy_with_intervals_on_the_composite(run):
    _, manifests = run
    metrics = manifests["eval"]["metrics"]
    assert metrics["math/accuracy_n"] == 4 and 0.0 <= metrics["math/accuracy_ci_low"] <= metrics["math/accuracy_ci_high"]


def test_export_reloads_as_conditional_generation_with_its_processor_and_answers_text_and_images(run):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, manifests = run
    export_dir = manifests["export"]["outputs"]["model"]
    assert manifests["export"]["metrics"]["architecture"] == "Gemma3ForConditionalGeneration"
    model = AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    logits = []
    for image in (red, blue):
        inputs = processor(text=[text], images=[[image]], return_tensors="pt")
        assert (inputs["input_ids"] == processor.tokenizer.image_token_id).sum() == model.config.mm_tokens_per_image
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            logits.append(model(**inputs).logits[0, -1])
        assert out.shape[1] > inputs["input_ids"].shape[1]
    assert not torch.allclose(logits[0], logits[1])  # the image reaches the language model
