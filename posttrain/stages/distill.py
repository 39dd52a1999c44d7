"""`distill`: on-policy knowledge distillation from a teacher (GKD) with Gemma 3 sampled-logit targets.

The method, its equations and where each of its pieces lives: posttrain/losses/distillation.py
(and docs/algorithms.md#gkd).
This module is the loop. Each step (`distill_step`):
    1. a batch (`draw_batch`): with probability lambda_on_policy the student samples completions
       for a batch of prompts through the rollout engine (no gradient flows through the sampling);
       otherwise (prompt, completion) sequences from the dataset or the teacher cache;
    2. per micro-batch (`accumulate_gradients`): the teacher scores every completion position
       (full logits, or a sparse target: top-k, K sampled ids, or sampled counts) unless the batch
       came from the cache; the loss (`distillation_loss`) is the divergence between teacher and
       student at every completion position; backward;
    3. the optimizer step, then the new weights go to the rollout engine.
Prompt and padding positions never count; the end-of-turn token does (masks come from the
conversation, never from `ids != pad_id`). `setup_distill` loads the models, data and a
checkpoint to resume from; `evaluate_student` measures held-out accuracy and KL before and after.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, model_validator

from posttrain.allocator import retain_freed_memory
from posttrain.data import TokenSequence, load_distill_rows, load_prompts
from posttrain.evaluation import SetScoring, evaluate_prompts
from posttrain.losses.distillation import forward_kl, gkd_loss, reverse_kl, token_log_probs
from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.images import ImagePrompt, prompt_has_images
from posttrain.modeling import load_causal_lm, load_policy, load_processor, load_tokenizer, output_rows
from posttrain.rollout import DriftMonitor, RolloutConfig, SamplingParams, create_engine, sync_weights
from posttrain.sequences import (check_same_tokenizer, logit_mask, logits_on_device, on_model_device, pad_batch,
                                 shared_vocab_width, shifted_logits, summed_kls)
from posttrain.stages.base import StageContext, StageError, StageResult, register_stage
from posttrain.stages.options import DistillationOptions, TrainingOptions, stage_default
from posttrain.teacher_cache import (CachedSequence, TeacherCache, TeacherCacheError, scatter_targets,
                                     tokenizer_fingerprint)
from posttrain.training import (TrainingSession, checkpoint_due, engine_asleep, resume_latest, save_checkpoint,
                                token_budget_batches)
from rewards.combine import CombinedReward

# A greedy held-out answer counts as correct when its reward is above 0.5.
CORRECT_ABOVE = math.nextafter(0.5, 1.0)
EVAL_BATCH = 16  # held-out sequences per forward pass of the KL measure


class DistillStageConfig(TrainingOptions, DistillationOptions):
    """On-policy distillation from a teacher (GKD; Gemma 3 sampled-logit targets; optional offline cache).

    The optimizer, schedule, precision, memory, LoRA, checkpoint and tracker options are the shared
    ones (posttrain.stages.options.TrainingOptions), the loss's (divergence, target, temperature,
    chunking, the teacher's dtype and placement) those of every distillation loop
    (DistillationOptions); distill changes two defaults.
    """

    learning_rate: float = stage_default("learning_rate", 5e-5)
    checkpoint_every: int = stage_default("checkpoint_every", 0)

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
    batch_size: int = Field(8, ge=1, description="Sequences per step.")
    max_new_tokens: int = Field(64, ge=1, description="Longest student sample (stop token included).")
    max_length: int = Field(512, ge=8, description="Off-policy sequences are truncated to this many tokens.")
    sync_weights_every: int = Field(
        1, ge=1, description="Push the student's weights to the rollout engine every this many steps (1 keeps "
        "sampling exactly on-policy; larger values trade staleness, visible as drift, for speed).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout engine for student samples.")
    eval_dataset: str | None = Field(
        None, description="Held-out prompt rows: accuracy (eval_reward) and KL(teacher||student) on student samples "
        "are measured before and after training.")
    eval_reward: str = Field("math", description="Reward that decides accuracy on eval_dataset (registry name; > 0.5 counts correct).")
    eval_limit: int = Field(128, ge=1, description="At most this many eval prompts.")
    eval_teacher: bool = Field(False, description="Also measure the teacher's accuracy on eval_dataset, for comparison.")
    log_every: int = Field(1, ge=1, description="Log step metrics every this many steps.")

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
        if self.teacher_cache is not None and self.divergence != "forward_kl":
            raise ValueError("divergence: a teacher_cache holds sparse targets, trained with a cross-entropy "
                             "towards the teacher; set divergence: forward_kl")
        return self



# --- one loss evaluation -------------------------------------------------------------------------

def distillation_loss(cfg: DistillStageConfig, student_logits, mask: torch.Tensor, teacher_logits=None,
                      target_ids: torch.Tensor | None = None, target_probs: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The configured loss (`gkd_loss` of cfg's objective) on shifted logits [B, L-1, V] or
    ProjectedLogits; sparse targets are drawn here when not given."""
    chunk_size = cfg.chunk_size
    if chunk_size == "auto":  # the stage resolves it once; direct callers get it resolved here
        chunk_size = resolve_chunk_size("auto", student_logits.shape[-1] if isinstance(student_logits, torch.Tensor)
                                        else student_logits.vocab_size)
    return gkd_loss(cfg.objective(chunk_size), student_logits, mask, teacher_logits, target_ids, target_probs,
                    generator)


@torch.no_grad()
def batch_kls(student_logits, teacher_logits, mask: torch.Tensor, temperature: float,
              chunk_size: int | None) -> dict[str, float]:
    return {"kl_teacher_student": float(forward_kl(student_logits, teacher_logits, temperature, mask, chunk_size)),
            "kl_student_teacher": float(reverse_kl(student_logits, teacher_logits, temperature, mask, chunk_size))}


def sampled_token_logprobs(logits, input_ids: torch.Tensor, mask: torch.Tensor,
                           temperature: float, chunk_size: int | None = None) -> list[list[float]]:
    """The trainer's log_softmax(logits / T) of each counted token, per sequence (the engine's convention)."""
    with torch.no_grad():
        taken = token_log_probs(logits, input_ids[:, 1:], temperature, mask, chunk_size)
    return [taken[i][mask[i] != 0].tolist() for i in range(taken.shape[0])]


# --- what a step needs -----------------------------------------------------------------------------

@dataclass
class HeldOut:
    """The held-out prompts accuracy and KL are measured on, and how answers are decoded and scored."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    scorer: CombinedReward
    greedy: SamplingParams


@dataclass
class DistillRun:
    """Everything a distillation step and evaluation read, built once by `setup_distill`.

    `cfg.chunk_size` is resolved; `width` is the number of vocabulary rows teacher and student
    are compared over (None: both have the same, all of them); `engine` is the student's rollout
    engine (None when no step samples and nothing is evaluated)."""

    cfg: DistillStageConfig
    ctx: StageContext
    session: TrainingSession
    student: torch.nn.Module
    tokenizer: Any
    teacher: torch.nn.Module | None
    width: int | None
    cache: TeacherCache | None
    prompts: list[list[int]]
    sequences: list[TokenSequence]
    held_out: HeldOut | None
    start_step: int
    engine: Any = None
    drift: DriftMonitor | None = None
    processor: Any = None  # a composite student's: the images of cached sequences scored with them

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


@dataclass
class StepBatch:
    """One step's sequences (this rank's share) and where their teacher view comes from."""

    sequences: list[TokenSequence]
    on_policy: bool
    cached: list[CachedSequence] | None  # off-policy from the teacher cache: its targets, no teacher
    engine_logprobs: list[list[float]] | None  # on-policy steps that log: for the drift check
    generator: torch.Generator  # draws the sparse targets
    log_now: bool


@dataclass
class GradientPass:
    """What accumulating one step's gradients over its micro-batches measured on this rank."""

    counted_tokens: int
    micro_batches: int
    loss: float = 0.0
    kl_sums: dict[str, float] = field(default_factory=lambda: {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0})
    trainer_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class Totals:
    """Counts over the steps this run trains (from `start_step` on)."""

    on_policy_steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    last: dict = field(default_factory=dict)  # the last logged row


# --- setup ---------------------------------------------------------------------------------------

def setup_distill(cfg: DistillStageConfig, ctx: StageContext) -> DistillRun:
    """Session, student (LoRA-wrapped when asked), teacher, teacher cache, rows, held-out prompts,
    and the newest checkpoint restored when there is one. The rollout engine is started later."""
    retain_freed_memory()  # see posttrain.allocator: steps stop page-faulting their activations
    torch.manual_seed(ctx.seed)
    session = TrainingSession(cfg.precision, ctx.seed, cfg.sharding, cfg.fsdp_offload)
    session.shard(range(cfg.batch_size), "batch_size")  # fails early unless the batch splits over the ranks

    student, tokenizer = load_policy(cfg.model)
    teacher, width = _load_teacher(cfg, student, tokenizer, session)
    processor = load_processor(cfg.model)  # a composite student's: rows with images (None: text only)
    cache = _open_teacher_cache(cfg, tokenizer, processor is not None)
    prompts, sequences = _load_training_rows(cfg, tokenizer, cache, processor)

    if cfg.lora is not None:
        from peft import get_peft_model

        student = get_peft_model(student, cfg.lora.to_peft_config(student))
    student = session.prepare(student, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              shard_optimizer=cfg.shard_optimizer)
    cfg = cfg.model_copy(update={"chunk_size": resolve_chunk_size(
        cfg.chunk_size, width or output_rows(student))})
    start_step = resume_latest(session, ctx.stage_dir, {"student": student}, ctx.stage_dir / "metrics.jsonl")["step"]
    return DistillRun(cfg, ctx, session, student, tokenizer, teacher, width, cache, prompts, sequences,
                      _load_held_out(cfg, tokenizer, processor), start_step, processor=processor)


def _load_teacher(cfg: DistillStageConfig, student, tokenizer, session: TrainingSession):
    """The teacher, placed, and the vocabulary width it shares with the student (None: the same width)."""
    if cfg.teacher is None:
        return None, None
    check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher), cfg.model, cfg.teacher)
    teacher = load_causal_lm(cfg.teacher, dtype=cfg.teacher_dtype)
    teacher = session.place_frozen(teacher, cfg.teacher_placement, "teacher_placement")  # sharded under fsdp
    width = shared_vocab_width(student, teacher, tokenizer, cfg.model, cfg.teacher)
    if width == output_rows(student) == output_rows(teacher):
        width = None  # same width: no slicing at all
    return teacher, width


def _open_teacher_cache(cfg: DistillStageConfig, tokenizer, composite: bool) -> TeacherCache | None:
    if cfg.teacher_cache is None:
        return None
    try:
        # The cache's targets are p_T at its temperature; the loss must use the same one.
        cache = TeacherCache(cfg.teacher_cache, expect={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                                        "temperature": cfg.temperature})
    except TeacherCacheError as e:
        raise StageError(f"teacher_cache: {e} (the cache must be made with the student's tokenizer)") from None
    if cache.image_sequences and not composite:
        # The teacher's targets were conditioned on images the student could not see.
        raise StageError(f"teacher_cache: {cache.image_sequences} of its sequences were scored with images, and the "
                         f"student {cfg.model} is a text-only model; distil them into a composite student")
    return cache


def _load_training_rows(cfg: DistillStageConfig, tokenizer, cache: TeacherCache | None, processor=None):
    """Prompt ids for on-policy steps and sequences for off-policy ones; refuses a dataset that
    cannot serve the batches lambda_on_policy asks for."""
    prompts, sequences = (load_distill_rows(cfg.dataset, tokenizer, cfg.max_length, processor) if cfg.dataset
                          else ([], []))
    if cfg.lambda_on_policy > 0 and not prompts:
        raise StageError("dataset: on-policy batches (lambda_on_policy > 0) need prompt rows")
    if cfg.lambda_on_policy < 1 and cache is None and not sequences:
        raise StageError(f"dataset {cfg.dataset}: off-policy batches (lambda_on_policy < 1) need rows with completions "
                         "(`messages` ending in an assistant turn, or `prompt` + `completion`), or a teacher_cache")
    return prompts, sequences


def _load_held_out(cfg: DistillStageConfig, tokenizer, processor=None) -> HeldOut | None:
    if not cfg.eval_dataset:
        return None
    rows, prompt_ids, _ = load_prompts(cfg.eval_dataset, tokenizer, limit=cfg.eval_limit, processor=processor)
    return HeldOut(rows, prompt_ids, CombinedReward([{"name": cfg.eval_reward}]),
                   SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens))


def start_engine(run: DistillRun) -> None:
    """The student's rollout engine, when a step samples or evaluation decodes; it holds the
    trained weights from the start when they differ from the model file (LoRA, a resumed run)."""
    cfg = run.cfg
    if cfg.lambda_on_policy > 0 or run.held_out is not None:
        run.engine = create_engine(cfg.model, cfg.rollout, device=run.session.device, images=_has_images(run))
        if cfg.lora is not None or run.start_step:
            sync_weights(run.engine, run.student)
    run.drift = DriftMonitor.from_config(cfg.rollout)


# --- one step --------------------------------------------------------------------------------------

def draw_batch(run: DistillRun, step: int) -> StepBatch:
    """Step `step`'s batch: the student's own samples (probability lambda_on_policy), or sequences
    from the teacher cache or the dataset.

    The step's choices are a function of (seed, step): the same on every rank, and the same again
    when a resumed run redoes the step. Each rank takes its share of the batch."""
    cfg, session = run.cfg, run.session
    step_rng = random.Random(f"distill:{run.ctx.seed}:{step}")
    on_policy = step_rng.random() < cfg.lambda_on_policy
    source = run.prompts if on_policy else run.cache if run.cache is not None else run.sequences
    picks = session.shard([step_rng.randrange(len(source)) for _ in range(cfg.batch_size)], "batch_size")
    sample_seed = step_rng.randrange(2**31) + 7919 * session.rank
    generator = torch.Generator(device=session.device).manual_seed(sample_seed)
    log_now = step % cfg.log_every == 0 or step == cfg.max_steps
    if on_policy:
        prompts = [run.prompts[i] for i in picks]
        # The engine's logprobs only feed the drift check of logged steps; elsewhere they are skipped.
        sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=sample_seed,
                                  logprobs=log_now)
        completions = [group[0] for group in run.engine.generate(prompts, n=1, sampling=sampling)]
        return StepBatch(_sampled_sequences(prompts, completions), True, None, [c.logprobs for c in completions],
                         generator, log_now)
    if run.cache is not None:
        cached = [run.cache[i] for i in picks]
        sequences = [_cached_sequence(run, c) for c in cached]
        return StepBatch(sequences, False, cached, None, generator, log_now)
    return StepBatch([run.sequences[i] for i in picks], False, None, None, generator, log_now)


def accumulate_gradients(run: DistillRun, batch: StepBatch, step: int) -> GradientPass:
    """Backward of the batch's loss, micro-batch by micro-batch.

    Each micro-batch's mean loss is weighted by its share of the global step (tokens, or
    sequences), so the accumulated gradient summed over ranks is the gradient of the whole
    batch's loss."""
    cfg, session = run.cfg, run.session
    counted = [sum(s.loss_mask[1:]) for s in batch.sequences]
    global_count = session.all_sum(sum(counted) if cfg.reduction == "token_mean" else len(batch.sequences))
    micro = token_budget_batches([len(s.input_ids) for s in batch.sequences], cfg.max_tokens_per_microbatch)
    gradients = GradientPass(counted_tokens=sum(counted), micro_batches=len(micro))
    for part, real in session.even_micro_batches(micro):  # fsdp: as many passes on every rank
        _micro_batch(run, batch, part, global_count, gradients, step, real)
    return gradients


def _micro_batch(run: DistillRun, batch: StepBatch, part: slice, global_count: float, gradients: GradientPass,
                 step: int, real: bool = True) -> None:
    """One micro-batch: the teacher's view of its completion positions (no gradient; from the
    cache when the batch came from it), the loss, backward, and the statistics logged steps show.

    Not `real` (fsdp: a repeat that keeps the ranks' passes through the sharded models in step),
    or with nothing to count under fsdp: the passes run, with the loss weighted 0, and nothing is
    counted."""
    cfg, session = run.cfg, run.session
    tensors = {k: v.to(session.device) for k, v in pad_batch(batch.sequences[part], run.pad_id).items()}
    mask = logit_mask(tensors["loss_mask"])
    local_count = float(mask.sum()) if cfg.reduction == "token_mean" else float(mask.shape[0])
    if local_count == 0 and not session.fsdp:
        return
    real = real and local_count > 0
    teacher_logits = target_ids = target_probs = None
    with session.autocast():
        if batch.cached is not None:
            target_ids, target_probs = scatter_targets(batch.cached[part], tensors["input_ids"].shape[1])
            target_ids, target_probs = target_ids.to(session.device), target_probs.to(session.device)
        else:
            with torch.no_grad():
                teacher_logits = logits_on_device(
                    shifted_logits(run.teacher, on_model_device(tensors, run.teacher), cfg.chunk_size, run.width), session.device)
        # With chunk_size set, neither side's [B, L, V] logits are ever materialised.
        student_logits = shifted_logits(run.student, tensors, cfg.chunk_size, run.width)
        loss = distillation_loss(cfg, student_logits, mask, teacher_logits, target_ids, target_probs, batch.generator)
    if not real:
        # Zero gradient through every layer (a loss over no tokens may be 0/0: not that).
        out = getattr(student_logits, "hidden", student_logits)
        (out.float().sum() * 0.0).backward()
        return
    if not torch.isfinite(loss):
        raise StageError(f"step {step}: the distillation loss is {loss.item()}; lower learning_rate or temperature")
    # Logit statistics before the update: ProjectedLogits project with the live lm_head, which
    # the optimizer step is about to change; and before the backward, after which FSDP no longer
    # keeps a sharded student's output layer gathered.
    with torch.no_grad():
        if batch.log_now and teacher_logits is not None:
            tokens = float(mask.sum())
            for key, value in batch_kls(student_logits.detach(), teacher_logits, mask, cfg.temperature,
                                        cfg.chunk_size).items():
                gradients.kl_sums[key] += value * tokens
        if batch.log_now and batch.engine_logprobs:
            gradients.trainer_logprobs += sampled_token_logprobs(student_logits.detach(), tensors["input_ids"], mask,
                                                                 cfg.temperature, cfg.chunk_size)
    (loss * (local_count / global_count)).backward()
    gradients.loss += loss.item() * local_count / global_count


def distill_step(run: DistillRun, step: int, totals: Totals) -> dict | None:
    """Step `step` (1-based): batch, gradients, optimizer step, weight sync. Returns the metrics
    row on logged steps (None otherwise); every rank calls it (it holds collectives)."""
    cfg, session = run.cfg, run.session
    step_started = time.time()
    batch = draw_batch(run, step)
    with engine_asleep(run.engine, run.engine is not None and cfg.rollout.enable_sleep_mode):
        gradients = accumulate_gradients(run, batch, step)
        result = session.step(cfg.max_grad_norm)
    if not result.finite:
        raise StageError(f"step {step}: the gradient norm is {result.grad_norm}; lower learning_rate")
    logit_stats: dict = {}
    if batch.log_now and batch.cached is None and run.teacher is not None:  # the same on every rank: collective
        tokens_all = session.all_sum(gradients.counted_tokens)
        logit_stats = {k: session.all_sum(v) / max(tokens_all, 1) for k, v in gradients.kl_sums.items()}
    if batch.log_now and batch.engine_logprobs:
        logit_stats.update(run.drift.check(batch.engine_logprobs, gradients.trainer_logprobs, step=step))

    # The engine samples the next batch with the new weights.
    if run.engine is not None and step % cfg.sync_weights_every == 0:
        sync_weights(run.engine, run.student)

    totals.on_policy_steps += batch.on_policy
    n_tokens = int(session.all_sum(gradients.counted_tokens))
    totals.tokens_seen += n_tokens
    if not batch.log_now:
        return None
    row = {"loss": session.all_sum(gradients.loss), "on_policy": int(batch.on_policy),
           "fraction_on_policy": totals.on_policy_steps / (step - run.start_step),
           "completion_tokens": n_tokens, "tokens_per_s": n_tokens / max(time.time() - step_started, 1e-9),
           "lr": session.learning_rate, "micro_batches": gradients.micro_batches}
    if cfg.max_grad_norm:
        row["grad_norm"] = result.grad_norm
    row.update(logit_stats)
    return row


def train(run: DistillRun) -> Totals:
    """Steps start_step + 1 .. max_steps: log, checkpoint, show progress."""
    cfg, ctx = run.cfg, run.ctx
    totals = Totals()
    started = time.time()
    with ctx.metrics(cfg.report_to) as metrics, ctx.progress(cfg.max_steps, "distill") as advance:
        advance(run.start_step)
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            row = distill_step(run, step, totals)
            if row is not None:
                metrics.log(step, **row)
                totals.last.update(row)
            if checkpoint_due(step, cfg.checkpoint_every, cfg.max_steps):
                save_checkpoint(run.session, ctx.stage_dir, step, {"student": run.student}, {}, cfg.keep_checkpoints)
            advance(1)
    totals.seconds = time.time() - started
    return totals


# --- evaluation ----------------------------------------------------------------------------------

def evaluate_student(run: DistillRun, tag: str) -> dict[str, float]:
    """Held-out accuracy (greedy, with its 95% interval) and, with a teacher, the per-token KLs on
    the student's own samples; keys end in `_{tag}`.

    posttrain.evaluation: each rank answers every W-th held-out prompt; the figures are gathered
    over all of them."""
    session, held_out = run.session, run.held_out
    run.student.eval()
    result = evaluate_prompts(run.engine, held_out.rows, sampling=held_out.greedy, session=session,
                              scoring=SetScoring(task="reward", scorer=held_out.scorer, success_threshold=CORRECT_ABOVE))
    accuracy = result.metrics["accuracy"]
    figures = {f"accuracy_{tag}": accuracy.value, f"accuracy_{tag}_ci_low": accuracy.low,
               f"accuracy_{tag}_ci_high": accuracy.high}
    if run.teacher is not None:
        mine = held_out.prompt_ids[session.rank::session.world_size]
        # fsdp: every rank runs as many batches through the sharded models (see even_micro_batches).
        batches = session.all_max(math.ceil(len(mine) / EVAL_BATCH)) if session.fsdp else 0
        kls = kl_on_student_samples(run, mine, EVAL_BATCH, batches)
        tokens = session.all_sum(kls.pop("tokens"))
        for key, value in kls.items():
            figures[f"eval_{key}_{tag}"] = session.all_sum(value) / max(tokens, 1)
    run.student.train()
    return figures


def evaluate_teacher(run: DistillRun) -> dict[str, float]:
    """The teacher's held-out accuracy, for comparison (main rank only, on an engine of its own)."""
    with create_engine(run.cfg.teacher, run.cfg.rollout, device=run.session.device,
                       images=_has_images(run)) as teacher_engine:
        result = evaluate_prompts(teacher_engine, run.held_out.rows, sampling=run.held_out.greedy,
                                  scoring=SetScoring(task="reward", scorer=run.held_out.scorer,
                                                     success_threshold=CORRECT_ABOVE))
    return {"accuracy_teacher": result.metrics["accuracy"].value}


@torch.no_grad()
def kl_on_student_samples(run: DistillRun, prompt_ids: list[list[int]], batch_size: int = EVAL_BATCH,
                          batches: int = 0) -> dict[str, float]:
    """Summed KL(teacher||student) and KL(student||teacher) over the tokens of the student's own
    samples of `prompt_ids` (held-out prompts), and the token count (`tokens`): divide to get
    per-token figures, after adding up the ranks' sums. `batches`: run at least this many batches
    through the models (see summed_kls)."""
    cfg, student, teacher = run.cfg, run.student, run.teacher
    if not prompt_ids and not batches:
        return {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "tokens": 0.0}
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=run.ctx.seed)
    completions = ([group[0] for group in run.engine.generate(prompt_ids, n=1, sampling=sampling)]
                   if prompt_ids else [])
    return summed_kls(student, teacher, _sampled_sequences(prompt_ids, completions), run.pad_id, cfg.temperature,
                      cfg.chunk_size, run.width, batch_size, batches)


def _sampled_sequences(prompts: list[list[int]], completions) -> list[TokenSequence]:
    """Prompt + sampled completion, the loss mask on the completion's tokens (its stop token included);
    an image prompt's images travel with its sequence."""
    return [TokenSequence(p + c.token_ids, [0] * len(p) + [1] * len(c.token_ids),
                          p if isinstance(p, ImagePrompt) else None) for p, c in zip(prompts, completions)]


def _cached_sequence(run: DistillRun, cached: CachedSequence) -> TokenSequence:
    """A cached sequence as the student reads it: scored with images, it carries them (made into
    pixel values by the student's processor, as the teacher's made them when it was scored)."""
    ids = cached.input_ids.tolist()
    images = None
    if cached.images:
        images = ImagePrompt(ids, cached.images, run.processor.image_processor, run.processor.tokenizer.image_token_id)
    return TokenSequence(ids, cached.loss_mask.tolist(), images)


def _has_images(run: DistillRun) -> bool:
    """Whether the prompts the engine is given (training and held-out) hold images."""
    held_out = run.held_out.prompt_ids if run.held_out is not None else []
    return any(prompt_has_images(p) for p in [*run.prompts, *held_out])


# --- the stage -----------------------------------------------------------------------------------

@register_stage("distill", DistillStageConfig, outputs=("model",), distributed=True)
def run_distill(cfg: DistillStageConfig, ctx: StageContext) -> StageResult:
    """On-policy distillation from a teacher (GKD, Gemma 3 sampled-logit targets, offline teacher cache)."""
    run = setup_distill(cfg, ctx)
    cfg = run.cfg
    summary: dict = run.session.describe(cfg.batch_size, "sequences")
    try:
        start_engine(run)
        if run.held_out is not None and run.start_step == 0:
            summary.update(evaluate_student(run, "before"))
            if cfg.eval_teacher and cfg.teacher is not None and run.session.is_main:
                summary.update(evaluate_teacher(run))
        totals = train(run)
        if run.engine is not None and cfg.max_steps % cfg.sync_weights_every != 0:
            sync_weights(run.engine, run.student)
        if run.held_out is not None:
            summary.update(evaluate_student(run, "after"))
    finally:
        if run.engine is not None:
            run.engine.close()

    out = ctx.stage_dir / "model"
    run.session.save_output_model(run.student, run.tokenizer, out)
    run.session.close()
    steps_run = max(1, cfg.max_steps - run.start_step)
    summary.update({
        "steps": cfg.max_steps, "fraction_on_policy": totals.on_policy_steps / steps_run,
        "loss_last": totals.last.get("loss"), "train_seconds": round(totals.seconds, 1),
        "tokens_per_s": round(totals.tokens_seen / max(totals.seconds, 1e-9), 1),
    })
    for key in ("kl_teacher_student", "kl_student_teacher", "drift_mean_abs"):
        if key in totals.last:
            summary[f"{key}_last"] = totals.last[key]
    return StageResult(outputs={"model": str(out)}, metrics=summary)
