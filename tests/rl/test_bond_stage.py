"""The `rl` stage with algorithm jbond / bond on a tiny Gemma3: real engine, rewards and training on CPU."""

from __future__ import annotations

import pytest
import torch
from rl_testutil import REWARDS, metrics_rows, stage_context, write_math_prompts

from posttrain.stages.rl import RLStageConfig, run_rl


@pytest.fixture(scope="module")
def math_prompts(tmp_path_factory):
    return write_math_prompts(tmp_path_factory.mktemp("bond_data"), 16)


def _config(model_dir, dataset, **overrides) -> RLStageConfig:
    base = dict(model=str(model_dir), dataset=str(dataset), rewards=[{"name": "brevity", "fn": f"{REWARDS}:brevity"}],
                algorithm="jbond", prompts_per_step=4, max_steps=2, max_new_tokens=6, learning_rate=5e-3,
                checkpoint_every=0, rollout={"backend": "transformers"})
    base.update(overrides)
    return RLStageConfig(**base)


def test_jbond_steps_log_every_issue_metric_and_move_the_weights(tiny_gemma3_dir, math_prompts, tmp_path):
    result = run_rl(_config(tiny_gemma3_dir, math_prompts), stage_context(tmp_path / "rl"))
    rows = metrics_rows(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"reward/mean", "reward_anchor/mean", "kl_anchor", "kl_start", "entropy", "loss/forward", "loss/backward",
                "ties/prompt_fraction", "ties/step", "backward_reward/mean", "time/generate_anchor"} <= set(r)
        assert r["skipped_nonfinite"] == 0 and all(torch.isfinite(torch.tensor(float(r[k]))) for k in ("loss", "entropy"))
        assert r["loss"] == pytest.approx(0.5 * r["loss/forward"] + 0.5 * r["loss/backward"], rel=1e-5, abs=1e-6)
        assert r["backward_reward/mean"] <= 0.0  # r_J is -log 16 or 0
    # Step 1: policy = anchor = start, so the log-ratios are 0 up to float rounding.
    assert abs(rows[0]["kl_anchor"]) < 1e-4 and abs(rows[0]["kl_start"]) < 1e-4
    assert rows[1]["kl_start"] != rows[1]["kl_anchor"]  # the EMA anchor (eta 0.02) moved off the start
    assert result.metrics["global_batch_sequences"] == 4 * 3
    assert 0.0 <= result.metrics["ties/step_fraction"] <= 1.0
    # The engine holds the policy after every step (swap put the anchor in, then the policy back).
    assert max(r["drift_mean_abs"] for r in rows if "drift_mean_abs" in r) < 1e-3


def test_bond_and_a_second_anchor_engine_run_and_backward_only_skips_the_forward_term(tiny_gemma3_dir, math_prompts,
                                                                                      tmp_path):
    run_rl(_config(tiny_gemma3_dir, math_prompts, algorithm="bond", bond_n=4, anchor_rollout="engine",
                   max_tokens_per_microbatch=40), stage_context(tmp_path / "bond"))
    rows = metrics_rows(tmp_path / "bond")
    assert all(r["backward_reward/mean"] <= 0.0 and r["micro_batches"] > 1 for r in rows)  # log p_le <= 0
    run_rl(_config(tiny_gemma3_dir, math_prompts, jeffreys_beta=1.0, max_steps=1), stage_context(tmp_path / "backward"))
    only = metrics_rows(tmp_path / "backward")[0]
    assert only["loss/forward"] == 0.0 and only["loss"] == pytest.approx(only["loss/backward"])


def test_config_errors_name_the_key_for_the_other_algorithm():
    with pytest.raises(ValueError, match="num_generations: applies to algorithm rloo"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], algorithm="jbond", num_generations=3)
    with pytest.raises(ValueError, match="beta: the KL coefficient of algorithm rloo"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], algorithm="bond", beta=0.3)
    with pytest.raises(ValueError, match="jeffreys_beta: applies to algorithm jbond or bond"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], jeffreys_beta=0.3)
    with pytest.raises(ValueError, match="bond_n: jbond always takes two anchor samples"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], algorithm="jbond", bond_n=4)
    cfg = RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], algorithm="jbond")
    assert cfg.anchor_ema == 0.02 and cfg.completions_per_prompt == 3  # the paper's eta; 1 policy + 2 anchor samples
    # The runner re-validates the resolved config with every field written out: it must stay valid.
    assert RLStageConfig.model_validate(cfg.model_dump(mode="json")).anchor_ema == 0.02
    rloo = RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}])
    assert RLStageConfig.model_validate(rloo.model_dump(mode="json")).anchor_ema == 0.01
