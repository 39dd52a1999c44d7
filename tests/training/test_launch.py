"""`posttrain run` of the hand-written loops under torchrun: every rank trains its share.

A distill step on 2 ranks has the loss and gradient norm of the single-process step on the same
global batch (off-policy batches are a function of (seed, step), so both runs see the same rows);
an rl stage trains on 2 ranks with a rollout engine on each and records its launch. The same holds
with `sharding: fsdp` (each rank holding half of every model), whose sharded checkpoints resume
after a kill and whose output models are ordinary Hugging Face checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


def _recipe(tmp_path: Path, sharding: str = "none") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE
    if sharding != "none":
        for kind in ("distill", "rl"):
            text = text.replace(f"    kind: {kind}\n", f"    kind: {kind}\n    sharding: {sharding}\n")
        # The sharded rl trains a LoRA adapter (a peft model sharded, its merged weights pushed to
        # the engine and averaged into the sharded EMA anchor, its output written merged), for
        # 8 steps, keeping every checkpoint: time to kill it after its second one.
        text = text.replace("    kind: rl\n", "    kind: rl\n    lora: {r: 4}\n    keep_checkpoints: 8\n").replace(
            "    max_steps: 2\n    prompts_per_step: 2", "    max_steps: 8\n    prompts_per_step: 2")
    recipe.write_text(text)
    return recipe


def _run(tmp_path: Path, ranks: int, launch_ranks) -> Path:
    launch_ranks(["-m", "posttrain.cli", "run", str(_recipe(tmp_path))], ranks, tmp_path, timeout=600)
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


def _killed_after(recipe: Path, checkpoint: Path, timeout: float = 300) -> None:
    """Launch `recipe` on 2 ranks (torchrun) and kill -9 every process once `checkpoint` is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "posttrain.cli", "run", str(recipe)], cwd=recipe.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not (checkpoint / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # torchrun starts each worker in a session of its own: kill the launcher and every descendant.
    import psutil

    launcher = psutil.Process(proc.pid)
    processes = [launcher] + launcher.children(recursive=True)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(processes[1:], timeout=30)
    assert (checkpoint / "state.json").exists()


def test_sharded_loops_train_like_one_process_and_resume_after_a_kill(tmp_path, launch_ranks, single_process_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # The sharded run is killed (-9) once rl's checkpoint of step 2 is complete. The checkpoints
    # after step 1 are then removed, as if the kill had come during step 2: the re-run resumes from
    # step 1, and trains and logs step 2 again, the same as the killed attempt did.
    recipe = _recipe(tmp_path, "fsdp")
    run = tmp_path / "run"
    checkpoints = run / "rl" / "checkpoints"
    _killed_after(recipe, checkpoints / "step_000002")
    assert not (run / "rl" / "manifest.json").exists()  # killed before the stage completed
    killed = _rows(run / "rl")
    for later in checkpoints.glob("step_*"):
        if later.name != "step_000001":
            shutil.rmtree(later)
    launch_ranks(["-m", "posttrain.cli", "run", str(recipe)], 2, tmp_path, timeout=600)
    manifest = json.loads((run / "rl" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_from_step"] == 1
    resumed = _rows(run / "rl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed[0] == killed[0]  # step 1 was not trained again: its row is the one logged before
    assert resumed[1]["time"] != killed[1]["time"]  # step 2 was
    assert _untimed(resumed[1]) == _untimed(killed[1])
    state = json.loads((checkpoints / "step_000001" / "state.json").read_text())
    assert state["sharding"] == "fsdp" and (checkpoints / "step_000001" / "sharded" / ".metadata").exists()

    one = single_process_run
    for stage in ("distill", "rl"):
        sharded, whole = _metrics(run, stage), _metrics(one, stage)
        assert sharded["sharding"] == "fsdp" and sharded["world_size"] == 2 and whole["sharding"] == "none"
        # Each rank holds half of the policy's parameters (FSDP pads a row count that does not split).
        assert 0.45 < sharded["param_bytes_per_rank"] / whole["param_bytes_per_rank"] < 0.55
        # The output model is an ordinary checkpoint, written from the shards: it loads, with the
        # tensors of the single-process run's; distill's (off-policy: the same batches) hold its
        # weights too. (rl's ranks sample with seeds of their own and train an adapter here, so its
        # updates differ.)
        state = AutoModelForCausalLM.from_pretrained(run / stage / "model").state_dict()
        reference = load_file(str(one / stage / "model" / "model.safetensors"))
        assert all(state[k].shape == v.shape for k, v in reference.items())
        if stage == "distill":
            assert max(float((state[k] - v).abs().max()) for k, v in reference.items()) < 1e-4
    # The sharded distill steps are the single-process ones on the same global batch.
    for a, b in zip(_rows(one / "distill"), _rows(run / "distill")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
