"""`qat`: quantisation-aware training by distillation from the full-precision model (Gemma 3, section 2.3).

Gemma 3's quantised checkpoints come from a short finetune (about 5,000 steps) of each model
with its weights fake-quantised in the forward pass, trained towards the probabilities of the
non-quantised checkpoint on data like the pre- and post-training data. The loop, per step:

    a batch of (prompt, completion) sequences drawn from the dataset mixture by weight;
    the teacher (by default the start checkpoint itself, in full precision) scores every
        completion position (full logits, or a sparse top-k / sampled target), without gradient;
    the student runs with every quantised weight replaced by Q(w) (posttrain.quantization),
        the loss is the configured divergence, and the gradient reaches the latent float
        weights through the rounding unchanged (straight-through estimator);
    optimizer step on the latent weights.

Before the first step and after the last, the KL from the teacher to the quantised student is
measured on held-out prompts answered greedily by the teacher: the "before" figure is plain
round-to-nearest quantisation (PTQ) of the start checkpoint, the "after" figure is QAT's.
The saved model holds the latent float weights with `quantization.json` beside them naming the
scheme; `export` with the matching `quantize:` writes exactly the weights trained with.
"""

from __future__ import annotations

import json
import random
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.allocator import retain_freed_memory
from posttrain.data import DataError, TokenSequence, load_distill_rows
from posttrain.losses.distillation import Divergence, gkd_loss
from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.quantization import QuantSpec, attach_fake_quantization, detach_fake_quantization
from posttrain.sequences import (check_same_tokenizer, logit_mask, logits_on_device, on_model_device, pad_batch,
                                 shifted_logits, summed_kls)
from posttrain.stages.base import StageContext, StageError, StageResult, register_stage
from posttrain.stages.options import DistillationOptions, TrainingOptions, stage_default
from posttrain.training import (TrainingSession, checkpoint_due, place_frozen, resolve_placement, resume_latest,
                                save_checkpoint, save_model, token_budget_batches)

QUANTIZATION_FILE = "quantization.json"  # beside the saved weights: the scheme they were trained for


class WeightedDataset(BaseModel):
    """One source of a dataset mixture."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Rows with completions: ${datasets.NAME}, ${stages.NAME.dataset} or a path.")
    weight: float = Field(1.0, gt=0, description="Relative share of the batches' sequences drawn from this source.")


class QATStageConfig(TrainingOptions, DistillationOptions):
    """Quantisation-aware training: distil the full-precision model into its fake-quantised self (STE).

    The optimizer, schedule, precision, memory, checkpoint and tracker options are the shared ones
    (posttrain.stages.options.TrainingOptions), the loss's those of every distillation loop
    (DistillationOptions); qat trains towards the teacher's probabilities with a forward KL by
    default, and trains all weights (no LoRA: an adapter's float delta has no place in an integer
    format)."""

    divergence: Divergence = stage_default("divergence", "forward_kl")
    checkpoint_every: int = stage_default("checkpoint_every", 0)

    model: str = Field(description="Start checkpoint, trained with its weights fake-quantised: "
                       "${stages.NAME.model}, ${models.NAME} or a path.")
    teacher: str | None = Field(None, description="Full-precision targets; defaults to `model` itself (Gemma 3's "
                                "QAT targets are the non-quantised checkpoint's probabilities). Any causal LM sharing "
                                "the tokenizer.")
    dataset: str | list[WeightedDataset] = Field(
        description="Training rows (`messages` ending in an assistant turn, or `prompt` + `completion`): one "
        "dataset, or a list of {path, weight} mixed by weight.")
    scheme: Literal["int4_per_channel", "int4_per_block", "fp8"] = Field(
        "int4_per_block", description="Weight representation (Gemma 3 Table 3): int4 per output channel "
        "(compressed-tensors), int4 per block (GGUF Q4_0's rounding), or fp8 e4m3 per channel (compressed-tensors).")
    block_size: int = Field(32, ge=1, description="Weights per int4 block; GGUF Q4_0 needs 32.")
    block_format: Literal["gguf_q4_0", "compressed_tensors"] = Field(
        "gguf_q4_0", description="int4_per_block: round as GGUF Q4_0 does (export gguf q4_0) or as compressed-tensors' "
        "group quantiser does (export compressed-tensors int4_per_group).")
    quantize_embeddings: bool | None = Field(
        None, description="Fake-quantise the token embedding and output layer too; default: only for GGUF Q4_0, "
        "whose files store them quantised (compressed-tensors keeps them in full precision).")
    batch_size: int = Field(8, ge=1, description="Sequences per step (Gemma 3: about 5,000 steps in all).")
    max_length: int = Field(512, ge=8, description="Sequences are truncated to this many tokens.")
    max_new_tokens: int = Field(64, ge=1, description="Longest teacher answer to a held-out prompt.")
    eval_dataset: str | None = Field(None, description="Held-out prompt rows: KL(teacher||quantised student) on the "
                                     "teacher's greedy answers, before (= PTQ) and after training.")
    eval_limit: int = Field(64, ge=1, description="At most this many held-out prompts.")
    log_every: int = Field(1, ge=1, description="Log step metrics every this many steps.")

    @model_validator(mode="after")
    def _check(self):
        if self.lora is not None:
            raise ValueError("lora: qat trains every weight it fake-quantises; an adapter's float delta cannot be "
                             "stored in the integer format the export writes. Leave lora out")
        self.quant_spec()  # block_size / block_format combinations the formats cannot hold fail here
        return self

    def quant_spec(self) -> QuantSpec:
        try:
            return QuantSpec(self.scheme, self.block_size, self.block_format, self.quantize_embeddings)
        except ValueError as e:
            raise ValueError(str(e)) from None

    def sources(self) -> list[WeightedDataset]:
        return [WeightedDataset(path=self.dataset)] if isinstance(self.dataset, str) else list(self.dataset)


# --- data ----------------------------------------------------------------------------------------

def load_mixture(cfg: QATStageConfig, tokenizer) -> list[tuple[list[TokenSequence], float]]:
    """(sequences, weight) per source; every source must hold sequences with completions."""
    mixture = []
    for i, source in enumerate(cfg.sources()):
        _, sequences = load_distill_rows(source.path, tokenizer, cfg.max_length)
        if not sequences:
            raise DataError(f"dataset[{i}] {source.path}: no rows with a completion (`messages` ending in an "
                            "assistant turn, or `prompt` + `completion`); QAT trains on the teacher's view of them")
        mixture.append((sequences, source.weight))
    return mixture


def draw_batch(mixture: list[tuple[list[TokenSequence], float]], rng: random.Random, n: int) -> list[TokenSequence]:
    """n sequences: each from a source chosen with probability proportional to its weight."""
    weights = [w for _, w in mixture]
    picks = []
    for _ in range(n):
        rows = rng.choices(mixture, weights=weights)[0][0]
        picks.append(rows[rng.randrange(len(rows))])
    return picks


@torch.no_grad()
def teacher_answers(teacher, prompts: list[list[int]], pad_id: int, stop_ids: list[int], max_new_tokens: int,
                    batch_size: int = 16) -> list[TokenSequence]:
    """The teacher's greedy answers to held-out prompts, as sequences whose completion counts."""
    device = next(teacher.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        gen = teacher.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=stop_ids, pad_token_id=pad_id)
        for p, row in zip(group, gen[:, width:].tolist()):
            answer = []
            for t in row:
                answer.append(t)
                if t in stop_ids:
                    break
            out.append(TokenSequence(p + answer, [0] * len(p) + [1] * len(answer)))
    return out


# --- logits and losses ---------------------------------------------------------------------------

def qat_loss(cfg: QATStageConfig, student_logits, teacher_logits, mask: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    """The distillation loss of cfg's objective (posttrain.losses.distillation.gkd_loss)."""
    return gkd_loss(cfg.objective(cfg.chunk_size), student_logits, mask, teacher_logits, generator=generator)


# --- the stage -----------------------------------------------------------------------------------

def _heldout_kl(session: TrainingSession, student, teacher, heldout: list[TokenSequence], pad_id: int,
                cfg: QATStageConfig) -> dict[str, float]:
    """Per-token KLs over every rank's share of the held-out answers."""
    was_training = student.training
    student.eval()
    sums = summed_kls(student, teacher, heldout[session.rank::session.world_size], pad_id, cfg.temperature,
                      cfg.chunk_size)
    student.train(was_training)
    tokens = session.all_sum(sums.pop("tokens"))
    return {key: session.all_sum(value) / max(tokens, 1) for key, value in sums.items()}


def _train_step(cfg: QATStageConfig, session: TrainingSession, student, teacher, sequences: list[TokenSequence],
                pad_id: int, generator: torch.Generator) -> tuple[float, int, int]:
    """One optimizer step over the rank's sequences; returns (loss, counted tokens on this rank, micro-batches)."""
    counted = [sum(s.loss_mask[1:]) for s in sequences]
    global_count = session.all_sum(sum(counted) if cfg.reduction == "token_mean" else len(sequences))
    micro = token_budget_batches([len(s.input_ids) for s in sequences], cfg.max_tokens_per_microbatch)
    loss_total = 0.0
    for mb in micro:
        batch = {k: v.to(session.device) for k, v in pad_batch(sequences[mb], pad_id).items()}
        mask = logit_mask(batch["loss_mask"])
        local_count = float(mask.sum()) if cfg.reduction == "token_mean" else float(mask.shape[0])
        if local_count == 0:
            continue
        with session.autocast():
            with torch.no_grad():
                teacher_logits = logits_on_device(
                    shifted_logits(teacher, on_model_device(batch, teacher), cfg.chunk_size), session.device)
            student_logits = shifted_logits(student, batch, cfg.chunk_size)
            loss = qat_loss(cfg, student_logits, teacher_logits, mask, generator)
        if not torch.isfinite(loss):
            raise StageError(f"the QAT loss is {loss.item()}; lower learning_rate or temperature")
        (loss * (local_count / global_count)).backward()
        loss_total += loss.item() * local_count / global_count
    return session.all_sum(loss_total), sum(counted), len(micro)


@register_stage("qat", QATStageConfig, outputs=("model",), distributed=True)
def run_qat(cfg: QATStageConfig, ctx: StageContext) -> StageResult:
    """Quantisation-aware training by distillation from the full-precision model (Gemma 3 QAT)."""
    from posttrain.modeling import load_causal_lm, load_policy, load_tokenizer, output_rows, stop_token_ids

    retain_freed_memory()
    torch.manual_seed(ctx.seed)
    session = TrainingSession(cfg.precision, ctx.seed, cfg.sharding)
    if session.fsdp:
        raise StageError("sharding: qat trains its student whole on every rank (its fake-quantised layers are not "
                         "sharded); remove `sharding: fsdp` from the stage, or launch it data-parallel instead of "
                         "under an accelerate FSDP config")
    session.shard(range(cfg.batch_size), "batch_size")  # fails early unless the batch splits over the ranks
    spec = cfg.quant_spec()

    student, tokenizer = load_policy(cfg.model)
    pad_id = tokenizer.pad_token_id
    teacher_path = cfg.teacher or cfg.model
    if cfg.teacher is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher), cfg.model, cfg.teacher)
    teacher = load_causal_lm(teacher_path, dtype=cfg.teacher_dtype).eval()
    teacher = place_frozen(teacher, resolve_placement(cfg.teacher_placement, session.device, "teacher_placement"))
    s_rows, t_rows = output_rows(student), output_rows(teacher)
    if s_rows != t_rows:
        raise StageError(f"teacher {teacher_path} has {t_rows} output logits and model {cfg.model} has {s_rows}; "
                         "QAT compares them row for row, so they must match")
    mixture = load_mixture(cfg, tokenizer)

    try:
        quantised = attach_fake_quantization(student, spec)
    except ValueError as e:
        raise StageError(f"scheme {cfg.scheme}: {e}") from None
    student = session.prepare(student, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                              gradient_checkpointing=cfg.gradient_checkpointing, shard_optimizer=cfg.shard_optimizer)
    cfg = cfg.model_copy(update={"chunk_size": resolve_chunk_size(cfg.chunk_size, s_rows)})

    start_step = resume_latest(session, ctx.stage_dir, {"student": student}, ctx.stage_dir / "metrics.jsonl")["step"]

    summary: dict = session.describe(cfg.batch_size, "sequences")
    summary.update({"scheme": cfg.scheme, "quantised_modules": len(quantised),
                    "embeddings_quantised": spec.embeddings_quantised})
    heldout: list[TokenSequence] = []
    if cfg.eval_dataset:
        # The prompts of the held-out rows (prompt, or a conversation up to its last user turn).
        prompts = load_distill_rows(cfg.eval_dataset, tokenizer, cfg.max_length)[0][:cfg.eval_limit]
        heldout = teacher_answers(teacher, prompts, pad_id, stop_token_ids(tokenizer), cfg.max_new_tokens)
        if start_step == 0:  # the start checkpoint rounded to nearest: PTQ's figure
            summary.update({f"eval_{k}_before": v for k, v in _heldout_kl(session, student, teacher, heldout, pad_id,
                                                                          cfg).items()})

    last: dict = {}
    started = time.time()
    tokens_seen = 0
    with ctx.metrics(cfg.report_to) as metrics, ctx.progress(cfg.max_steps, "qat") as advance:
        advance(start_step)
        for step in range(start_step + 1, cfg.max_steps + 1):
            step_started = time.time()
            # The batch is a function of (seed, step): the same on every rank and on a resumed run.
            step_rng = random.Random(f"qat:{ctx.seed}:{step}")
            batch = session.shard(draw_batch(mixture, step_rng, cfg.batch_size), "batch_size")
            generator = torch.Generator(device=session.device).manual_seed(step_rng.randrange(2**31) + 7919 * session.rank)
            loss, counted, micro = _train_step(cfg, session, student, teacher, batch, pad_id, generator)
            result = session.step(cfg.max_grad_norm)
            if not result.finite:
                raise StageError(f"step {step}: the gradient norm is {result.grad_norm}; lower learning_rate")
            n_tokens = int(session.all_sum(counted))
            tokens_seen += n_tokens
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                row = {"loss": loss, "completion_tokens": n_tokens, "micro_batches": micro, "lr": session.learning_rate,
                       "tokens_per_s": n_tokens / max(time.time() - step_started, 1e-9)}
                if cfg.max_grad_norm:
                    row["grad_norm"] = result.grad_norm
                metrics.log(step, **row)
                last.update(row)
            if checkpoint_due(step, cfg.checkpoint_every, cfg.max_steps):
                save_checkpoint(session, ctx.stage_dir, step, {"student": student}, {}, cfg.keep_checkpoints)
            advance(1)
    seconds = time.time() - started

    if heldout:
        summary.update({f"eval_{k}_after": v for k, v in _heldout_kl(session, student, teacher, heldout, pad_id,
                                                                     cfg).items()})
    out = ctx.stage_dir / "model"
    if ctx.is_main:
        detach_fake_quantization(student)  # the latent float weights; export applies the same Q(w)
        save_model(student, tokenizer, out)
        (out / QUANTIZATION_FILE).write_text(json.dumps(
            {"scheme": spec.scheme, "block_size": spec.block_size, "block_format": spec.block_format,
             "quantize_embeddings": spec.embeddings_quantised, "modules": quantised}, indent=2))
    session.barrier()
    session.close()
    summary.update({"steps": cfg.max_steps, "loss_last": last.get("loss"), "train_seconds": round(seconds, 1),
                    "tokens_per_s": round(tokens_seen / max(seconds, 1e-9), 1)})
    return StageResult(outputs={"model": str(out)}, metrics=summary)
