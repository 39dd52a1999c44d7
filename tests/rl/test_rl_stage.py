"""The `rl` stage end to end on a tiny model: learning, resume, faults, NaN handling, recipes.

Everything is real: tiny Gemma3 models, the transformers rollout engine, rewards.combine with
reward functions loaded from tests/rl/toy_rewards.py, training on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rl_testutil import REWARDS, metrics_rows, stage_context, write_math_prompts
from tiny_recipes import recipe_header, rl_on_math

from posttrain.data import DataError, write_jsonl
from posttrain.stages.base import StageError
from posttrain.data import load_prompts
from posttrain.stages.rl import RLOO, RLStageConfig, prompt_indices_for_step, run_rl


@pytest.fixture(scope="module")
def math_prompts(tmp_path_factory):
    return write_math_prompts(tmp_path_factory.mktemp("rl_data"), 32)


def _config(model_dir, dataset, **overrides) -> RLStageConfig:
    base = dict(model=str(model_dir), dataset=str(dataset), rewards=[{"name": "brevity", "fn": f"{REWARDS}:brevity"}],
                num_generations=4, prompts_per_step=2, max_steps=3, max_new_tokens=4, learning_rate=5e-3,
                checkpoint_every=0, rollout={"backend": "transformers"})
    base.update(overrides)
    return RLStageConfig(**base)


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_reward_rises_on_a_trivially_learnable_reward(tiny_gemma3_dir, math_prompts, tmp_path):
    cfg = _config(tiny_gemma3_dir, math_prompts, num_generations=8, prompts_per_step=4, max_steps=20,
                  max_new_tokens=6, beta=0.0)
    run_rl(cfg, stage_context(tmp_path / "rl"))
    rows = metrics_rows(tmp_path / "rl")
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, rewards
    # The engine received the weights after every update: it samples exactly what the trainer scores.
    # Drift is checked on every rollout.drift_check_every-th step (10 by default) from the first.
    checked = [r for r in rows if "drift_mean_abs" in r]
    assert [r["step"] for r in checked] == [1, 11]
    assert max(r["drift_mean_abs"] for r in checked) < 1e-3
    assert {"kl_anchor", "kl_start", "entropy", "completion_length", "truncation_rate", "time/generate",
            "time/reward", "time/train", "time/sync", "reward/brevity/mean", "reward/brevity/std"} <= set(rows[-1])


def test_resume_after_interruption_gives_the_same_parameters(tiny_gemma3_dir, math_prompts, tmp_path, monkeypatch):
    cfg = _config(tiny_gemma3_dir, math_prompts, max_steps=4, checkpoint_every=2, anchor_ema=0.5)
    straight = run_rl(cfg, stage_context(tmp_path / "straight"))

    real_step = RLOO.step

    def crash_at_step_3(self, state, step):
        if step == 3:
            raise KeyboardInterrupt("simulated crash during step 4")
        return real_step(self, state, step)

    monkeypatch.setattr(RLOO, "step", crash_at_step_3)  # the loop looks the step up on the algorithm
    with pytest.raises(KeyboardInterrupt):
        run_rl(cfg, stage_context(tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoints" / "step_000002" / "state.json").exists()
    monkeypatch.setattr(RLOO, "step", real_step)
    resumed = run_rl(cfg, stage_context(tmp_path / "resumed"))

    a, b = _weights(straight.outputs["model"]), _weights(resumed.outputs["model"])
    assert a.keys() == b.keys()
    changed = False
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
        changed |= not torch.equal(a[name], _weights(tiny_gemma3_dir)[name])
    assert changed, "training did not move the weights; the comparison would prove nothing"
    # The resumed run's log has each step once, as the uninterrupted one.
    assert [r["step"] for r in metrics_rows(tmp_path / "resumed")] == [1, 2, 3, 4]


def test_reward_faults_follow_the_fault_policy(tiny_gemma3_dir, math_prompts, tmp_path):
    cfg = _config(tiny_gemma3_dir, math_prompts, max_steps=2, max_new_tokens=16, fault_policy="skip",
                  rewards=[{"name": "flaky", "fn": f"{REWARDS}:raises_on_long", "tolerate_all_faults": True}])
    run_rl(cfg, stage_context(tmp_path / "rl"))
    rows = metrics_rows(tmp_path / "rl")
    # A random model's 16-token completions are mostly over 20 characters: faulted and skipped, not fatal.
    assert sum(r["reward/flaky/faults"] for r in rows) > 0
    assert sum(r["reward/skipped"] for r in rows) == sum(r["reward/flaky/faults"] for r in rows)

    failing = cfg.model_copy(update={"fault_policy": "fail"})
    with pytest.raises(Exception, match="reward faults"):
        run_rl(failing, stage_context(tmp_path / "rl_fail"))


def test_non_finite_loss_skips_the_step_and_stops_after_max_nan_steps(tiny_gemma3_dir, math_prompts, tmp_path, caplog):
    cfg = _config(tiny_gemma3_dir, math_prompts, max_steps=5, max_nan_steps=2,
                  rewards=[{"name": "inf", "fn": f"{REWARDS}:infinite"}])
    with pytest.raises(StageError, match="2 steps in a row had a non-finite loss"):
        run_rl(cfg, stage_context(tmp_path / "rl"))
    rows = metrics_rows(tmp_path / "rl")
    assert [r["skipped_nonfinite"] for r in rows] == [1]  # step 1 logged and skipped; step 2 raised
    assert "non-finite loss or gradient; skipped the update" in caplog.text


def test_prompts_over_the_length_limit_are_dropped_and_counted(toy_tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "Hi."}, {"prompt": "word " * 200, "answer": "1"}, {"prompt": "Hello!"}])
    rows, ids, dropped = load_prompts(str(path), toy_tokenizer, max_prompt_tokens=32)
    assert dropped == 1 and [r["prompt"] for r in rows] == ["Hi.", "Hello!"] and all(len(i) <= 32 for i in ids)
    write_jsonl(path, [{"question": "no prompt column"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: expected a 'prompt'"):
        load_prompts(str(path), toy_tokenizer, max_prompt_tokens=32)


def test_data_order_is_a_function_of_seed_and_step_and_covers_each_epoch():
    order = [i for s in range(5) for i in prompt_indices_for_step(10, s, 2, seed=3)]
    assert sorted(order) == list(range(10))  # one epoch: every prompt once
    assert prompt_indices_for_step(10, 7, 2, seed=3) == prompt_indices_for_step(10, 7, 2, seed=3)
    assert order != [i for s in range(5) for i in prompt_indices_for_step(10, s, 2, seed=4)]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="num_generations: the rloo baseline needs at least 2"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], num_generations=1)
    with pytest.raises(ValueError, match="grad_accum"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], prompts_per_step=3, grad_accum=2)
    with pytest.raises(ValueError, match="beta"):
        RLStageConfig(model="m", dataset="d", rewards=[{"name": "math"}], beta=-1)


def test_rl_stage_runs_inside_a_recipe(tmp_path):
    from posttrain.pipeline.runner import run_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_header(
        "rl_test", output_dir=str(tmp_path / "run"),
        models={"student": "{tiny: {arch: gemma3, hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1}}"},
        datasets={"math_prompts": "{toy: {task: math, n: 16, split: train, format: prompt}}",
                  "math_eval": "{toy: {task: math, n: 4, split: eval, format: prompt}}"},
    ) + rl_on_math("${models.student}", "${datasets.math_prompts}", eval_dataset="${datasets.math_eval}",
                   rewards=[{"name": "math", "weight": 1.0},
                            {"name": "brevity", "fn": f"{REWARDS}:brevity", "weight": 0.1}],
                   max_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=4, grad_accum=2))
    manifests = run_recipe(recipe)
    m = manifests["rl"]
    assert m["status"] == "complete"
    out = Path(m["outputs"]["model"])
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    rows = metrics_rows(out.parent)
    assert "eval/math" in rows[0] and "reward/math/mean" in rows[1] and "reward/brevity/mean" in rows[1]


def test_lora_training_writes_a_merged_model_and_moves_the_anchor(tiny_gemma3_dir, math_prompts, tmp_path):
    cfg = _config(tiny_gemma3_dir, math_prompts, max_steps=2, anchor_ema=0.5,
                  lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    res = run_rl(cfg, stage_context(tmp_path / "rl"))
    merged, start = _weights(res.outputs["model"]), _weights(tiny_gemma3_dir)
    assert not any("lora" in k for k in merged)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], start[q])  # the adapter was trained and merged in
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[k], start[k])  # modules without an adapter stay as they were
    rows = metrics_rows(tmp_path / "rl")
    assert rows[-1]["kl_anchor"] != rows[-1]["kl_start"]  # the EMA anchor left the starting model


def test_bf16_mixed_precision_trains_and_shows_its_rounding_as_drift(tiny_gemma3_dir, math_prompts, tmp_path):
    """precision=bf16 runs the trainer's forwards under autocast: the engine (float32) and the
    trainer then disagree by bf16 rounding, visible in the drift metric; weights stay float32."""
    drift = {}
    for precision in ("fp32", "bf16"):
        cfg = _config(tiny_gemma3_dir, math_prompts, max_steps=2, precision=precision)
        result = run_rl(cfg, stage_context(tmp_path / precision))
        first = metrics_rows(tmp_path / precision)[0]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics_rows(tmp_path / precision))
        drift[precision] = first["drift_mean_abs"]
        assert all(t.dtype == torch.float32 for t in _weights(result.outputs["model"]).values())
    assert drift["fp32"] < 1e-4
    assert 1e-3 < drift["bf16"] < 0.5, drift


def test_importance_clip_runs_inside_the_stage_with_engine_logprobs_every_step(tiny_gemma3_dir, math_prompts,
                                                                                tmp_path):
    """Importance weights need the engine's logprobs on every step, drift-check step or not."""
    cfg = _config(tiny_gemma3_dir, math_prompts, max_steps=3, importance_clip=2.0, precision="bf16",
                  rollout={"backend": "transformers", "drift_check_every": 2})
    run_rl(cfg, stage_context(tmp_path / "rl"))
    rows = metrics_rows(tmp_path / "rl")
    assert [r["step"] for r in rows if "drift_mean_abs" in r] == [1, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
