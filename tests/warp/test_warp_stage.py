"""The `merge` and `warp` stages on tiny Gemma3 models: layout, LITI arithmetic, the front, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from posttrain.data import write_jsonl
from posttrain.stages.base import StageContext
from posttrain.toy.tasks import generate
from posttrain.weights import CheckpointReader

REWARDS = str(Path(__file__).parents[1] / "rl" / "toy_rewards.py")


def _ctx(stage_dir: Path, name: str, seed: int = 0) -> StageContext:
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, kind=name, stage_dir=stage_dir, run_dir=stage_dir.parent, seed=seed,
                        recipe_name="test")


def _weights(model_dir) -> dict[str, torch.Tensor]:
    r = CheckpointReader(model_dir)
    return {n: r.get(n) for n in r.names()}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("warp_data")
    write_jsonl(d / "train.jsonl", generate("math", 16, seed=0, split="train", fmt="prompt"))
    write_jsonl(d / "eval.jsonl", generate("math", 4, seed=0, split="eval", fmt="prompt"))
    return d


def _warp_config(model_dir, prompts, **overrides):
    from posttrain.stages.rl.warp import WarpStageConfig

    base = dict(model=str(model_dir), dataset=str(prompts / "train.jsonl"), eval_dataset=str(prompts / "eval.jsonl"),
                rewards=[{"name": "brevity", "fn": f"{REWARDS}:brevity"}], num_generations=2, prompts_per_step=2,
                max_steps=2, max_new_tokens=4, learning_rate=5e-3, checkpoint_every=1, eval_every=1,
                rollout={"backend": "transformers"}, runs=2, iterations=2, eta=0.3, front_etas=[0.0, 0.5, 1.0],
                front_kl_samples=2)
    base.update(overrides)
    return WarpStageConfig(**base)


def test_merge_stage_writes_a_loadable_model_and_reports_task_vector_angles(tiny_gemma3_dir, tmp_path):
    from posttrain.modeling import load_causal_lm
    from posttrain.stages.merge import MergeStageConfig, run_merge

    dirs = []
    for i in range(2):
        model = load_causal_lm(tiny_gemma3_dir)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model.save_pretrained(str(tmp_path / f"m{i}"))
        dirs.append(str(tmp_path / f"m{i}"))
    cfg = MergeStageConfig(method="slerp", init=str(tiny_gemma3_dir), models=dirs, eta=0.5)
    result = run_merge(cfg, _ctx(tmp_path / "merge", "merge"))
    out = Path(result.outputs["model"])
    assert load_causal_lm(out) is not None and (out / "tokenizer.json").exists()
    assert abs(result.metrics["task_vectors/cosine"]) < 0.05  # independent random perturbations
    assert any(k.startswith("task_vectors/model.layers.*.") and k.endswith("/angle_deg") for k in result.metrics)
    assert json.loads((tmp_path / "merge" / "task_vectors.json").read_text())["all"]["norms"]


def test_merge_and_warp_config_errors_name_the_key(tiny_gemma3_dir, prompts):
    from posttrain.stages.merge import MergeStageConfig

    with pytest.raises(ValidationError, match="models"):
        MergeStageConfig(init="a", models=["b"])
    with pytest.raises(ValidationError, match="init"):
        MergeStageConfig(models=["a", "b"])
    with pytest.raises(ValidationError, match="lam"):
        MergeStageConfig(init="a", models=["a", "b", "c"], lam=0.3)
    with pytest.raises(ValidationError, match="eval_dataset"):
        _warp_config(tiny_gemma3_dir, prompts, eval_dataset=None)
    with pytest.raises(ValidationError, match="front_etas"):
        _warp_config(tiny_gemma3_dir, prompts, front_etas=[1.5])


def test_warp_runs_merges_iterates_scores_the_front_and_resumes(tiny_gemma3_dir, prompts, tmp_path, monkeypatch):
    import posttrain.stages.rl.warp as warp
    from posttrain.stages.rl import RLOO

    cfg = _warp_config(tiny_gemma3_dir, prompts)
    stage = tmp_path / "warp"
    # Kill the stage during the second step of iteration 2's first run (the 6th rl step overall),
    # after its step-1 checkpoint; then run it again.
    real_step, calls = RLOO.step, {"n": 0}

    def crash_once(self, state, step):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, state, step)

    monkeypatch.setattr(RLOO, "step", crash_once)  # the loop looks the step up on the algorithm
    with pytest.raises(KeyboardInterrupt):
        warp.run_warp(cfg, _ctx(stage, "warp"))
    assert (stage / "iteration_1" / "liti" / "manifest.json").exists()
    assert not (stage / "iteration_2" / "run_1" / "manifest.json").exists()

    started = []
    real_run_rl = warp.run_rl
    monkeypatch.setattr(warp, "run_rl", lambda c, ctx: started.append(ctx.stage_dir.name) or real_run_rl(c, ctx))
    result = warp.run_warp(cfg, _ctx(stage, "warp"))
    assert started == ["run_1", "run_2"]  # iteration 1's runs were complete and skipped
    assert [json.loads(l)["step"] for l in (stage / "iteration_2" / "run_1" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)] == [1, 2]  # resumed from its checkpoint: each step once

    # Runs differ (seeds), iteration 2 starts at iteration 1's LITI point, LITI is (1-eta) init + eta merge.
    m1 = json.loads((stage / "iteration_1" / "run_1" / "manifest.json").read_text())
    m2 = json.loads((stage / "iteration_1" / "run_2" / "manifest.json").read_text())
    assert m1["seed"] != m2["seed"]
    assert json.loads((stage / "iteration_2" / "run_1" / "manifest.json").read_text())["start"] == \
        str(stage / "iteration_1" / "liti" / "model")
    init, merged, lit = (_weights(tiny_gemma3_dir), _weights(stage / "iteration_1" / "merge" / "model"),
                         _weights(stage / "iteration_1" / "liti" / "model"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(lit[name], 0.7 * init[name] + 0.3 * merged[name], atol=1e-6)
    assert not torch.equal(_weights(stage / "iteration_1" / "run_1" / "model")[name],
                           _weights(stage / "iteration_1" / "run_2" / "model")[name])

    # Outputs: the last LITI point, and the front with its table and plot.
    assert result.outputs["model"] == str(stage / "iteration_2" / "liti" / "model")
    front = Path(result.outputs["front"])
    rows = {r["point"]: r for r in map(json.loads, (front / "front.jsonl").read_text().splitlines())}
    assert {"front/eta_0", "front/eta_0.5", "front/eta_1", "iteration_1/run_1", "iteration_2/merge",
            "iteration_2/liti"} <= set(rows)
    assert rows["front/eta_0"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the SFT model itself
    assert rows["front/eta_1"]["kl"] == pytest.approx(rows["iteration_2/merge"]["kl"], abs=1e-5)
    assert (front / "front.png").stat().st_size > 0 and "| front/eta_0.5 |" in (front / "front.md").read_text()
    traj = json.loads((front / "trajectories.json").read_text())
    assert len(traj["iteration_1/run_1"]) == 3 and traj["iteration_1/run_1"][0][0] == 0.0
    assert "iteration_2/task_vectors/cosine" in result.metrics and "front/eta_1/reward" in result.metrics



MIX = {"math": 1, "code": 1, "instructions": 1, "chat": 1}


def test_warp_with_jbond_runs_on_a_reward_model_beside_the_verifiers(tiny_gemma3_dir, toy_tokenizer, tmp_path,
                                                                    monkeypatch):
    """`algorithm: jbond` inside warp, rewarded by a reward model (a tiny sequence classifier, not
    trained) beside the math, code and instruction verifiers, weighted, on a mix of their prompts:
    every run is a J-BOND run; a step, or a held-out share, with no row of some task still scores
    (that verifier does not apply: None, not a fault); the merges, LITI and front follow as for RLOO."""
    import posttrain.stages.rl.warp as warp
    from posttrain.toy.models import TinyModelSpec, build_tiny_model

    rm = tmp_path / "rm"
    build_tiny_model(TinyModelSpec(arch="gemma3", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                   head_dim=32, intermediate_size=128, head="sequence_classification"),
                     toy_tokenizer, rm)
    write_jsonl(tmp_path / "train.jsonl", generate("mix", 16, seed=0, fmt="prompt", mix=MIX))
    write_jsonl(tmp_path / "eval.jsonl", generate("mix", 4, seed=0, split="eval", fmt="prompt", mix=MIX))
    rewards = [{"name": "rm", "fn": "reward_model", "kwargs": {"checkpoints": str(rm)}, "weight": 0.25},
               {"name": "math"}, {"name": "code", "weight": 0.5}, {"name": "instructions"}]
    cfg = _warp_config(tiny_gemma3_dir, tmp_path, rewards=rewards, algorithm="jbond", bond={"jeffreys_beta": 0.5},
                       num_generations=4, iterations=1, max_steps=2, eval_every=0, front_etas=[1.0],
                       max_new_tokens=6, eval_max_prompts=1)  # one held-out row: one task of the four
    run_configs = []
    real_run_rl = warp.run_rl
    monkeypatch.setattr(warp, "run_rl", lambda c, ctx: run_configs.append(c) or real_run_rl(c, ctx))
    result = warp.run_warp(cfg, _ctx(tmp_path / "warp", "warp"))
    assert [c.algorithm for c in run_configs] == ["jbond", "jbond"]
    assert all(c.bond.jeffreys_beta == 0.5 and c.anchor_ema == 0.02 for c in run_configs)
    not_applicable = 0
    for m in (1, 2):
        steps = [json.loads(l) for l in (tmp_path / "warp" / "iteration_1" / f"run_{m}" / "metrics.jsonl")
                 .read_text().splitlines() if "loss" in json.loads(l)]
        assert len(steps) == 2 and all("ties/step" in r for r in steps), "J-BOND steps, with their tie counts"
        not_applicable += sum(r[f"reward/{v}/mean"] != r[f"reward/{v}/mean"] for r in steps  # NaN: no row of it
                              for v in ("math", "code", "instructions"))
        for name in ("rm", "math", "code", "instructions"):
            assert all(r[f"reward/{name}/faults"] == 0 for r in steps), name
        assert all(r["reward/rm/mean"] == r["reward/rm/mean"] for r in steps)  # the reward model scored (not NaN)
    assert not_applicable > 0, "some step drew no row of some task, and went on"
    rows = {r["point"]: r for r in map(json.loads, (Path(result.outputs["front"]) / "front.jsonl").read_text().splitlines())}
    assert rows["front/eta_1"]["kl"] == pytest.approx(rows["iteration_1/merge"]["kl"], abs=1e-5)
    assert {"rm", "math", "code", "instructions"} <= set(rows["iteration_1/merge"])  # held-out reward per verifier
