"""`posttrain run` under a multi-process launcher (torchrun; accelerate launch does the same on
GPU nodes): real processes over gloo on the CPU. Rank 0 owns the run directory and runs the
single-process stages; every rank trains in the distributed `sft` stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_recipes import recipe_header, rl_on_math

# One tiny model and two toy datasets; each test adds its stages.
HEADER = recipe_header("mp", datasets={"mix": "{toy: {task: chat, n: 64, format: chat}}",
                                       "math": "{toy: {task: math, n: 16, format: prompt}}"})

RECIPE = HEADER + """
  - name: filter
    kind: filter
    dataset: FILTER_DATASET
  - name: sft
    kind: sft
    model: ${models.student}
    dataset: DATASET
    max_steps: 2
    batch_size: 8
    learning_rate: 1.0e-3
    logging_steps: 1
  - name: export
    kind: export
    model: ${stages.sft.model}
    require_end_of_turn: false
    max_new_tokens: 4
"""

RL_WITH_VLLM = HEADER + rl_on_math("${models.student}", "${datasets.math}", max_steps=2, prompts_per_step=2,
                                   num_generations=2, max_new_tokens=8, checkpoint_every=0,
                                   rollout={"backend": "vllm", "max_model_len": 256})


def _launch(tmp_path: Path, dataset: str, text: str = RECIPE,
            filter_dataset: str = "${datasets.mix}") -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("FILTER_DATASET", filter_dataset).replace("DATASET", dataset))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "posttrain.cli", "run", str(recipe)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_share_one_run_directory_and_both_train(tmp_path):
    done = _launch(tmp_path, "${stages.filter.dataset}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("posttrain run summary") == 1  # rank 0 reports; rank 1 is quiet
    run = tmp_path / "run"
    for stage in ("filter", "sft", "export"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete"
    assert (run / "export" / "model" / "model.safetensors").exists()
    # TRL counts the tokens of every process: two ranks each trained on the (whole, 8-row) batch.
    stats = json.loads((run / "sft" / "data_stats.json").read_text())
    first = json.loads((run / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    assert stats["rows"] <= 8
    assert first["num_tokens"] == 2 * stats["train_tokens"]


@pytest.mark.parametrize("failing", ["filter", "sft"])  # run by rank 0 in a child / by every rank
def test_a_failing_stage_ends_every_process_instead_of_hanging(tmp_path, failing):
    missing = str(tmp_path / "missing.jsonl")
    if failing == "sft":
        done = _launch(tmp_path, missing)
    else:
        done = _launch(tmp_path, "${stages.filter.dataset}", filter_dataset=missing)
    assert done.returncode != 0
    manifest = json.loads((tmp_path / "run" / failing / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "missing.jsonl" in manifest["error"]
    assert not manifest["error"].startswith("StageFailedInChild")  # the stage's own error type is kept


def test_an_rl_stage_with_vllm_runs_one_engine_per_rank(tmp_path):
    """rl is data-parallel: every rank samples its share of the prompts on its own in-process
    vLLM engine, which joins the launcher's process group as an external launcher (a plain
    in-process engine would wait there for ranks that never come)."""
    from posttrain.rollout import vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed")
    done = _launch(tmp_path, "", RL_WITH_VLLM)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "rl" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["world_size"] == 2
    assert len((tmp_path / "run" / "rl" / "metrics.jsonl").read_text().splitlines()) == 2
