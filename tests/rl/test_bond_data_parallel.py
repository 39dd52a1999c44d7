"""J-BOND / BOND data-parallel: one update on 2 torchrun ranks (gloo, CPU) equals the single-process one.

The backward term's baseline is the mean over the *other* items of the whole batch, and the loss
normalisers are global counts: both are summed over the ranks, so the ranks' summed gradients are
the single-process gradient whatever the split and the micro-batching; also with `sharding: fsdp`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SCRIPT = str(Path(__file__).with_name("bond_dp_step.py"))


@pytest.mark.parametrize("algorithm,budget", [("jbond", "60"), ("bond", None)])
def test_one_bond_step_on_two_ranks_equals_one_single_process_step(tiny_gemma3_dir, tmp_path, algorithm, budget,
                                                                   launch_ranks):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    extra = [] if budget is None else [budget]
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(single), algorithm] + extra, 1, tmp_path)
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(double), algorithm] + extra, 2, tmp_path)

    from safetensors.torch import load_file

    start = load_file(str(Path(tiny_gemma3_dir) / "model.safetensors"))
    one = torch.load(single / "policy_rank0.pt")
    two = [torch.load(double / f"policy_rank{r}.pt") for r in (0, 1)]
    moved = max(float((one[k] - start[k]).abs().max()) for k in start if k in one)
    assert moved > 1e-4
    assert max(float((two[0][k] - two[1][k]).abs().max()) for k in one) == 0.0
    assert max(float((one[k] - two[0][k]).abs().max()) for k in one) < 1e-5 * max(1.0, moved) + 1e-6
    s1 = json.loads((single / "stats_rank0.json").read_text())
    s2 = [json.loads((double / f"stats_rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("loss", "forward", "backward"):
        assert s2[0][key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), key
    assert s2[0]["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-5)
    if algorithm != "jbond":
        return
    # The same step with `sharding: fsdp`: each rank holds half of the policy and of the anchor.
    sharded = tmp_path / "fsdp"
    sharded.mkdir()
    launch_ranks([SCRIPT, str(tiny_gemma3_dir), str(sharded), algorithm, budget, "fsdp"], 2, tmp_path)
    for r in (0, 1):
        two = torch.load(sharded / f"policy_rank{r}.pt")
        assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5 * max(1.0, moved) + 1e-6
    s3 = json.loads((sharded / "stats_rank0.json").read_text())
    assert s3["sharding"] == "fsdp" and 0.45 < s3["param_bytes_per_rank"] / s1["param_bytes_per_rank"] < 0.55
    for key in ("loss", "forward", "backward"):
        assert s3[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), key
    assert s3["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-5)
