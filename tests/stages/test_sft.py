"""The sft stage on real TRL training: chat and prompt/completion rows, LoRA, skipped rows."""

import json
from pathlib import Path

import torch

from posttrain.pipeline.runner import run_recipe


def test_loss_falls_on_a_learnable_task(write_recipe, tiny_sft):
    text = tiny_sft.replace("max_steps: 4", "max_steps: 30").replace("learning_rate: 1.0e-3", "learning_rate: 3.0e-3")
    m = run_recipe(write_recipe(text))["sft"]["metrics"]
    assert m["loss_last"] < 0.5 * m["loss_first"]


def test_prompt_completion_rows_and_skipped_invalid_rows(write_recipe, tiny_sft, tmp_path):
    data = tmp_path / "pc.jsonl"
    rows = [{"prompt": "Hi", "completion": "Hello."}] * 8 + [{"prompt": "x"}, {"messages": []}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = tiny_sft.replace("mix: {toy: {task: chat, n: 64, format: chat}}", f"mix: {{path: {data}}}")
    text += "    on_invalid_row: skip\n"
    m = run_recipe(write_recipe(text))["sft"]
    assert m["metrics"]["rows"] == 8 and m["metrics"]["rows_skipped"] == 2
    skipped = [json.loads(l) for l in (Path(m["outputs"]["model"]).parent / "skipped.jsonl").read_text().splitlines()]
    assert [s["where"].rsplit(":", 1)[1] for s in skipped] == ["9", "10"]
    assert "non-empty list" in skipped[1]["reason"]


def test_lora_sft_exports_a_merged_plain_checkpoint(write_recipe, tiny_sft):
    text = tiny_sft + "    lora: {r: 4, alpha: 8}\n"
    m = run_recipe(write_recipe(text))["sft"]
    out = Path(m["outputs"]["model"])
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.isfinite(next(model.parameters())).all()


def test_the_last_loss_is_logged_when_max_steps_is_below_logging_steps(write_recipe, tiny_sft):
    text = tiny_sft.replace("max_steps: 4", "max_steps: 3").replace("logging_steps: 1", "logging_steps: 10")
    m = run_recipe(write_recipe(text))["sft"]
    assert m["metrics"]["loss_last"] is not None and m["metrics"]["steps"] == 3
    steps = [json.loads(line)["step"] for line in (Path(m["outputs"]["model"]).parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]


def test_num_train_epochs_sets_the_length_and_eval_dataset_gives_a_held_out_loss(write_recipe, tiny_sft):
    # 64 rows, 8 per step: one epoch is 8 steps, whatever max_steps says.
    text = tiny_sft.replace("datasets:\n", "datasets:\n  held_out: {toy: {task: chat, n: 16, format: chat, split: eval}}\n")
    text += "    num_train_epochs: 1\n    eval_dataset: ${datasets.held_out}\n    eval_steps: 4\n"
    m = run_recipe(write_recipe(text))["sft"]["metrics"]
    assert m["steps"] == 8
    assert m["eval_loss_last"] < m["eval_loss_first"]
