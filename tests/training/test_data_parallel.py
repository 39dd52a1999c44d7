"""Data-parallel training of the hand-written loops, with real processes (torchrun, gloo, CPU).

One update on 2 ranks must equal one single-process update on the same global batch: each rank
normalises its loss by the global count and posttrain.training sums the gradients over ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SCRIPT = str(Path(__file__).with_name("dp_step.py"))


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("budget", [None, 100], ids=["one-micro-batch", "token-budget"])
def test_one_step_on_two_ranks_equals_one_single_process_step(tiny_gemma3_dir, tmp_path, budget, launch_ranks):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    extra = [] if budget is None else [str(budget)]
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(single)] + extra, 1, tmp_path)
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(double)] + extra, 2, tmp_path)

    from safetensors.torch import load_file

    start = load_file(str(Path(tiny_gemma3_dir) / "model.safetensors"))
    one = torch.load(single / "policy_rank0.pt")
    two = [torch.load(double / f"policy_rank{r}.pt") for r in (0, 1)]
    moved = max(float((one[k] - start[k]).abs().max()) for k in start if k in one)
    assert moved > 1e-4  # the update did something
    assert _close(two[0], two[1]) == 0.0  # the ranks hold identical weights
    assert _close(one, two[0]) < 1e-5 * max(1.0, moved) + 1e-6
    anchors = [torch.load(double / f"anchor_rank{r}.pt") for r in (0, 1)]
    assert _close(anchors[0], anchors[1]) == 0.0  # the EMA anchor stays identical on every rank
    assert _close(torch.load(single / "anchor_rank0.pt"), anchors[0]) < 1e-5 * max(1.0, moved) + 1e-6

    s1 = json.loads((single / "stats_rank0.json").read_text())
    s2 = [json.loads((double / f"stats_rank{r}.json").read_text()) for r in (0, 1)]
    assert s2[0]["world_size"] == 2 and s1["world_size"] == 1
    assert s2[0]["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
    assert s2[0]["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-5)
    if budget is not None:
        # The shares differ in length, so the ranks took different numbers of micro-batches.
        assert s2[0]["micro_batches"] != s2[1]["micro_batches"]
        _check_sharded_step_equals(single, tmp_path, SCRIPT, [str(tiny_gemma3_dir)], [extra[0], "sgd", "fsdp"],
                                   launch_ranks, moved)


def _check_sharded_step_equals(single: Path, tmp_path: Path, script: str, head: list[str], tail: list[str],
                               launch_ranks, moved: float) -> None:
    """The same step under `sharding: fsdp` on 2 ranks (each holding half of the policy and anchor,
    the ranks running different numbers of real micro-batches) gives the single-process weights."""
    sharded = tmp_path / "fsdp"
    sharded.mkdir()
    launch_ranks([script] + head + [str(sharded)] + tail, 2, tmp_path)
    one = torch.load(single / "policy_rank0.pt")
    for r in (0, 1):
        assert _close(one, torch.load(sharded / f"policy_rank{r}.pt")) < 1e-5 * max(1.0, moved) + 1e-6
    if (single / "anchor_rank0.pt").exists():  # the EMA anchor, averaged shard by shard
        assert _close(torch.load(single / "anchor_rank0.pt"), torch.load(sharded / "anchor_rank0.pt")) < 1e-5
    s1 = json.loads((single / "stats_rank0.json").read_text())
    s2 = [json.loads((sharded / f"stats_rank{r}.json").read_text()) for r in (0, 1)]
    assert s2[0]["sharding"] == "fsdp" and s1["sharding"] == "none"
    assert s2[0]["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
    assert s2[0]["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-5)
    assert 0.45 < s2[0]["param_bytes_per_rank"] / s1["param_bytes_per_rank"] < 0.55
    # The output model written from the shards: several files and their index, loadable by
    # transformers, holding the trained weights (the tied output layer written once, as HF does).
    from transformers import AutoModelForCausalLM

    index = json.loads((sharded / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(sharded / "model").state_dict()
    assert _close({k: one[k] for k in loaded}, loaded) < 1e-5 * max(1.0, moved) + 1e-6


def test_sharded_adamw_state_trains_like_whole_adamw(tiny_gemma3_dir, tmp_path, launch_ranks):
    """ZeRO-1 (shard_optimizer): each rank holds AdamW's moments for a share of the parameters; the
    update equals the one with whole optimizer state on every rank, and checkpoints round-trip."""
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir()
    sharded.mkdir()
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(whole), "-", "adamw"], 2, tmp_path)
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(sharded), "-", "adamw-sharded"], 2, tmp_path)
    a = torch.load(whole / "policy_rank0.pt")
    for r in (0, 1):
        b = torch.load(sharded / f"policy_rank{r}.pt")
        assert _close(a, b) < 1e-6  # same gradients, same AdamW arithmetic, split over two ranks
    assert (sharded / "checkpoints" / "step_000001" / "optimizer.pt").exists()
