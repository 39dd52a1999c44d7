"""The `reward_model` stage's training modes on tiny models (CPU): data parallelism over two real
processes, LoRA members saved as plain checkpoints, and members started from their own SFT
checkpoints (`member_models`).

Everything is real: a tiny Gemma3, the toy tokenizer, toy preference pairs, training on CPU; the
two-process run is `posttrain run` under torchrun, its ranks talking over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.pipeline.runner import run_recipe
from posttrain.stages.base import StageError
from rm_helpers import TINY, weights, write_recipe

STAGE = {"name": "rm", "kind": "reward_model", "model": "${models.base}", "dataset": "${datasets.prefs}",
         "eval_dataset": "${datasets.held_out}", "members": 2, "seeds": [1, 2], "learning_rate": 1.0e-3,
         "probe_steps": 2, "max_steps": 3, "batch_size": 8, "checkpoint_every": 0}


def _recipe(root: Path, stage: dict | None = None, models: dict | None = None) -> Path:
    return write_recipe(root, {**STAGE, **(stage or {})}, "rm-modes", pairs=32, held_out=16, models=models)


def _start(stage_dir: Path, sft_dir) -> dict[str, torch.Tensor]:
    """Where every member began: the SFT weights and the probed head."""
    start = weights(sft_dir)
    start.update({f"score.{k}": v for k, v in torch.load(stage_dir / "probe" / "head.pt", weights_only=True).items()})
    return start


def _distance(a: dict, b: dict) -> float:
    """The L2 norm of the difference of two models' weights, all tensors together."""
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5


# --- data parallelism ---------------------------------------------------------------------------

def _torchrun(recipe: Path, ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launch from inside a launched process starts its own world
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                           "--standalone", "-m", "posttrain.cli", "run", str(recipe)],
                          cwd=recipe.parent, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_the_same_members_and_average_as_one(tmp_path):
    """batch_size 8 over 2 ranks: each rank takes 4 pairs of every step, the loss is normalised by the
    global count and the gradients are summed, so the members, their average and the held-out
    accuracies equal a single-process run's up to the order of float sums. Dropout is 0 (the
    default) here: masks are drawn per rank for the rank's share of the batch, so under dropout two
    processes cannot reproduce one process's masks, by design."""
    further = {"eval_datasets": {"again": "${datasets.held_out}"}}  # scored from the saved members, over both ranks
    single = _recipe(tmp_path / "single", further)
    one = run_recipe(single)["rm"]
    double = _recipe(tmp_path / "double", further)
    done = _torchrun(double, 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads((double.parent / "run" / "rm" / "manifest.json").read_text())
    assert one["status"] == two["status"] == "complete"
    assert one["metrics"]["world_size"] == 1 and two["metrics"]["world_size"] == 2
    assert one["metrics"]["global_batch_pairs"] == two["metrics"]["global_batch_pairs"] == 8

    one_dir, two_dir = single.parent / "run" / "rm", double.parent / "run" / "rm"
    start = _start(one_dir, one["config"]["model"])
    # Both runs built the same tiny model and probed the same head (the probe is data-parallel too).
    assert _distance(start, _start(two_dir, two["config"]["model"])) < 1e-6
    for name in ("members/member_1/model", "members/member_2/model", "model"):
        a, b = weights(one_dir / name), weights(two_dir / name)
        assert a.keys() == b.keys() == start.keys()
        moved = _distance(a, start)
        assert moved > 1e-2  # training did something
        # Over the whole model rather than per entry: AdamW divides each gradient by its own
        # magnitude, so an entry whose gradient is nearly zero turns rounding into a sizeable part
        # of a step (seen: 3e-4 of the largest movement on one entry, 4e-6 over the whole model).
        assert _distance(a, b) <= 1e-4 * moved, name
    for key in ("member_1/accuracy", "member_2/accuracy", "average/accuracy", "ensemble/accuracy"):
        assert one["metrics"][key] == two["metrics"][key] == two["metrics"][f"again/{key}"], key

    # The same with `sharding: fsdp`: each rank holds half of every model (probe, members, and the
    # average and members scored afterwards); the members are written from the shards.
    sharded = _recipe(tmp_path / "sharded", {**further, "sharding": "fsdp"})
    done = _torchrun(sharded, 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    three = json.loads((sharded.parent / "run" / "rm" / "manifest.json").read_text())
    assert three["metrics"]["sharding"] == "fsdp" and one["metrics"]["sharding"] == "none"
    three_dir = sharded.parent / "run" / "rm"
    assert _distance(start, _start(three_dir, three["config"]["model"])) < 1e-6
    for name in ("members/member_1/model", "members/member_2/model", "model"):
        a, c = weights(one_dir / name), weights(three_dir / name)
        assert a.keys() == c.keys()
        assert _distance(a, c) <= 1e-4 * _distance(a, start), name
    for key in ("member_1/accuracy", "member_2/accuracy", "average/accuracy", "ensemble/accuracy"):
        assert one["metrics"][key] == three["metrics"][key] == three["metrics"][f"again/{key}"], key


# --- LoRA ---------------------------------------------------------------------------------------

def _saved_keys(model_dir: Path) -> set[str]:
    """The tensor names in a checkpoint's file (load_reward_model would drop unknown ones silently)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_lora_members_are_saved_merged_and_train_only_the_targeted_projections_and_head(tmp_path):
    recipe = _recipe(tmp_path, {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                "eval_dataset": None})
    manifest = run_recipe(recipe)["rm"]
    stage_dir = recipe.parent / "run" / "rm"
    start = _start(stage_dir, manifest["config"]["model"])
    members = []
    for i in (1, 2):
        model_dir = stage_dir / "members" / f"member_{i}" / "model"
        # A plain checkpoint: exactly the tensors of a reward model of this architecture, no
        # adapters and no peft wrapper names, so members average (and load) as plain weights.
        assert _saved_keys(model_dir) == set(start), _saved_keys(model_dir) ^ set(start)
        members.append(weights(model_dir))
    targeted = [k for k in start if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(targeted) == 2
    for k in targeted + ["score.weight"]:  # the adapters (merged) and the head trained
        for m in members:
            assert not torch.equal(m[k], start[k]), k
        assert not torch.equal(members[0][k], members[1][k]), k  # seeds 1 and 2: other data orders
    frozen = [k for k in start if k not in targeted and k != "score.weight"]
    assert "model.layers.0.mlp.up_proj.weight" in frozen and "model.embed_tokens.weight" in frozen
    for k in frozen:  # everything LoRA does not target stays the SFT model's, bit for bit
        for m in members:
            assert torch.equal(m[k], start[k]), k
    average = weights(manifest["outputs"]["model"])
    assert _saved_keys(Path(manifest["outputs"]["model"])) == set(start)
    for k, tensor in average.items():
        torch.testing.assert_close(tensor, (members[0][k] + members[1][k]) / 2, rtol=0, atol=1e-7)


# --- member_models ------------------------------------------------------------------------------

def test_each_member_starts_from_its_own_sft_checkpoint(tmp_path):
    """member_models [other, base] with 3 members: member 1 fine-tunes `other` (same architecture,
    another initialisation), member 2 the stage's `model`, member 3 `other` again (entry i mod 2).
    A few small steps move a member far less than the two starts lie apart, so each member is much
    nearer its own start than the other one."""
    recipe = _recipe(tmp_path, {"member_models": ["${models.other}", "${models.base}"], "members": 3,
                                "seeds": [1, 2, 3], "learning_rate": 1.0e-4, "max_steps": 2, "eval_dataset": None},
                     models={"other": {"tiny": {**TINY, "seed": 1}}})
    manifest = run_recipe(recipe)["rm"]
    stage_dir = recipe.parent / "run" / "rm"
    base_dir = manifest["config"]["model"]
    other_dir = manifest["config"]["member_models"][0]
    assert other_dir != base_dir
    starts = {other_dir: _start(stage_dir, other_dir), base_dir: _start(stage_dir, base_dir)}
    backbone = [k for k in starts[base_dir] if not k.startswith("score.")]  # the head is the shared probe's
    apart = _distance({k: starts[other_dir][k] for k in backbone}, starts[base_dir])
    assert apart > 1.0  # two genuinely different checkpoints
    for i, (own, elsewhere) in enumerate([(other_dir, base_dir), (base_dir, other_dir), (other_dir, base_dir)]):
        member = weights(stage_dir / "members" / f"member_{i + 1}" / "model")
        near = _distance({k: member[k] for k in backbone}, starts[own])
        far = _distance({k: member[k] for k in backbone}, starts[elsewhere])
        assert 0 < near < 0.1 * apart < far, (i + 1, near, far, apart)
        record = json.loads((stage_dir / "members" / f"member_{i + 1}" / "manifest.json").read_text())
        assert record["start"] == own


@pytest.mark.parametrize("other, problem", [
    ({"hidden_size": 96}, "of another shape"),  # the probed head (64 -> 1) would not even fit
    ({"num_layers": 2}, "tensors not in `model`"),  # the head fits; the members could not be averaged
], ids=["wider", "deeper"])
def test_a_member_model_of_another_architecture_is_refused_before_anything_trains(tmp_path, other, problem):
    """Members are averaged tensor by tensor: an entry that is not a checkpoint of `model`'s
    architecture is refused up front, with the entry's index and path and what differs, before the
    probe or any member has spent a step."""
    recipe = _recipe(tmp_path, {"member_models": ["${models.base}", "${models.other}"], "members": 2,
                                "probe_steps": 1, "max_steps": 1, "eval_dataset": None},
                     models={"other": {"tiny": {**TINY, **other}}})
    with pytest.raises(StageError, match=r"member_models\[1\]: '.*other.*' does not have the architecture of "
                                         rf"`model` .*{problem}"):
        run_recipe(recipe)
    assert not (recipe.parent / "run" / "rm" / "probe").exists()


# --- learning-rate schedule ---------------------------------------------------------------------

def test_linear_schedule_decays_every_members_rate_to_zero_and_the_probe_keeps_its_own(tmp_path):
    """lr_scheduler linear: each member's rate falls from learning_rate to 0 at its own last step
    (the logged rate is the one for the next step), starting afresh for member 2; the probe stays
    constant at probe_learning_rate."""
    recipe = _recipe(tmp_path, {"lr_scheduler": "linear", "max_steps": 4, "probe_steps": 2, "logging_steps": 1,
                                "eval_dataset": None, "probe_learning_rate": 2.0e-3})
    run_recipe(recipe)
    rows = [json.loads(line) for line in (recipe.parent / "run" / "rm" / "metrics.jsonl").read_text().splitlines()]
    rates = {}
    for row in rows:
        if "lr" in row:
            rates.setdefault(row["phase"], []).append(row["lr"])
    assert rates["probe"] == pytest.approx([2.0e-3, 2.0e-3])
    for member in ("member_1", "member_2"):
        assert rates[member] == pytest.approx([7.5e-4, 5.0e-4, 2.5e-4, 0.0]), member


def test_a_decaying_schedule_needs_steps_after_the_warm_up():
    from posttrain.stages.reward_model import RewardModelStageConfig

    base = {"model": "m", "dataset": "d", "max_steps": 10, "lr_scheduler": "cosine"}
    RewardModelStageConfig.model_validate({**base, "warmup_steps": 9})
    with pytest.raises(ValueError, match=r"warmup_steps: 10 is not below max_steps \(10\)"):
        RewardModelStageConfig.model_validate({**base, "warmup_steps": 10})
    RewardModelStageConfig.model_validate({**base, "warmup_steps": 10, "lr_scheduler": "constant"})
