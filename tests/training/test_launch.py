"""`posttrain run` of the hand-written loops under torchrun: every rank trains its share.

A distill step on 2 ranks has the loss and gradient norm of the single-process step on the same
global batch (off-policy batches are a function of (seed, step), so both runs see the same rows);
an rl stage trains on 2 ranks with a rollout engine on each and records its launch. The same holds
with `sharding: fsdp` (each rank holding half of every model), whose sharded checkpoints resume
after a kill and whose output models are ordinary Hugging Face checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_recipes import TINY_STUDENT, recipe_header, rl_on_math, stage

BREVITY = str(Path(__file__).parents[1] / "rl" / "toy_rewards.py") + ":brevity"

RECIPE = recipe_header(
    "dp", models={"student": TINY_STUDENT, "teacher": TINY_STUDENT.replace("128}}", "128, seed: 1}}")},
    datasets={"chat": "{toy: {task: math, n: 32, format: chat}}", "math": "{toy: {task: math, n: 16, format: prompt}}"},
) + stage("distill", "distill", model="${models.student}", teacher="${models.teacher}", dataset="${datasets.chat}",
          lambda_on_policy=0.0, divergence="forward_kl", max_steps=2, batch_size=4, learning_rate=1.0e-3, chunk_size=8,
          rollout={"backend": "transformers"}) + rl_on_math(
    "${stages.distill.model}", "${datasets.math}", max_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=6,
    checkpoint_every=1, learning_rate=1.0e-3, rewards=[{"name": "brevity", "fn": BREVITY}])


def _run(tmp_path: Path, ranks: int, launch_ranks, sharding: str = "none") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE
    if sharding != "none":
        for kind in ("distill", "rl"):
            text = text.replace(f"    kind: {kind}\n", f"    kind: {kind}\n    sharding: {sharding}\n")
    recipe.write_text(text)
    launch_ranks(["-m", "posttrain.cli", "run", str(recipe)], ranks, tmp_path, timeout=600)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, launch_ranks) -> Path:
    return _run(tmp_path_factory.mktemp("one"), 1, launch_ranks)


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_distill_and_rl_train_data_parallel_on_two_ranks(tmp_path, launch_ranks, single_process_run):
    one = single_process_run
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


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())["metrics"]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time" and not k.startswith("time/") and not k.endswith("_per_s")}


def test_sharded_loops_train_like_one_process_and_resume_after_a_kill(tmp_path, launch_ranks, single_process_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one, run = single_process_run, _run(tmp_path, 2, launch_ranks, sharding="fsdp")
    for stage in ("distill", "rl"):
        sharded, whole = _metrics(run, stage), _metrics(one, stage)
        assert sharded["sharding"] == "fsdp" and sharded["world_size"] == 2 and whole["sharding"] == "none"
        # Each rank holds half of the policy's parameters (FSDP pads a row count that does not split).
        assert 0.45 < sharded["param_bytes_per_rank"] / whole["param_bytes_per_rank"] < 0.55
        # The output model is an ordinary checkpoint, written from the shards: it loads, with the
        # tensors of the single-process run's; distill's (off-policy: the same batches) hold its
        # weights too. (rl's ranks sample with seeds of their own, so its updates differ.)
        state = AutoModelForCausalLM.from_pretrained(run / stage / "model").state_dict()
        reference = load_file(str(one / stage / "model" / "model.safetensors"))
        assert all(state[k].shape == v.shape for k, v in reference.items())
        if stage == "distill":
            assert max(float((state[k] - v).abs().max()) for k, v in reference.items()) < 1e-4
    # The sharded distill steps are the single-process ones on the same global batch.
    for a, b in zip(_rows(one / "distill"), _rows(run / "distill")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    checkpoint = run / "rl" / "checkpoints" / "step_000001"
    assert json.loads((checkpoint / "state.json").read_text())["sharding"] == "fsdp"
    assert (checkpoint / "sharded" / ".metadata").exists()  # torch.distributed.checkpoint, written by each rank

    # What a kill -9 during step 2 leaves: the step-1 checkpoint, no manifest, no output model, the
    # metrics of whatever was logged. The re-run resumes from the checkpoint and logs step 2 again,
    # the same as the uninterrupted run did.
    finished = _rows(run / "rl")
    (run / "rl" / "manifest.json").unlink()
    for path in (run / "rl" / "model").iterdir():
        path.unlink()
    (run / "rl" / "model").rmdir()
    launch_ranks(["-m", "posttrain.cli", "run", str(tmp_path / "recipe.yaml")], 2, tmp_path, timeout=600)
    resumed = _rows(run / "rl")
    assert [r["step"] for r in resumed] == [1, 2]
    assert resumed[0] == finished[0]  # step 1 was not trained again: its row is the one logged before
    assert resumed[1]["time"] != finished[1]["time"]  # step 2 was
    assert _untimed(resumed[1]) == _untimed(finished[1])
    assert json.loads((run / "rl" / "manifest.json").read_text())["status"] == "complete"
