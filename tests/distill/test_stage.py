"""The distill and distill_cache stages on the tiny-model world (real models, real training, real engine)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from quick_training import write_toy_sets
from tiny_recipes import recipe_header, stage

from posttrain.data import TokenSequence
from posttrain.modeling import end_of_turn_id
from posttrain.sequences import TokenizerMismatchError, logit_mask, pad_batch
from posttrain.stages.base import StageContext, StageError
from posttrain.stages.distill import DistillStageConfig, distillation_loss, run_distill
from posttrain.stages.distill_cache import DistillCacheStageConfig, run_distill_cache
from posttrain.toy import tasks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill_data")
    write_toy_sets(d, {"math_chat": ("math", 64, 1, "train", "chat"), "math_prompts": ("math", 64, 1, "train", "prompt"),
                       "math_eval": ("math", 16, 2, "eval", "prompt")})
    return d


def _ctx(tmp_path, name="distill"):
    stage_dir = tmp_path / name
    stage_dir.mkdir()
    return StageContext(name=name, kind=name, stage_dir=stage_dir, run_dir=tmp_path, seed=0, recipe_name="t")


def _metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_distillation_moves_the_student_towards_the_teacher(tmp_path, data, tiny_gemma3_dir, math_teacher_dir):
    cfg = DistillStageConfig(
        model=str(tiny_gemma3_dir), teacher=str(math_teacher_dir), dataset=str(data / "math_prompts.jsonl"),
        eval_dataset=str(data / "math_eval.jsonl"), eval_limit=8, lambda_on_policy=1.0, max_steps=8, batch_size=4,
        max_new_tokens=12, learning_rate=2e-3, chunk_size=8, rollout={"backend": "transformers"})
    ctx = _ctx(tmp_path)
    result = run_distill(cfg, ctx)

    m = result.metrics
    assert m["eval_kl_teacher_student_after"] < m["eval_kl_teacher_student_before"]
    assert m["fraction_on_policy"] == 1.0 and 0.0 <= m["accuracy_after"] <= 1.0
    rows = _metrics(ctx.stage_dir)
    assert len(rows) == 8
    for key in ("loss", "kl_teacher_student", "kl_student_teacher", "fraction_on_policy", "tokens_per_s", "drift_mean_abs"):
        assert key in rows[-1]
    # weights are pushed after every step, so the engine samples with exactly the trainer's weights
    assert max(r["drift_mean_abs"] for r in rows) < 1e-3
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(result.outputs["model"]) is not None


def test_supervised_kd_with_sampled_targets_and_lora(tmp_path, data, tiny_gemma3_dir, math_teacher_dir):
    cfg = DistillStageConfig(
        model=str(tiny_gemma3_dir), teacher=str(math_teacher_dir), dataset=str(data / "math_chat.jsonl"),
        lambda_on_policy=0.0, divergence="forward_kl", target="sampled", k=32, max_steps=6, batch_size=4,
        learning_rate=1e-2, lora={"r": 4, "alpha": 8})
    ctx = _ctx(tmp_path)
    result = run_distill(cfg, ctx)
    rows = _metrics(ctx.stage_dir)
    assert all(r["on_policy"] == 0 for r in rows)
    assert rows[-1]["kl_teacher_student"] < rows[0]["kl_teacher_student"]
    assert (tmp_path / "distill" / "model" / "model.safetensors").exists()
    assert result.metrics["fraction_on_policy"] == 0.0


def test_cache_stage_then_training_from_the_cache_without_a_teacher(tmp_path, data, tiny_gemma3_dir, math_teacher_dir):
    cache_cfg = DistillCacheStageConfig(teacher=str(math_teacher_dir), student=str(tiny_gemma3_dir),
                                        dataset=str(data / "math_chat.jsonl"), k=16, shard_size=10, limit=24)
    cache_result = run_distill_cache(cache_cfg, _ctx(tmp_path, "distill_cache"))
    assert cache_result.metrics["sequences"] == 24
    assert cache_result.metrics["bytes_per_token"] == 16 * 6
    assert len(list((tmp_path / "distill_cache" / "cache").glob("shard-*.safetensors"))) == 3

    cfg = DistillStageConfig(model=str(tiny_gemma3_dir), teacher_cache=cache_result.outputs["cache"],
                             lambda_on_policy=0.0, divergence="forward_kl", max_steps=6, batch_size=4, learning_rate=3e-3)
    ctx = _ctx(tmp_path)
    run_distill(cfg, ctx)
    losses = [r["loss"] for r in _metrics(ctx.stage_dir)]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_a_stage_error_mid_run_still_closes_the_rollout_engine(tmp_path, data, tiny_gemma3_dir, math_teacher_dir,
                                                               monkeypatch):
    # A teacher whose final norm is NaN makes every loss NaN: step 1 raises a StageError after the
    # real engine has sampled. The engine class is spied on (its own __init__ and close still
    # run), to see that the run released the engine on its way out.
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import load_tokenizer
    from posttrain.rollout.transformers_engine import TransformersEngine

    nan_teacher = tmp_path / "nan_teacher"
    teacher = AutoModelForCausalLM.from_pretrained(math_teacher_dir)
    with torch.no_grad():
        teacher.get_decoder().norm.weight.fill_(float("nan"))
    teacher.save_pretrained(nan_teacher)
    load_tokenizer(math_teacher_dir).save_pretrained(nan_teacher)
    opened = []
    real_init = TransformersEngine.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(TransformersEngine, "__init__", recording_init)
    cfg = DistillStageConfig(model=str(tiny_gemma3_dir), teacher=str(nan_teacher),
                             dataset=str(data / "math_prompts.jsonl"), lambda_on_policy=1.0, max_steps=2, batch_size=4, max_new_tokens=6,
                             rollout={"backend": "transformers"})
    with pytest.raises(StageError, match="step 1: the distillation loss is nan"):
        run_distill(cfg, _ctx(tmp_path))
    assert len(opened) == 1
    assert opened[0].model is None  # closed: the engine let go of its copy of the student


def test_tokenizer_mismatch_is_refused_naming_both_models(tmp_path, data, tiny_gemma3_dir):
    from posttrain.modeling import load_tokenizer
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    other_tok_dir = tmp_path / "other_tok"
    build_toy_tokenizer(other_tok_dir, vocab_size=640)
    other = tmp_path / "other_teacher"
    build_tiny_model(TinyModelSpec(), load_tokenizer(other_tok_dir), other)
    cfg = DistillStageConfig(model=str(tiny_gemma3_dir), teacher=str(other), dataset=str(data / "math_chat.jsonl"),
                             max_steps=1)
    with pytest.raises(TokenizerMismatchError) as e:
        run_distill(cfg, _ctx(tmp_path))
    assert str(other) in str(e.value) and str(tiny_gemma3_dir) in str(e.value)
    assert "vocabularies differ" in str(e.value)


def test_config_refuses_inconsistent_settings():
    with pytest.raises(ValidationError, match="need a teacher"):
        DistillStageConfig(model="s", teacher_cache="c", lambda_on_policy=0.5)
    with pytest.raises(ValidationError, match="set divergence: forward_kl"):
        DistillStageConfig(model="s", teacher="t", dataset="d", target="sampled", divergence="jsd")
    with pytest.raises(ValidationError, match="extra"):
        DistillStageConfig(model="s", teacher="t", dataset="d", lamda=0.5)


def test_prompt_only_data_cannot_serve_off_policy_batches(tmp_path, data, tiny_gemma3_dir, math_teacher_dir):
    cfg = DistillStageConfig(model=str(tiny_gemma3_dir), teacher=str(math_teacher_dir),
                             dataset=str(data / "math_prompts.jsonl"), lambda_on_policy=0.5, max_steps=1)
    with pytest.raises(StageError, match="need rows with completions"):
        run_distill(cfg, _ctx(tmp_path))


def test_end_of_turn_counts_when_pad_is_the_same_id_and_prompt_never_does(toy_tokenizer):
    from posttrain.chat import tokenize_conversation

    eot = end_of_turn_id(toy_tokenizer)
    row = tasks.generate("math", 1, fmt="chat")[0]
    tc = tokenize_conversation(toy_tokenizer, row["messages"])
    short = TokenSequence(tc.input_ids[:6], [0] * 6)
    batch = pad_batch([TokenSequence(tc.input_ids, tc.loss_mask), short], pad_id=eot)
    mask = logit_mask(batch["loss_mask"])
    ids = batch["input_ids"]
    # the logit predicting the completion's <end_of_turn> counts...
    eot_positions = [n for n in range(ids.shape[1] - 1) if ids[0, n + 1] == eot and mask[0, n]]
    assert eot_positions, "the end-of-turn token must be trained on"
    # ...while padding (the same id) and prompt tokens never do
    assert mask[1].sum() == 0
    prompt_len = tc.loss_mask.index(1)
    assert mask[0, :prompt_len - 1].sum() == 0

    # the loss sees the end-of-turn position: its gradient is non-zero there and zero on padding
    vocab = len(toy_tokenizer)
    student = torch.randn(2, ids.shape[1] - 1, vocab, requires_grad=True)
    teacher = torch.randn(2, ids.shape[1] - 1, vocab)
    cfg = DistillStageConfig(model="s", teacher="t", dataset="d")
    distillation_loss(cfg, student, mask, teacher).backward()
    assert student.grad[0, eot_positions[-1]].abs().sum() > 0
    assert student.grad[1].abs().sum() == 0


def test_distill_stage_inside_a_recipe(tmp_path, tiny_gemma3_dir, math_teacher_dir):
    from posttrain.pipeline.runner import run_recipe

    recipe = tmp_path / "recipe.yaml"
    header = recipe_header(
        "distill-test", output_dir=str(tmp_path / "run"),
        models={"student": f"{{path: {tiny_gemma3_dir}}}", "teacher": f"{{path: {math_teacher_dir}}}"},
        datasets={"math_chat": "{toy: {task: math, n: 24, split: train, format: chat}}"})
    cache_stage = stage("teacher_cache", "distill_cache", teacher="${models.teacher}", dataset="${datasets.math_chat}",
                        k=16)
    distill_stage = stage("distill", "distill", model="${models.student}", teacher="${models.teacher}",
                          teacher_cache="${stages.teacher_cache.cache}", dataset="${datasets.math_chat}",
                          lambda_on_policy=0.5, divergence="forward_kl", target="sampled", k=16, max_steps=3,
                          batch_size=4, max_new_tokens=12, rollout={"backend": "transformers"})
    recipe.write_text(header + cache_stage + distill_stage)
    manifests = run_recipe(recipe)
    cache, distilled = manifests["teacher_cache"], manifests["distill"]
    assert cache["status"] == "complete" and distilled["status"] == "complete"
    assert distilled["config"]["teacher_cache"] == cache["outputs"]["cache"]
    assert distilled["metrics"]["steps"] == 3
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(distilled["outputs"]["model"]) is not None
