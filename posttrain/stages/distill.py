"""`distill`: on-policy knowledge distillation from a teacher (GKD) with Gemma 3 sampled-logit targets.

The loop, per step (ALGORITHMS.md sections 1 and 2):
    with probability lambda_on_policy: the student samples completions for a batch of prompts
        through the rollout engine (no gradient flows through the sampling);
    otherwise: a batch of (prompt, completion) sequences from the dataset or the teacher cache;
    the teacher scores every completion position (full logits, or a sparse target: top-k,
        K sampled ids, or sampled counts) unless the batch came from the cache;
    loss = divergence between teacher and student at every completion position;
    optimizer step, then the new weights go to the rollout engine.
Prompt and padding positions never count; the end-of-turn token does (masks come from the
conversation, never from `ids != pad_id`).
"""

from __future__ import annotations

import math
import random
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.allocator import retain_freed_memory
from posttrain.chat import tokenize_prompt
from posttrain.data import DataError, iter_rows
from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.modeling import output_rows
from posttrain.rollout import RolloutConfig
from posttrain.sequences import (TokenizerMismatchError, TokenSequence, check_same_tokenizer,  # noqa: F401
                                 load_distill_rows, logit_mask, pad_batch)
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage
from posttrain.trackers import ReportTo
from posttrain.training import (PLACEMENT_HELP, ChunkSize, LoraSpec, TrainingSession, engine_asleep, latest_checkpoint,
                                load_checkpoint, place_frozen, resolve_placement, save_checkpoint, save_model,
                                token_budget_batches, truncate_metrics)


class DistillStageConfig(StageConfig):
    """On-policy distillation from a teacher (GKD; Gemma 3 sampled-logit targets; optional offline cache)."""

    model: str = Field(description="Student to train: ${stages.sft.model}, ${models.NAME} or a path.")
    teacher: str | None = Field(
        None, description="Teacher causal LM sharing the student's tokenizer (checked at start). Needed for "
        "on-policy batches; may be left out when every batch comes from teacher_cache (lambda_on_policy: 0).")
    dataset: str | None = Field(
        None, description="Rows: `prompt` (text or messages) for on-policy sampling; `messages` with an assistant "
        "turn or `prompt` + `completion` also serve off-policy batches (their prompt part is used on-policy).")
    teacher_cache: str | None = Field(
        None, description="Directory written by a distill_cache stage (${stages.NAME.cache}); off-policy batches "
        "then come from it and the teacher is not loaded for them.")
    lambda_on_policy: float = Field(
        0.5, ge=0, le=1, description="Probability that a step's batch is sampled by the student (GKD lambda); "
        "0 is supervised KD, 1 fully on-policy.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "jsd", description="Token-level divergence for target: full. forward_kl = KL(teacher||student), "
        "reverse_kl = KL(student||teacher), jsd = generalised JSD with mix beta.")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mix; 0 is exactly forward KL, 1 exactly reverse KL.")
    temperature: float = Field(
        1.0, gt=0, description="Applied to teacher and student logits in the loss and to the student's sampling.")
    target: Literal["full", "top_k", "sampled", "sampled_counts"] = Field(
        "full", description="Teacher target: the full distribution; its exact top-k renormalised; Gemma 3 sampled "
        "logits (k ids drawn from the teacher, target renormalised over them); or sampled_counts (k draws with "
        "replacement, target = counts / k, unbiased). Sparse targets train a cross-entropy (needs forward_kl).")
    k: int = Field(256, ge=1, description="Ids per position for top_k / sampled / sampled_counts targets.")
    with_replacement: bool = Field(
        False, description="sampled: draw the k ids with replacement (duplicates merged). sampled_counts always does.")
    student_normalisation: Literal["vocab", "set"] = Field(
        "vocab", description="Sparse targets: student log-probs from the softmax over the whole vocabulary, or "
        "renormalised over the sampled ids only.")
    reduction: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="Average the divergence over all completion tokens of the batch, or per "
        "sequence first (GKD's (1/L) sum_n) and then over sequences.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per step.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (constant after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null turns clipping off.")
    max_new_tokens: int = Field(64, ge=1, description="Longest student sample (stop token included).")
    max_length: int = Field(512, ge=8, description="Off-policy sequences are truncated to this many tokens.")
    chunk_size: ChunkSize = Field(
        "auto", description="Completion positions per loss chunk: teacher and student hidden states are projected "
        "to the vocabulary (and the float32 loss computed) one chunk at a time, recomputed in backward, so "
        "[batch, length, vocab] logits never exist. auto: as many positions as fit 2**25 logits, so a chunk's "
        "memory is the same whatever the vocabulary; null uses the models' full logits at once.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Teacher weights and logits dtype (bfloat16 halves teacher memory on GPUs).")
    teacher_placement: str = Field("accelerator", description="Where the teacher lives: " + PLACEMENT_HELP + ".")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the student's and teacher's forward passes run under bf16 autocast while the "
        "student's weights, optimizer state and the loss stay float32 (TRL's bf16=True).")
    max_tokens_per_microbatch: int | None = Field(
        None, ge=1, description="Bound each forward/backward micro-batch by this many tokens (whole sequences) and "
        "accumulate them into the step's update; null: the whole batch at once.")
    shard_optimizer: bool = Field(False, description="Data-parallel launches: shard AdamW's state over the ranks "
                                  "(ZeRO stage 1, torch's ZeroRedundancyOptimizer); the weights stay whole on every "
                                  "rank. On automatically under a DeepSpeed ZeRO-1/2 launch.")
    gradient_checkpointing: bool = Field(False, description="Recompute the student's activations in backward.")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every this many steps (0: never); "
                                  "re-running the stage resumes from the newest.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest this many checkpoints.")
    sync_weights_every: int = Field(
        1, ge=1, description="Push the student's weights to the rollout engine every this many steps (1 keeps "
        "sampling exactly on-policy; larger values trade staleness, visible as drift, for speed).")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights; the saved model is merged.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout engine for student samples.")
    eval_dataset: str | None = Field(
        None, description="Held-out prompt rows: accuracy (eval_reward) and KL(teacher||student) on student samples "
        "are measured before and after training.")
    eval_reward: str = Field("math", description="Reward that decides accuracy on eval_dataset (registry name; > 0.5 counts correct).")
    eval_limit: int = Field(128, ge=1, description="At most this many eval prompts.")
    eval_teacher: bool = Field(False, description="Also measure the teacher's accuracy on eval_dataset, for comparison.")
    log_every: int = Field(1, ge=1, description="Log step metrics every this many steps.")
    report_to: ReportTo = Field(default_factory=list, description="Extra trackers: tensorboard, wandb, trackio "
                                "(the `trackers` extra installs them).")

    @model_validator(mode="after")
    def _check(self):
        if self.teacher is None and self.teacher_cache is None:
            raise ValueError("teacher: give a teacher model, a teacher_cache, or both")
        if self.teacher is None and self.lambda_on_policy > 0:
            raise ValueError(f"lambda_on_policy: {self.lambda_on_policy} asks for on-policy batches, which need a "
                             "teacher to score the student's samples; set teacher, or lambda_on_policy: 0 to train "
                             "from teacher_cache alone")
        if self.dataset is None and self.teacher_cache is None:
            raise ValueError("dataset: give prompts/conversations (dataset), a teacher_cache, or both")
        if self.target != "full" and self.divergence != "forward_kl":
            raise ValueError(f"divergence: target {self.target!r} is a sparse teacher distribution, trained with a "
                             "cross-entropy towards the teacher (the forward direction); set divergence: forward_kl, "
                             "or target: full to use reverse_kl/jsd")
        if self.teacher_cache is not None and self.divergence != "forward_kl":
            raise ValueError("divergence: a teacher_cache holds sparse targets, trained with a cross-entropy "
                             "towards the teacher; set divergence: forward_kl")
        return self


def shared_vocab_width(student, teacher, tokenizer, student_path: str, teacher_path: str) -> int:
    """The number of output rows teacher and student are compared over.

    Checkpoints of one model family may pad their output layer beyond the shared tokenizer to a
    hardware-friendly width (Gemma 3 1B has 262,144 rows, 4B/12B/27B 262,208). Rows past the
    tokenizer's vocabulary are never a real token, so both sides are compared over the first
    min(widths) rows, as long as that covers every id of the tokenizer's base vocabulary.
    """
    s, t = output_rows(student), output_rows(teacher)
    width = min(s, t)
    needed = int(tokenizer.vocab_size)
    if width < needed:
        raise TokenizerMismatchError(
            f"teacher {teacher_path} has {t} output logits and student {student_path} has {s}, but their shared "
            f"tokenizer has {needed} ids: the narrower one cannot score every token. Widths may differ only by "
            "padding rows beyond the tokenizer's vocabulary.")
    return width


def shifted_logits(model, batch: dict[str, torch.Tensor], chunk_size: int | None, width: int | None = None):
    """The model's logits at positions 0..L-2 (position n predicts token n + 1).

    With `chunk_size` set they come back as ProjectedLogits: only the decoder runs here (its
    final hidden states [B, L, H] are small next to [B, L, V]) and the losses project the
    counted positions to the vocabulary chunk by chunk, recomputing each chunk in backward.
    Without it, the HF forward's full [B, L, V] logits. `width` keeps the first `width` vocabulary
    rows (see shared_vocab_width).
    """
    from posttrain.losses.distillation import ProjectedLogits
    from posttrain.losses.token_logprobs import vocabulary_projection

    if chunk_size is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return logits if width is None else logits[..., :width]
    # get_decoder() is the base transformer of a CausalLM (for a peft model the call reaches
    # the wrapped model, LoRA layers included); use_cache=False: nothing is generated here.
    decoder_out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False)
    return ProjectedLogits(decoder_out.last_hidden_state[:, :-1], vocabulary_projection(model, width))


# --- one loss evaluation -------------------------------------------------------------------------

def distillation_loss(cfg: DistillStageConfig, student_logits, mask: torch.Tensor,
                      teacher_logits=None, target_ids: torch.Tensor | None = None,
                      target_probs: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The configured loss on shifted logits [B, L-1, V] or ProjectedLogits; sparse targets are drawn here when not given."""
    if cfg.chunk_size == "auto":  # the stage resolves it once; direct callers get it resolved here
        cfg = cfg.model_copy(update={"chunk_size": resolve_chunk_size("auto", student_logits.shape[-1]
                                                                      if isinstance(student_logits, torch.Tensor)
                                                                      else student_logits.vocab_size)})
    from posttrain.losses.distillation import (divergence_loss, sample_teacher_targets, sampled_target_loss,
                                               top_k_teacher_targets)

    if target_ids is None and cfg.target != "full":
        if cfg.target == "top_k":
            target_ids, target_probs = top_k_teacher_targets(teacher_logits, cfg.k, cfg.temperature, cfg.chunk_size, mask)
        else:
            counts = cfg.target == "sampled_counts"
            target_ids, target_probs = sample_teacher_targets(
                teacher_logits, cfg.k, with_replacement=cfg.with_replacement or counts, temperature=cfg.temperature,
                generator=generator, counts=counts, chunk_size=cfg.chunk_size, mask=mask)
    if target_ids is not None:
        return sampled_target_loss(student_logits, target_ids, target_probs, cfg.student_normalisation, mask,
                                   cfg.temperature, cfg.chunk_size, cfg.reduction)
    return divergence_loss(cfg.divergence, student_logits, teacher_logits, cfg.beta, cfg.temperature, mask,
                           cfg.chunk_size, cfg.reduction)


@torch.no_grad()
def batch_kls(student_logits, teacher_logits, mask: torch.Tensor, temperature: float,
              chunk_size: int | None) -> dict[str, float]:
    from posttrain.losses.distillation import forward_kl, reverse_kl

    return {"kl_teacher_student": float(forward_kl(student_logits, teacher_logits, temperature, mask, chunk_size)),
            "kl_student_teacher": float(reverse_kl(student_logits, teacher_logits, temperature, mask, chunk_size))}


def sampled_token_logprobs(logits, input_ids: torch.Tensor, mask: torch.Tensor,
                           temperature: float, chunk_size: int | None = None) -> list[list[float]]:
    """The trainer's log_softmax(logits / T) of each counted token, per sequence (the engine's convention)."""
    from posttrain.losses.distillation import token_log_probs

    with torch.no_grad():
        taken = token_log_probs(logits, input_ids[:, 1:], temperature, mask, chunk_size)
    return [taken[i][mask[i] != 0].tolist() for i in range(taken.shape[0])]


# --- evaluation ----------------------------------------------------------------------------------

def load_eval_rows(path: str, limit: int) -> list[dict]:
    rows = []
    for where, row in iter_rows(path):
        if "prompt" not in row:
            raise DataError(f"{where}: eval rows need a 'prompt' (plus the columns the eval reward reads); has {sorted(row)}")
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


@torch.no_grad()
def kl_on_student_samples(engine, student, teacher, prompt_ids: list[list[int]], pad_id: int, temperature: float,
                          max_new_tokens: int, seed: int, chunk_size: int | None, batch_size: int = 16,
                          width: int | None = None) -> dict[str, float]:
    """Summed KL(teacher||student) and KL(student||teacher) over the tokens of the student's own samples
    (held-out prompts), and the token count (`tokens`): divide to get per-token figures, after
    adding up the ranks' sums."""
    from posttrain.rollout import SamplingParams

    if not prompt_ids:
        return {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "tokens": 0.0}
    groups = engine.generate(prompt_ids, n=1, sampling=SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
    sequences = [TokenSequence(p + g[0].token_ids, [0] * len(p) + [1] * len(g[0].token_ids)) for p, g in zip(prompt_ids, groups)]
    totals = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0}
    tokens = 0
    for start in range(0, len(sequences), batch_size):
        batch = pad_batch(sequences[start:start + batch_size], pad_id)
        mask = logit_mask(batch["loss_mask"]).to(_device_of(student))
        s = shifted_logits(student, _on(batch, student), chunk_size, width)
        t = _to_device(shifted_logits(teacher, _on(batch, teacher), chunk_size, width), s.device)
        n = int(mask.sum())
        for key, value in batch_kls(s, t, mask, temperature, chunk_size).items():
            totals[key] += value * n
        tokens += n
    return {**totals, "tokens": float(tokens)}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _on(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The batch on the model's device (the teacher may live elsewhere than the student)."""
    device = _device_of(model)
    return {k: v.to(device) for k, v in batch.items()}


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _to_device(logits, device: torch.device):
    """Teacher logits (or its ProjectedLogits) where the student's are, for the loss."""
    from posttrain.losses.distillation import ProjectedLogits

    if isinstance(logits, ProjectedLogits):
        if _same_device(logits.device, device):
            return logits
        # A teacher placed elsewhere projects its hidden states on its own device, chunk by chunk
        # inside the loss; the per-chunk logits then move to the student's device.
        home, head = logits.device, logits.head

        def project_here(hidden):
            return head(hidden.to(home)).to(device)

        return ProjectedLogits(logits.hidden.to(device), project_here)
    return logits.to(device)


# --- the stage -----------------------------------------------------------------------------------

@register_stage("distill", DistillStageConfig, outputs=("model",), distributed=True)
def run_distill(cfg: DistillStageConfig, ctx: StageContext) -> StageResult:
    """On-policy distillation from a teacher (GKD, Gemma 3 sampled-logit targets, offline teacher cache)."""
    from posttrain.evaluation import evaluate_prompts
    from posttrain.modeling import load_causal_lm, load_policy, load_tokenizer
    from posttrain.rollout import DriftMonitor, SamplingParams, create_engine, weights_for_engine
    from rewards.combine import CombinedReward
    from posttrain.teacher_cache import TeacherCache, TeacherCacheError, scatter_targets, tokenizer_fingerprint

    retain_freed_memory()  # see posttrain.allocator: steps stop page-faulting their activations
    torch.manual_seed(ctx.seed)
    session = TrainingSession(cfg.precision, ctx.seed)
    session.shard(range(cfg.batch_size), "batch_size")  # fails early unless the batch splits over the ranks

    student, tokenizer = load_policy(cfg.model)
    pad_id = tokenizer.pad_token_id
    teacher = None
    width = None
    if cfg.teacher is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher), cfg.model, cfg.teacher)
        teacher = load_causal_lm(cfg.teacher, dtype=cfg.teacher_dtype)
        teacher = place_frozen(teacher, resolve_placement(cfg.teacher_placement, session.device, "teacher_placement"))
        width = shared_vocab_width(student, teacher, tokenizer, cfg.model, cfg.teacher)
        if width == output_rows(student) == output_rows(teacher):
            width = None  # same width: no slicing at all
    cache = None
    if cfg.teacher_cache is not None:
        try:
            # The cache's targets are p_T at its temperature; the loss must use the same one.
            cache = TeacherCache(cfg.teacher_cache, expect={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                                            "temperature": cfg.temperature})
        except TeacherCacheError as e:
            raise StageError(f"teacher_cache: {e} (the cache must be made with the student's tokenizer)") from None

    prompts, sequences = load_distill_rows(cfg.dataset, tokenizer, cfg.max_length) if cfg.dataset else ([], [])
    if cfg.lambda_on_policy > 0 and not prompts:
        raise StageError("dataset: on-policy batches (lambda_on_policy > 0) need prompt rows")
    if cfg.lambda_on_policy < 1 and cache is None and not sequences:
        raise StageError(f"dataset {cfg.dataset}: off-policy batches (lambda_on_policy < 1) need rows with completions "
                         "(`messages` ending in an assistant turn, or `prompt` + `completion`), or a teacher_cache")

    if cfg.lora is not None:
        from peft import get_peft_model

        student = get_peft_model(student, cfg.lora.to_peft_config(student))
    student = session.prepare(student, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              shard_optimizer=cfg.shard_optimizer)
    cfg = cfg.model_copy(update={"chunk_size": resolve_chunk_size(
        cfg.chunk_size, width or output_rows(student))})

    start_step = 0
    checkpoint = latest_checkpoint(ctx.stage_dir)
    if checkpoint is not None:
        start_step = load_checkpoint(session, checkpoint, {"student": student})["step"]
        if ctx.is_main:
            truncate_metrics(ctx.stage_dir / "metrics.jsonl", start_step)

    needs_engine = cfg.lambda_on_policy > 0 or cfg.eval_dataset is not None
    engine = create_engine(cfg.model, cfg.rollout, device=session.device) if needs_engine else None
    if engine is not None and (cfg.lora is not None or start_step):
        engine.update_weights(weights_for_engine(student))
    drift = DriftMonitor.from_config(cfg.rollout)
    summary: dict = session.describe(cfg.batch_size, "sequences")

    eval_rows = load_eval_rows(cfg.eval_dataset, cfg.eval_limit) if cfg.eval_dataset else []
    eval_prompt_ids = [tokenize_prompt(tokenizer, r["prompt"]) for r in eval_rows]

    eval_scorer = CombinedReward([{"name": cfg.eval_reward}]) if eval_rows else None
    greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    correct_above = math.nextafter(0.5, 1.0)  # a greedy answer counts as correct when its reward is above 0.5

    def evaluate(tag: str) -> None:
        # posttrain.evaluation: each rank answers every W-th held-out prompt; the figures (with their
        # 95% intervals) are gathered over all of them.
        student.eval()
        result = evaluate_prompts(engine, eval_rows, task="reward", scorer=eval_scorer, sampling=greedy,
                                  success_threshold=correct_above, rank=session.rank, world_size=session.world_size,
                                  gather=session.gather_lists)
        accuracy = result.metrics["accuracy"]
        summary[f"accuracy_{tag}"] = accuracy.value
        summary[f"accuracy_{tag}_ci_low"], summary[f"accuracy_{tag}_ci_high"] = accuracy.low, accuracy.high
        if teacher is not None:
            mine = slice(session.rank, None, session.world_size)
            kls = kl_on_student_samples(engine, student, teacher, eval_prompt_ids[mine], pad_id, cfg.temperature,
                                        cfg.max_new_tokens, ctx.seed, cfg.chunk_size, width=width)
            tokens = session.all_sum(kls.pop("tokens"))
            for key, value in kls.items():
                summary[f"eval_{key}_{tag}"] = session.all_sum(value) / max(tokens, 1)
        student.train()

    if eval_rows and start_step == 0:
        evaluate("before")
        if cfg.eval_teacher and cfg.teacher is not None and session.is_main:
            with create_engine(cfg.teacher, cfg.rollout, device=session.device) as teacher_engine:
                result = evaluate_prompts(teacher_engine, eval_rows, task="reward", scorer=eval_scorer,
                                          sampling=greedy, success_threshold=correct_above)
                summary["accuracy_teacher"] = result.metrics["accuracy"].value

    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    on_policy_steps = 0
    last: dict = {}
    started = time.time()
    tokens_seen = 0
    with ctx.metrics(cfg.report_to) as metrics, ctx.progress(cfg.max_steps, "distill") as advance:
        advance(start_step)
        for step in range(start_step + 1, cfg.max_steps + 1):
            step_started = time.time()
            # The step's choices are a function of (seed, step): the same on every rank, and the
            # same again when a resumed run redoes the step. Each rank takes its share of the batch.
            step_rng = random.Random(f"distill:{ctx.seed}:{step}")
            on_policy = step_rng.random() < cfg.lambda_on_policy
            picks = [step_rng.randrange(len(prompts if on_policy else cache if cache is not None else sequences))
                     for _ in range(cfg.batch_size)]
            picks = session.shard(picks, "batch_size")
            sample_seed = step_rng.randrange(2**31) + 7919 * session.rank
            generator = torch.Generator(device=session.device).manual_seed(sample_seed)
            log_now = step % cfg.log_every == 0 or step == cfg.max_steps

            # 1. A batch: the student's own samples, or sequences from the data / the cache.
            engine_logprobs = None
            cached = None
            if on_policy:
                batch_prompts = [prompts[i] for i in picks]
                # The engine's logprobs only feed the drift check of logged steps; elsewhere they are skipped.
                groups = engine.generate(batch_prompts, n=1, sampling=sampling.model_copy(
                    update={"seed": sample_seed, "logprobs": log_now}))
                completions = [g[0] for g in groups]
                batch_sequences = [TokenSequence(p + c.token_ids, [0] * len(p) + [1] * len(c.token_ids))
                                   for p, c in zip(batch_prompts, completions)]
                engine_logprobs = [c.logprobs for c in completions]
            elif cache is not None:
                cached = [cache[i] for i in picks]
                batch_sequences = [TokenSequence(c.input_ids.tolist(), c.loss_mask.tolist()) for c in cached]
            else:
                batch_sequences = [sequences[i] for i in picks]

            # 2-3. Per micro-batch: the teacher's view of the completion positions (no gradient),
            # unless the cache holds it; the divergence; backward. Each micro-batch's mean loss is
            # weighted by its share of the global step (tokens, or sequences), so the accumulated
            # gradient summed over ranks is the gradient of the whole batch's loss.
            counted = [sum(s.loss_mask[1:]) for s in batch_sequences]
            global_count = session.all_sum(sum(counted) if cfg.reduction == "token_mean" else len(batch_sequences))
            micro = token_budget_batches([len(s.input_ids) for s in batch_sequences], cfg.max_tokens_per_microbatch)
            loss_total = 0.0
            logit_stats: dict = {}
            trainer_logprobs: list[list[float]] = []
            stat_sums = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0}
            with engine_asleep(engine, engine is not None and cfg.rollout.enable_sleep_mode):
                for mb in micro:
                    batch = {k: v.to(session.device) for k, v in pad_batch(batch_sequences[mb], pad_id).items()}
                    mask = logit_mask(batch["loss_mask"])
                    local_count = float(mask.sum()) if cfg.reduction == "token_mean" else float(mask.shape[0])
                    if local_count == 0:
                        continue
                    teacher_logits = target_ids = target_probs = None
                    with session.autocast():
                        if cached is not None:
                            target_ids, target_probs = scatter_targets(cached[mb], batch["input_ids"].shape[1])
                            target_ids, target_probs = target_ids.to(session.device), target_probs.to(session.device)
                        else:
                            with torch.no_grad():
                                teacher_logits = _to_device(
                                    shifted_logits(teacher, _on(batch, teacher), cfg.chunk_size, width), session.device)
                        # With chunk_size set, neither side's [B, L, V] logits are ever materialised.
                        student_logits = shifted_logits(student, batch, cfg.chunk_size, width)
                        loss = distillation_loss(cfg, student_logits, mask, teacher_logits, target_ids, target_probs,
                                                 generator)
                    if not torch.isfinite(loss):
                        raise StageError(f"step {step}: the distillation loss is {loss.item()}; lower learning_rate "
                                         "or temperature")
                    (loss * (local_count / global_count)).backward()
                    loss_total += loss.item() * local_count / global_count
                    # Logit statistics before the update: ProjectedLogits project with the live lm_head,
                    # which the optimizer step is about to change.
                    if log_now and teacher_logits is not None:
                        n_tok = float(mask.sum())
                        for key, value in batch_kls(student_logits.detach(), teacher_logits, mask, cfg.temperature,
                                                    cfg.chunk_size).items():
                            stat_sums[key] += value * n_tok
                    if log_now and engine_logprobs:
                        trainer_logprobs += sampled_token_logprobs(student_logits.detach(), batch["input_ids"], mask,
                                                                   cfg.temperature, cfg.chunk_size)
                result = session.step(cfg.max_grad_norm)
            if not result.finite:
                raise StageError(f"step {step}: the gradient norm is {result.grad_norm}; lower learning_rate")
            if log_now and cached is None and teacher is not None:  # the same on every rank: all_sum is collective
                tokens_all = session.all_sum(sum(counted))
                logit_stats = {k: session.all_sum(v) / max(tokens_all, 1) for k, v in stat_sums.items()}
            if log_now and engine_logprobs:
                logit_stats.update(drift.check(engine_logprobs, trainer_logprobs, step=step))

            # 4. The engine samples the next batch with the new weights.
            if engine is not None and step % cfg.sync_weights_every == 0:
                engine.update_weights(weights_for_engine(student))

            on_policy_steps += on_policy
            n_tokens = int(session.all_sum(sum(counted)))
            tokens_seen += n_tokens
            if log_now:
                row = {"loss": session.all_sum(loss_total), "on_policy": int(on_policy),
                       "fraction_on_policy": on_policy_steps / (step - start_step),
                       "completion_tokens": n_tokens, "tokens_per_s": n_tokens / max(time.time() - step_started, 1e-9),
                       "lr": session.learning_rate, "micro_batches": len(micro)}
                if cfg.max_grad_norm:
                    row["grad_norm"] = result.grad_norm
                row.update(logit_stats)
                metrics.log(step, **row)
                last.update(row)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                save_checkpoint(session, ctx.stage_dir, step, {"student": student}, {}, cfg.keep_checkpoints)
            advance(1)
    seconds = time.time() - started

    if engine is not None and cfg.max_steps % cfg.sync_weights_every != 0:
        engine.update_weights(weights_for_engine(student))
    if eval_rows:
        evaluate("after")
    if engine is not None:
        engine.close()

    out = ctx.stage_dir / "model"
    if ctx.is_main:
        trained = student.merge_and_unload() if cfg.lora is not None else student
        save_model(trained, tokenizer, out)
    session.barrier()
    session.close()
    steps_run = max(1, cfg.max_steps - start_step)
    summary.update({
        "steps": cfg.max_steps, "fraction_on_policy": on_policy_steps / steps_run,
        "loss_last": last.get("loss"), "train_seconds": round(seconds, 1),
        "tokens_per_s": round(tokens_seen / max(seconds, 1e-9), 1),
    })
    for key in ("kl_teacher_student", "kl_student_teacher", "drift_mean_abs"):
        if key in last:
            summary[f"{key}_last"] = last[key]
    return StageResult(outputs={"model": str(out)}, metrics=summary)
