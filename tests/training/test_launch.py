"""`posttrain run` of the hand-written loops under torchrun: every rank trains its share.

A distill step on 2 ranks has the loss and gradient norm of the single-process step on the same
global batch (off-policy batches are a function of (seed, step), so both runs see the same rows);
an rl stage trains on 2 ranks with a rollout engine on each and records its launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_recipes import TINY_STUDENT, recipe_header, rl_on_math, stage

RECIPE = recipe_header(
    "dp", models={"student": TINY_STUDENT, "teacher": TINY_STUDENT.replace("128}}", "128, seed: 1}}")},
    datasets={"chat": "{toy: {task: math, n: 32, format: chat}}", "math": "{toy: {task: math, n: 16, format: prompt}}"},
) + stage("distill", "distill", model="${models.student}", teacher="${models.teacher}", dataset="${datasets.chat}",
          lambda_on_policy=0.0, divergence="forward_kl", max_steps=2, batch_size=4, learning_rate=1.0e-3, chunk_size=8,
          rollout={"backend": "transformers"}) + rl_on_math(
    "${stages.distill.model}", "${datasets.math}", max_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=6,
    checkpoint_every=1)


def _run(tmp_path: Path, ranks: int, launch_ranks) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    launch_ranks(["-m", "posttrain.cli", "run", str(recipe)], ranks, tmp_path, timeout=600)
    return tmp_path / "run"


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_distill_and_rl_train_data_parallel_on_two_ranks(tmp_path, launch_ranks):
    one = _run(tmp_path / "one", 1, launch_ranks)
    two = _run(tmp_path / "two", 2, launch_ranks)
    for stage in ("distill", "rl"):
        manifest = json.loads((two / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["device_type"] == "cpu"
    assert json.loads((one / "distill" / "manifest.json").read_text())["metrics"]["world_size"] == 1
    # Same global batch, split over two ranks: the same loss and gradient norm at step 1.
    a, b = _rows(one / "distill")[0], _rows(two / "distill")[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    rl = _rows(two / "rl")
    assert [r["step"] for r in rl] == [1, 2]
    # Rank 0 wrote the checkpoint of step 1 (the last step writes the model instead) and the model.
    assert (two / "rl" / "checkpoints" / "step_000001" / "state.json").exists()
    assert json.loads((two / "rl" / "checkpoints" / "step_000001" / "state.json").read_text())["world_size"] == 2
    assert (two / "rl" / "model" / "model.safetensors").exists()
