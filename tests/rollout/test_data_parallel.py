"""Rollout engines under a real multi-process launch: torchrun, two CPU processes over gloo.

Each rank builds its own engine and generates for its own prompts; the results must equal a
single-process engine's on the same prompts and weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.modeling import load_causal_lm
from posttrain.rollout import RolloutConfig, SamplingParams, create_engine, vllm_available, weights_for_engine

WORKER = Path(__file__).with_name("dp_worker.py")


def _launch(model_dir: Path, out: Path, backend: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(model_dir), str(out), backend],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _reference(model_dir: Path) -> list[tuple[list, list]]:
    """What one single-process engine generates for each rank's prompts, before and after the update."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    engine = create_engine(str(model_dir), RolloutConfig(backend="transformers", max_model_len=256))
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = [[[c.token_ids for c in g] for g in engine.generate(worker.prompts_of(r), sampling=greedy)]
              for r in range(2)]
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(123)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    engine.update_weights(weights_for_engine(model))
    after = [[[c.token_ids for c in g] for g in engine.generate(worker.prompts_of(r), sampling=greedy)]
             for r in range(2)]
    return list(zip(before, after))


def test_two_ranks_each_generate_their_own_prompts_with_their_own_engine(tiny_gemma3_dir, tmp_path):
    ranks = _launch(tiny_gemma3_dir, tmp_path, "auto")
    # backend auto on CPUs under a launch is transformers, whether or not vLLM is installed
    assert [r["backend"] for r in ranks] == ["transformers", "transformers"]
    assert [len(r["before"]) for r in ranks] == [1, 2]  # each rank answered its own share
    for r, (before, after) in zip(ranks, _reference(tiny_gemma3_dir)):
        assert r["before"] == before and r["after"] == after
        assert r["weight_version"] == 1
    assert ranks[0]["before"] != ranks[1]["before"][:1]
    # gather_in_group (how tensor-parallel ranks share prompts) with uneven shares
    everything = ["r0-0", "r1-0", "r1-1"]
    assert [r["gathered"] for r in ranks] == [everything, everything]
    assert [r["mine"] for r in ranks] == [[0, 1], [1, 3]]


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_two_ranks_each_run_a_vllm_engine_with_the_external_launcher(tiny_gemma3_dir, tmp_path):
    """backend: vllm on CPUs under torchrun: one external_launcher engine per rank (about 10 s to start)."""
    ranks = _launch(tiny_gemma3_dir, tmp_path, "vllm")
    assert [r["backend"] for r in ranks] == ["vllm", "vllm"]
    for r, (before, after) in zip(ranks, _reference(tiny_gemma3_dir)):
        assert r["before"] == before and r["after"] == after  # vLLM greedy equals transformers greedy
