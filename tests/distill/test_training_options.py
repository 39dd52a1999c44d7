"""The distill stage on posttrain.training: resume after a crash, token-budget micro-batches,
gradient checkpointing, placement of the teacher. Real tiny models, real engine, CPU."""

from __future__ import annotations

import json

import pytest
import torch

import posttrain.stages.distill as distill
from posttrain.data import write_jsonl
from posttrain.stages.base import StageContext
from posttrain.stages.distill import DistillStageConfig, run_distill
from posttrain.toy import tasks
from posttrain.training import TrainingSetupError


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill_opts") / "chat.jsonl"
    write_jsonl(path, tasks.generate("math", 32, seed=3, fmt="chat"))
    return path


def _run(tmp_path, name, cfg: DistillStageConfig):
    stage = tmp_path / name
    stage.mkdir(exist_ok=True)
    result = run_distill(cfg, StageContext(name=name, kind="distill", stage_dir=stage, run_dir=tmp_path, seed=0,
                                           recipe_name="t"))
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def _weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(result.outputs["model"] + "/model.safetensors")


def _config(student, teacher, data, **kw) -> DistillStageConfig:
    base = dict(model=str(student), teacher=str(teacher), dataset=str(data), lambda_on_policy=0.5, max_steps=4,
                batch_size=4, max_new_tokens=6, learning_rate=2e-3, divergence="forward_kl", target="sampled", k=8,
                rollout={"backend": "transformers"})
    base.update(kw)
    return DistillStageConfig(**base)


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(
        tmp_path, chat, tiny_gemma3_dir, math_teacher_dir, monkeypatch):
    cfg = _config(tiny_gemma3_dir, math_teacher_dir, chat, checkpoint_every=2)
    whole, whole_rows = _run(tmp_path, "whole", cfg)

    real_loss = distill.distillation_loss
    calls = {"n": 0}

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # one micro-batch per step: the third call is step 3
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill, "distillation_loss", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, "broken", cfg)
    assert (tmp_path / "broken" / "checkpoints" / "step_000002" / "state.json").exists()
    monkeypatch.setattr(distill, "distillation_loss", real_loss)
    resumed, resumed_rows = _run(tmp_path, "broken", cfg)

    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]  # steps after the checkpoint were redone, once
    for a, b in zip(whole_rows, resumed_rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
    w1, w2 = _weights(whole), _weights(resumed)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-6


def test_a_token_budget_splits_the_batch_without_changing_the_update(tmp_path, chat, tiny_gemma3_dir, math_teacher_dir):
    cfg = _config(tiny_gemma3_dir, math_teacher_dir, chat, lambda_on_policy=0.0, target="full", divergence="jsd",
                  max_steps=2)
    _, one = _run(tmp_path, "one", cfg)
    _, split = _run(tmp_path, "split", cfg.model_copy(update={"max_tokens_per_microbatch": 64}))
    assert all(r["micro_batches"] == 1 for r in one)
    assert all(r["micro_batches"] > 1 for r in split)
    for a, b in zip(one, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, chat, tiny_gemma3_dir, math_teacher_dir):
    cfg = _config(tiny_gemma3_dir, math_teacher_dir, chat, lambda_on_policy=0.0, target="full", max_steps=2)
    _, plain = _run(tmp_path, "plain", cfg)
    _, ckpt = _run(tmp_path, "ckpt", cfg.model_copy(update={"gradient_checkpointing": True}))
    for a, b in zip(plain, ckpt):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_teacher_placement_is_checked(tmp_path, chat, tiny_gemma3_dir, math_teacher_dir):
    _, rows = _run(tmp_path, "cpu", _config(tiny_gemma3_dir, math_teacher_dir, chat, teacher_placement="cpu",
                                            max_steps=1))
    assert len(rows) == 1
    with pytest.raises(TrainingSetupError, match="teacher_placement"):
        _run(tmp_path, "bad", _config(tiny_gemma3_dir, math_teacher_dir, chat, teacher_placement="gpu0", max_steps=1))
    if not torch.cuda.is_available():
        with pytest.raises(TrainingSetupError, match="CUDA is not available"):
            _run(tmp_path, "nocuda", _config(tiny_gemma3_dir, math_teacher_dir, chat, teacher_placement="cuda:1",
                                             max_steps=1))
