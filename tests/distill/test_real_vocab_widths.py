"""Distillation between Gemma 3 checkpoints whose output layers differ only by padding rows.

Gemma 3 1B has 262,144 output rows and Gemma 3 4B/12B/27B 262,208, with one shared tokenizer.
The models here take the 1B and 12B text configs as published (vocabulary widths, attention
layout, sliding windows, RoPE bases) with the widths of the residual stream, the MLP and the
depth shrunk so they run on a CPU; the distill stage must train the "1B" from the "12B" over the
tokenizer's ids, with chunked projections (no [batch, length, 262k] tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.data import write_jsonl
from posttrain.stages.base import StageContext
from posttrain.sequences import TokenizerMismatchError
from posttrain.stages.distill import DistillStageConfig, run_distill
from posttrain.toy.tasks import generate

# Fields of the published Gemma 3 1B (text) and 12B (text_config) configs that shape the model;
# hidden_size, intermediate_size and the layer count are shrunk below.
GEMMA3_1B = dict(vocab_size=262_144, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                 sliding_window=512, rope_theta=1_000_000.0, query_pre_attn_scalar=256,
                 max_position_embeddings=32_768, final_logit_softcapping=None, attn_logit_softcapping=None)
GEMMA3_12B = dict(vocab_size=262_208, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                  sliding_window=1024, rope_theta=1_000_000.0, query_pre_attn_scalar=256,
                  max_position_embeddings=131_072, final_logit_softcapping=None, attn_logit_softcapping=None)


def _build(published: dict, tokenizer, out: Path, hidden: int, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    fields = dict(published)
    fields.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**fields)).to(torch.float32)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gemma3_pair(tmp_path_factory, toy_tokenizer):
    root = tmp_path_factory.mktemp("gemma3_widths")
    student = _build(GEMMA3_1B, toy_tokenizer, root / "student_1b", hidden=64, seed=0)
    teacher = _build(GEMMA3_12B, toy_tokenizer, root / "teacher_12b", hidden=96, seed=1)
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, generate("math", 16, seed=0, split="train", fmt="chat"))
    return student, teacher, prompts


def test_a_12b_teacher_distils_into_a_1b_student_over_the_shared_ids(gemma3_pair, tmp_path):
    student, teacher, data = gemma3_pair
    cfg = DistillStageConfig(model=str(student), teacher=str(teacher), dataset=str(data), lambda_on_policy=0.5,
                             divergence="forward_kl", target="sampled", k=16, max_steps=3, batch_size=4,
                             learning_rate=1e-3, max_new_tokens=6, chunk_size=16,
                             rollout={"backend": "transformers"})
    stage = tmp_path / "distill"
    stage.mkdir()
    result = run_distill(cfg, StageContext(name="distill", kind="distill", stage_dir=stage, run_dir=tmp_path, seed=0,
                                           recipe_name="t"))
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert result.metrics["world_size"] == 1 and result.metrics["device"] == "cpu"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(result.outputs["model"]).vocab_size == 262_144  # the student keeps its width


def test_full_divergences_compare_the_shared_rows_too(gemma3_pair, tmp_path):
    student, teacher, data = gemma3_pair
    cfg = DistillStageConfig(model=str(student), teacher=str(teacher), dataset=str(data), lambda_on_policy=0.0,
                             divergence="jsd", target="full", max_steps=1, batch_size=2, chunk_size=8,
                             rollout={"backend": "transformers"})
    stage = tmp_path / "distill"
    stage.mkdir()
    run_distill(cfg, StageContext(name="distill", kind="distill", stage_dir=stage, run_dir=tmp_path, seed=0,
                                  recipe_name="t"))
    row = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl_teacher_student"] >= 0 and row["kl_student_teacher"] >= 0


def test_a_teacher_narrower_than_the_tokenizer_is_refused(toy_tokenizer, tmp_path, gemma3_pair):
    student, _, data = gemma3_pair
    narrow = dict(GEMMA3_1B, vocab_size=len(toy_tokenizer) // 2)
    teacher = _build(narrow, toy_tokenizer, tmp_path / "narrow", hidden=64, seed=2)
    cfg = DistillStageConfig(model=str(student), teacher=str(teacher), dataset=str(data), lambda_on_policy=0.0,
                             max_steps=1, batch_size=2, rollout={"backend": "transformers"})
    stage = tmp_path / "distill"
    stage.mkdir()
    with pytest.raises(TokenizerMismatchError, match="padding rows"):
        run_distill(cfg, StageContext(name="distill", kind="distill", stage_dir=stage, run_dir=tmp_path, seed=0,
                                      recipe_name="t"))
