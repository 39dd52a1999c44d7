"""The KL the rl stage logs for people to read: the k3 estimator, never negative, next to the k1
values kept under their old names (kl_anchor, kl_start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.data import write_jsonl
from posttrain.losses.policy import k3_kl
from posttrain.stages.base import StageContext
from posttrain.stages.rl import RLStageConfig, run_rl
from posttrain.toy.tasks import generate

REWARDS = str(Path(__file__).with_name("toy_rewards.py"))


def test_k3_is_zero_for_equal_models_and_never_negative():
    torch.manual_seed(0)
    logp, ref = -torch.rand(64, 12) * 3, -torch.rand(64, 12) * 3
    mask = (torch.rand(64, 12) > 0.2).float()
    assert torch.all(k3_kl(logp, ref, mask) >= 0)
    assert torch.allclose(k3_kl(logp, logp, mask), torch.zeros(64))
    assert ((logp - ref) * mask).sum(-1).min() < 0  # while k1 of the same samples is negative for some


def test_k3_averages_to_the_exact_kl_of_a_categorical():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), -1)
    q = torch.softmax(torch.randn(6), -1)
    tokens = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[tokens].view(-1, 1), q.log()[tokens].view(-1, 1)
    estimate = k3_kl(logp, logq, torch.ones_like(logp)).mean()
    exact = (p * (p.log() - q.log())).sum()
    assert estimate.item() == pytest.approx(exact.item(), rel=0.03)


@pytest.fixture(scope="module")
def math_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("kl") / "prompts.jsonl"
    write_jsonl(path, generate("math", 16, seed=0, fmt="prompt"))
    return path


@pytest.mark.parametrize("algorithm", ["rloo", "jbond"])
def test_the_rl_stage_logs_non_negative_k3_kl_next_to_k1(tiny_gemma3_dir, math_prompts, tmp_path, algorithm):
    extra = {"num_generations": 4} if algorithm == "rloo" else {"algorithm": "jbond"}
    cfg = RLStageConfig(model=str(tiny_gemma3_dir), dataset=str(math_prompts), prompts_per_step=2, max_steps=3,
                        max_new_tokens=4, learning_rate=5e-2, anchor_ema=0.5, checkpoint_every=0,
                        rewards=[{"name": "brevity", "fn": f"{REWARDS}:brevity"}], rollout={"backend": "transformers"},
                        **extra)
    stage_dir = tmp_path / "rl"
    stage_dir.mkdir()
    result = run_rl(cfg, StageContext(name="rl", kind="rl", stage_dir=stage_dir, run_dir=tmp_path, seed=0,
                                      recipe_name="t"))
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["kl_anchor_k3"] >= 0 and row["kl_start_k3"] >= 0
        assert {"kl_anchor", "kl_start"} <= set(row)  # the k1 values keep their names
    assert rows[-1]["kl_start_k3"] > 0  # the policy moved off the start
    assert result.metrics["kl_start_k3"] >= 0
