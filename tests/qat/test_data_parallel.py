"""The qat stage data-parallel with real processes (torchrun, gloo, CPU): two ranks train like one."""

from __future__ import annotations

from pathlib import Path

import torch

SCRIPT = str(Path(__file__).with_name("dp_qat.py"))


def test_qat_on_two_ranks_equals_qat_in_one_process(tmp_path, full_precision_dir, qat_data, launch_ranks):
    from safetensors.torch import load_file

    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    data = str(qat_data / "math_chat.jsonl")
    launch_ranks([SCRIPT, str(full_precision_dir), data, str(single)], 1, tmp_path)
    launch_ranks([SCRIPT, str(full_precision_dir), data, str(double)], 2, tmp_path)
    start = load_file(str(Path(full_precision_dir) / "model.safetensors"))
    one = load_file(str(single / "model" / "model.safetensors"))
    two = load_file(str(double / "model" / "model.safetensors"))
    moved = max(float((one[k] - start[k]).abs().max()) for k in start if k in one)
    assert moved > 1e-4
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
