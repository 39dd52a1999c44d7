"""`rl`: REINFORCE with a leave-one-out baseline and a KL penalty to an EMA anchor (WARP, stage 1),
or J-BOND / BOND (`algorithm: jbond | bond`, ALGORITHMS.md section 3: see `_bond_step` below).

Every step of `algorithm: rloo`, written out in `run_rl` top to bottom (ALGORITHMS.md, section 4):

    1. sample      a batch of prompts; n completions each from the rollout engine (temperature T)
    2. reward      r(x, y): the recipe's rewards, combined with weights (rewards.combine)
    3. forward     log pi(y|x) with gradient; log pi_anchor(y|x) without (posttrain.scoring: each
                   prompt runs once for its n samples)
    4. advantage   r_beta = r - beta * log(pi / pi_anchor);  A = r_beta - mean of the other n-1 samples
    5. loss        -A * log pi(y|x) (optionally importance-weighted against the engine), backward, step
    6. anchor      theta_anchor <- (1 - mu) * theta_anchor + mu * theta
    7. sync        push the new weights to the engine

All log-probabilities are taken at the sampling temperature T (log_softmax(logits / T)), the
convention of the rollout engines, so trainer and engine score the same distribution.
Checkpoints (policy, anchor, optimizer, RNG states, step) go to `checkpoints/` in the stage
directory; re-running the stage there resumes from the newest one with the same data order,
because the prompts of step s and its sampling seed are functions of (seed, s) only.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from posttrain.allocator import retain_freed_memory
from posttrain.evaluation import evaluate_with_rewards
from posttrain.data import load_prompts
from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.losses.bond import (backward_rewards, better_sample_index, forward_nll_loss, jbond_rewards, jeffreys_loss,
                                   leave_one_out_advantages, log_quantile_rewards, ties)
from posttrain.losses.policy import (Aggregation, k3_kl, kl_regularised_rewards, masked_sum, reinforce_loss,
                                     rloo_advantages)
from posttrain.modeling import load_causal_lm, load_tokenizer
from posttrain.rollout import DriftMonitor, RolloutConfig, SamplingParams, create_engine, weights_for_engine
from posttrain.scoring import score_completions
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage
from posttrain.trackers import ReportTo
from posttrain.training import (PLACEMENT_HELP, ChunkSize, LoraSpec, TrainingSession, engine_asleep, latest_checkpoint,
                                load_checkpoint, place_frozen, resolve_placement, save_checkpoint, save_model,
                                token_budget_batches, truncate_metrics)
from posttrain.weights import ema_update_
from rewards.combine import CombinedReward, FaultPolicy, RewardBatch, RewardSpec, columns_from_rows

log = logging.getLogger(__name__)


class RLStageConfig(StageConfig):
    """REINFORCE/RLOO on rollouts with weighted rewards and a KL penalty to an EMA anchor (WARP stage 1)."""

    model: str = Field(description="Policy to start from (and the initial anchor): ${stages.NAME.model}, ${models.NAME} or a path.")
    dataset: str = Field(description="Prompt rows: `prompt` (text or messages) plus the columns the rewards read "
                         "(`answer`, `tests`, `instruction_id_list`/`kwargs`, ...).")
    eval_dataset: str | None = Field(None, description="Held-out prompt rows scored with greedy decoding and the same "
                                     "rewards before training, every eval_every steps, and after training.")
    eval_max_prompts: int = Field(128, ge=1, description="Score at most this many eval prompts (the first ones).")
    eval_every: int = Field(0, ge=0, description="Evaluate every this many steps (0: only before and after training).")
    rewards: list[RewardSpec] = Field(description="Reward functions and their weights, e.g. [{name: math, weight: 1.0}]; "
                                      "the combined reward is their weighted sum (see rewards.combine).")
    fault_policy: FaultPolicy = Field("zero", description="A reward function that raises, times out or returns a "
                                      "non-number: zero (that value counts as 0), skip (the sample is left out of the "
                                      "update), fail (stop the run). Faults are counted per reward in the metrics.")
    num_generations: int = Field(4, ge=1, description="Completions sampled per prompt (n); RLOO needs n >= 2.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step (batch = prompts_per_step x n sequences).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-5, gt=0, description="Adam learning rate (WARP: 1e-6 on Gemma; tiny models want ~1e-4).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps; constant afterwards.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (None: no clipping).")
    beta: float = Field(0.1, ge=0, description="KL coefficient in r_beta = r - beta * log(pi/pi_anchor); 0 turns the penalty off.")
    anchor_ema: float = Field(0.01, ge=0, le=1, description="mu in theta_anchor <- (1-mu) theta_anchor + mu theta after "
                              "every step; 0 keeps the starting model as a fixed anchor.")
    baseline: Literal["rloo", "none"] = Field("rloo", description="rloo: subtract the mean r_beta of the prompt's other "
                                              "samples; none: plain REINFORCE on r_beta.")
    loss_aggregation: Aggregation = Field("token_mean", description="How per-token losses are averaged: token_mean "
                                          "(over all completion tokens of the step), sequence_mean (GRPO), sequence_sum "
                                          "(textbook REINFORCE); see posttrain.losses.policy.reinforce_loss.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature (WARP: 0.9); logprobs use the same T.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off; keep 1 so logprobs stay exact).")
    max_new_tokens: int = Field(64, ge=1, description="Completion length limit; longer completions are cut (counted as truncated).")
    max_prompt_tokens: int = Field(256, ge=1, description="Prompts longer than this are dropped before training, with a count in the metrics.")
    importance_clip: float | None = Field(None, gt=0, description="If set, weight each token by min(pi_trainer/pi_engine, "
                                          "this) to correct for engine/trainer numerical mismatch (truncated importance sampling).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: mixed precision, the trainer's forward "
                                               "passes (policy, anchor) run under torch.autocast(bfloat16) while "
                                               "weights, optimizer state, logprobs and the loss stay float32, as "
                                               "TRL's bf16=True does. Several times faster matmuls on GPUs and AMX "
                                               "CPUs; the logprobs carry bf16 rounding (watch the drift metrics).")
    grad_accum: int = Field(1, ge=1, description="Split each step's prompts into this many micro-batches (whole prompt "
                            "groups) accumulated into one update; prompts_per_step must be divisible by it. "
                            "max_tokens_per_microbatch, when set, decides instead.")
    max_tokens_per_microbatch: int | None = Field(
        None, ge=1, description="Bound each forward/backward micro-batch by this many tokens (prompt + completion, "
        "whole prompt groups; a group larger than the budget gets one of its own) and accumulate them into the "
        "step's update: memory per micro-batch is set by this budget, not by prompts_per_step or the vocabulary.")
    logprob_chunk_size: ChunkSize = Field(
        "auto", description="Completion positions projected to the vocabulary at a time when scoring (recomputed in "
        "backward), so no [batch, length, vocabulary] tensor is ever built. auto: as many as fit 2**25 logits "
        "(128 MiB in float32), which keeps a chunk's memory the same whatever the vocabulary; null: the model's "
        "full logits at once.")
    shard_optimizer: bool = Field(False, description="Data-parallel launches: shard AdamW's state over the ranks "
                                  "(ZeRO stage 1, torch's ZeroRedundancyOptimizer); the weights stay whole on every "
                                  "rank. On automatically under a DeepSpeed ZeRO-1/2 launch.")
    gradient_checkpointing: bool = Field(False, description="Recompute the policy's activations in backward (less "
                                         "memory, about a third more compute); scoring then runs each sequence's "
                                         "prompt with it instead of once per group.")
    anchor_placement: str = Field("accelerator", description="Where the anchor and start model live: " + PLACEMENT_HELP + ".")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights; the output model is merged.")
    checkpoint_every: int = Field(50, ge=0, description="Save a resumable checkpoint every this many steps (0: never).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest this many checkpoints.")
    max_nan_steps: int = Field(3, ge=1, description="A non-finite loss or gradient skips the step; this many in a row stops the run.")
    log_kl_to_start: bool = Field(True, description="Also score samples under the starting model to log the KL to it "
                                  "(one extra forward per step when anchor_ema > 0).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout engine settings, including the "
                                   "logprob drift thresholds (drift_warn_threshold, drift_stop_threshold).")
    report_to: ReportTo = Field(default_factory=list, description="Extra trackers: tensorboard, wandb, trackio "
                                "(the `trackers` extra installs them).")
    algorithm: Literal["rloo", "jbond", "bond"] = Field(
        "rloo", description="rloo: REINFORCE with a leave-one-out baseline and a KL penalty (WARP stage 1). jbond: "
        "J-BOND (Sessa et al. 2024, Algorithm 2): per prompt one policy sample and two EMA-anchor samples, loss "
        "(1 - jeffreys_beta) * NLL of the better anchor sample + jeffreys_beta * policy gradient on r_J = -log 16 "
        "when the policy sample is worse than both, minus its log-ratio to the anchor. bond: the same with bond_n "
        "anchor samples, the forward term on their best and the backward reward log p_le (Monte Carlo quantile over "
        "them) with KL coefficient 1/(bond_n - 1). See posttrain.losses.bond for the tie rule.")
    jeffreys_beta: float = Field(0.5, ge=0, le=1, description="jbond/bond: weight of the backward term (1: "
                                 "backward only, mode seeking; 0: forward only, best-of-N SFT); the paper's 0.5.")
    kl_gamma: float = Field(0.0, ge=0, description="jbond/bond: weight of an extra KL(pi || pi_anchor) gradient on "
                            "the policy samples (the paper's gamma, 0 in its main runs).")
    bond_n: int = Field(8, ge=2, description="bond: N, the anchor samples per prompt (best-of-N and quantile samples).")
    anchor_rollout: Literal["swap", "engine"] = Field(
        "swap", description="jbond/bond: how the EMA anchor samples. swap: the anchor's weights are loaded into the "
        "one rollout engine for its samples and the policy's after them; engine: a second engine holds the anchor. "
        "Both push two weight sets per step; swap saves the second engine's start-up and memory (bench/bench_bond.py).")

    @model_validator(mode="after")
    def _check(self):
        # Fields of the other algorithm are checked against their defaults, not against "was it set":
        # the runner re-validates the resolved config with every field written out.
        if self.algorithm != "rloo":
            self._check_bond()
        else:
            for name in ("jeffreys_beta", "kl_gamma", "bond_n", "anchor_rollout"):
                if not self._is_default(name):
                    raise ValueError(f"{name}: applies to algorithm jbond or bond; this stage runs algorithm rloo")
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("num_generations: the rloo baseline needs at least 2 samples per prompt; "
                             "raise num_generations or set baseline: none")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(f"grad_accum: prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"grad_accum={self.grad_accum} (micro-batches hold whole prompt groups)")
        if not self.rewards:
            raise ValueError("rewards: name at least one reward, e.g. [{name: math, weight: 1.0}]")
        return self

    def _is_default(self, name: str) -> bool:
        return getattr(self, name) == type(self).model_fields[name].default

    def _check_bond(self) -> None:
        if not self._is_default("num_generations"):
            raise ValueError(f"num_generations: applies to algorithm rloo; {self.algorithm} samples one policy "
                             f"completion and {self.anchor_samples} anchor completions per prompt"
                             + (" (set bond_n)" if self.algorithm == "bond" else ""))
        if not self._is_default("beta"):
            raise ValueError(f"beta: the KL coefficient of algorithm rloo; {self.algorithm} fixes its KL coefficient "
                             "at 1/(N-1) (1 for jbond) and weighs its two terms with jeffreys_beta")
        if self.algorithm == "jbond" and not self._is_default("bond_n"):
            raise ValueError("bond_n: jbond always takes two anchor samples (N = 2); use algorithm: bond for other N")
        if "anchor_ema" not in self.model_fields_set:
            self.anchor_ema = 0.02  # J-BOND's eta (ablations 0.01-0.1)

    @property
    def anchor_samples(self) -> int:
        """Anchor completions per prompt: 2 for jbond, bond_n for bond, none for rloo."""
        return {"rloo": 0, "jbond": 2, "bond": self.bond_n}[self.algorithm]

    @property
    def completions_per_prompt(self) -> int:
        return self.num_generations if self.algorithm == "rloo" else 1 + self.anchor_samples


# --- data ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_rows))
    random.Random(f"rl-data:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def prompt_indices_for_step(num_rows: int, step: int, prompts_per_step: int, seed: int) -> list[int]:
    """Rows of step `step`: consecutive slices of per-epoch shuffles, a pure function of (seed, step)."""
    out = []
    for position in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, i = divmod(position, num_rows)
        out.append(_epoch_order(num_rows, seed, epoch)[i])
    return out


def sampling_seed(seed: int, step: int, rank: int = 0) -> int:
    """The engine's seed for step `step` on data-parallel rank `rank`. Engines derive per-sample
    seeds as base + offset, so consecutive integers would replay shifted streams; a hash of
    (seed, step, rank) keeps steps and ranks apart (rank 0 keeps the single-process seed)."""
    key = f"rl-sampling:{seed}:{step}" if rank == 0 else f"rl-sampling:{seed}:{step}:{rank}"
    return random.Random(key).randrange(2**31)


# --- evaluation ---------------------------------------------------------------------------------

def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _std(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return 0.0
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# --- the stage ----------------------------------------------------------------------------------

def _build_policy(config: RLStageConfig):
    base = load_causal_lm(config.model)
    if config.lora is None:
        return base, base
    from peft import get_peft_model

    plain_copy = copy.deepcopy(base)  # the anchor lives in merged-weight space, outside peft
    return get_peft_model(base, config.lora.to_peft_config()), plain_copy


@register_stage("rl", RLStageConfig, outputs=("model",), distributed=True)
def run_rl(config: RLStageConfig, ctx: StageContext) -> StageResult:
    """REINFORCE/RLOO with a KL penalty to an EMA anchor (WARP stage 1) on rollout-engine samples."""
    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    retain_freed_memory()  # see posttrain.allocator: steps stop page-faulting their activations
    torch.manual_seed(ctx.seed)
    random.seed(ctx.seed)
    session = TrainingSession(config.precision, ctx.seed)
    session.shard(range(config.prompts_per_step), "prompts_per_step")  # fails early unless it splits over the ranks
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id
    rows, prompt_ids, dropped = load_prompts(config.dataset, tokenizer, config.max_prompt_tokens)
    eval_rows = eval_ids = None
    if config.eval_dataset:
        eval_rows, eval_ids, _ = load_prompts(config.eval_dataset, tokenizer, config.max_prompt_tokens)
        eval_rows, eval_ids = eval_rows[:config.eval_max_prompts], eval_ids[:config.eval_max_prompts]

    # Models: the policy being trained, the anchor (EMA of the policy), the starting model (fixed).
    policy, plain = _build_policy(config)
    frozen_device = resolve_placement(config.anchor_placement, session.device, "anchor_placement")
    anchor = place_frozen(copy.deepcopy(plain), frozen_device)
    start_model = (place_frozen(copy.deepcopy(plain), frozen_device)
                   if (config.log_kl_to_start and config.anchor_ema > 0) else None)
    del plain
    policy = session.prepare(policy, config.learning_rate, config.weight_decay, config.warmup_steps,
                             gradient_checkpointing=config.gradient_checkpointing,
                             shard_optimizer=config.shard_optimizer)

    start_step, nan_streak = 0, 0
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None:
        state = load_checkpoint(session, checkpoint, {"policy": policy, "anchor": anchor})
        start_step, nan_streak = state["step"], state.get("nan_streak", 0)
        if ctx.is_main:
            truncate_metrics(stage_dir / "metrics.jsonl", start_step)
        log.info("resuming %s from %s (step %d)", ctx.name, checkpoint, start_step)

    recipe_dir = getattr(ctx, "recipe_dir", None)  # file-path rewards are relative to the recipe
    reward = CombinedReward(config.rewards, config.fault_policy, base_dir=str(recipe_dir) if recipe_dir else None)
    reward.warm_up()  # reward workers start while the engine loads
    engine = create_engine(config.model, config.rollout, device=session.device)
    anchor_rollouts = AnchorRollouts(config, engine, session.device) if config.algorithm != "rloo" else None
    drift = DriftMonitor.from_config(config.rollout)
    summary: dict[str, Any] = {"prompts_dropped_too_long": dropped,
                               **session.describe(config.prompts_per_step * config.completions_per_prompt, "sequences")}
    record: dict[str, Any] = {}
    tie_steps = []
    try:
        if start_step:
            engine.update_weights(weights_for_engine(policy))
            if anchor_rollouts is not None:
                anchor_rollouts.resume(anchor)
        with ctx.metrics(config.report_to) as metrics, ctx.progress(config.max_steps, "RL steps") as advance:
            advance(start_step)
            if eval_rows and start_step == 0:
                before = evaluate_with_rewards(engine, reward, eval_rows, eval_ids, config.max_new_tokens, session)
                metrics.log(0, **before)
                summary.update({k + "_before": v for k, v in before.items()})
            for step in range(start_step, config.max_steps):
                if config.algorithm == "rloo":
                    record, nan_streak = _rl_step(step, config, ctx, session, engine, reward, drift, policy, anchor,
                                                  start_model, rows, prompt_ids, pad_id, nan_streak)
                else:
                    record, nan_streak = _bond_step(step, config, ctx, session, engine, anchor_rollouts, reward, drift,
                                                    policy, anchor, start_model, rows, prompt_ids, pad_id, nan_streak)
                    tie_steps.append(record["ties/step"])
                record["prompts_dropped_too_long"] = dropped
                if config.eval_every and eval_rows and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
                    record.update(evaluate_with_rewards(engine, reward, eval_rows, eval_ids, config.max_new_tokens, session))
                metrics.log(step + 1, **record)
                advance(1)
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.max_steps:
                    save_checkpoint(session, stage_dir, step + 1, {"policy": policy, "anchor": anchor},
                                    {"nan_streak": nan_streak}, config.keep_checkpoints)
            summary.update({k: v for k, v in record.items() if not k.startswith("time/")} if config.max_steps > start_step else {})
            if tie_steps:  # the share of this run's steps where the tie rule decided something
                summary["ties/step_fraction"] = sum(tie_steps) / len(tie_steps)
            if eval_rows:
                after = evaluate_with_rewards(engine, reward, eval_rows, eval_ids, config.max_new_tokens, session)
                metrics.log(config.max_steps, **after)
                summary.update({k + "_after": v for k, v in after.items()})
    finally:
        if anchor_rollouts is not None:
            anchor_rollouts.close()
        engine.close()

    out_dir = stage_dir / "model"
    if ctx.is_main:
        final = policy.merge_and_unload() if config.lora is not None else policy
        save_model(final, tokenizer, out_dir)
    session.barrier()  # the other ranks return once the model is on disk
    session.close()
    return StageResult(outputs={"model": str(out_dir)}, metrics=summary)


def _step_prompts(step, config: RLStageConfig, ctx, session: TrainingSession, rows, prompt_ids):
    """This rank's prompts of step `step` (rows, token ids), whether the step checks drift, and its sampling.

    The step's prompts are a function of (seed, step) and each rank takes its share. The engine's
    logprobs feed importance weights (every step) and the drift check (every
    rollout.drift_check_every steps, from the first); other steps sample without them, which is cheaper.
    """
    batch_idx = session.shard(prompt_indices_for_step(len(rows), step, config.prompts_per_step, ctx.seed),
                              "prompts_per_step")
    check_drift = step % config.rollout.drift_check_every == 0
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                              seed=sampling_seed(ctx.seed, step, session.rank),
                              logprobs=check_drift or config.importance_clip is not None)
    return [rows[i] for i in batch_idx], [prompt_ids[i] for i in batch_idx], check_drift, sampling


def _rl_step(step, config: RLStageConfig, ctx, session: TrainingSession, engine, reward: CombinedReward, drift, policy,
             anchor, start_model, rows, prompt_ids, pad_id, nan_streak) -> tuple[dict, int]:
    """One iteration of the loop on this rank's share of the step; returns (metrics record, NaN streak)."""
    n = config.num_generations
    timer = _Timer()

    # 1. Sample: the step's prompts are a function of (seed, step); this rank takes its share of
    #    them and samples n completions each on its own engine.
    batch_rows, batch_prompts, check_drift, sampling = _step_prompts(step, config, ctx, session, rows, prompt_ids)
    with timer("generate"):
        groups = engine.generate(batch_prompts, n=n, sampling=sampling)
    completions = [c for group in groups for c in group]

    # 2. Reward: every reward function on every completion, combined with the recipe's weights.
    with timer("reward"):
        scored = reward.compute([r["prompt"] for r in batch_rows for _ in range(n)], [c.text for c in completions],
                                columns_from_rows(batch_rows, n), completion_ids=[c.token_ids for c in completions])

    # 3-5. Forward, advantages, loss and backward; the engine sleeps meanwhile when asked to.
    with timer("train"), engine_asleep(engine, config.rollout.enable_sleep_mode):
        stats, finite = policy_gradient_pass(config, session, policy, anchor, start_model, batch_prompts,
                                             completions, scored.rewards, pad_id, keep_logprobs=check_drift)
        # Every rank steps or skips together: the gradient all-reduce in step() is collective.
        finite = session.all_sum(0.0 if finite else 1.0) == 0
        result = session.step(config.max_grad_norm) if finite else None
        if not finite:
            session.zero_grad()
    local = _local_step_values(scored, completions)
    if result is None or not result.finite:
        nan_streak = _skipped_nonfinite_step(step, config, nan_streak)
        return {"skipped_nonfinite": 1, "nan_streak": nan_streak, **_reward_metrics(session, local)}, nan_streak
    nan_streak = 0

    # 6. Anchor: EMA of the policy's (LoRA-merged) weights. The update was the same on every rank,
    #    so every rank's anchor stays identical without communication.
    with timer("anchor"):
        ema_update_(anchor, {k: v.to(anchor.device) for k, v in weights_for_engine(policy)}, config.anchor_ema)

    # 7. Sync: the engine samples the next batch from the updated policy.
    with timer("sync"):
        engine.update_weights(weights_for_engine(policy))

    drift_metrics = drift.check(stats.engine_lp, stats.trainer_lp, step=step + 1) if check_drift else {}
    record = {
        **_reward_metrics(session, local),
        "reward_beta/mean": _mean(session.gather_lists(stats.r_beta)),
        "loss": session.all_sum(stats.loss), "grad_norm": result.grad_norm, "lr": session.learning_rate,
        "kl_anchor": _mean(session.gather_lists(stats.kl_anchor)), "kl_start": _mean(session.gather_lists(stats.kl_start)),
        "kl_anchor_k3": _mean(session.gather_lists(stats.kl_anchor_k3)),
        "kl_start_k3": _mean(session.gather_lists(stats.kl_start_k3)),
        "entropy": session.all_sum(stats.entropy_sum) / max(1.0, session.all_sum(stats.entropy_count)),
        "micro_batches": stats.micro_batches, **drift_metrics, "skipped_nonfinite": 0,
    }
    record.update(timer.report())
    return record, nan_streak


def policy_gradient_pass(config: RLStageConfig, session: TrainingSession, policy, anchor, start_model,
                         batch_prompts: list[list[int]], completions, rewards: list, pad_id: int,
                         keep_logprobs: bool = False) -> tuple["_StepStats", bool]:
    """Steps 3-5 on this rank's completions: score them under the policy (with gradient), the anchor
    and the start model, form r_beta and RLOO advantages, and accumulate the gradient of this rank's
    share of the global loss. Returns the step's statistics and whether every loss was finite.

    The loss is normalised by the *global* token count (token_mean) or sequence count, so summing
    the ranks' gradients (TrainingSession.step) gives exactly the single-process gradient.
    """
    n = config.num_generations
    # None: the fault policy skipped the sample, or no reward applies to it; it is left out of the update.
    valid = torch.tensor([v is not None for v in rewards])
    reward_t = torch.tensor([0.0 if v is None else float(v) for v in rewards], dtype=torch.float32)
    seq_prompts = [p for p in batch_prompts for _ in range(n)]
    lengths = [len(c.token_ids) for c in completions]
    if config.loss_aggregation == "token_mean":
        normalizer = max(1.0, session.all_sum(sum(lengths)))
    else:
        normalizer = session.all_sum(len(completions))
    if config.max_tokens_per_microbatch is not None:
        sizes = [len(p) + len(c.token_ids) for p, c in zip(seq_prompts, completions)]
        micro = token_budget_batches(sizes, config.max_tokens_per_microbatch, group_size=n)
    else:
        group = len(completions) // config.grad_accum if len(completions) >= config.grad_accum else len(completions)
        group = max(n, group - group % n)
        micro = [slice(s, s + group) for s in range(0, len(completions), group)]
    # Gradient checkpointing drops the key/value cache the shared-prompt layout reuses: score flat then.
    group_size = 1 if config.gradient_checkpointing else n
    stats = _StepStats()
    stats.micro_batches = len(micro)
    for mb in micro:
        comp_ids = [c.token_ids for c in completions[mb]]
        score = functools.partial(score_completions, prompt_ids=seq_prompts[mb], completion_ids=comp_ids,
                                  temperature=config.temperature, pad_token_id=pad_id, group_size=group_size,
                                  chunk_size=_chunk_size(config, policy))
        with session.autocast():
            logp, mask, entropy = score(policy, with_entropy=True)
            with torch.no_grad():
                logp_anchor = score(anchor)[0].to(logp.device)
                logp_start = score(start_model)[0].to(logp.device) if start_model is not None else None
        logp_sum, anchor_sum = masked_sum(logp.detach(), mask), masked_sum(logp_anchor, mask)
        r, ok = reward_t[mb].to(logp.device), valid[mb].to(logp.device)
        r_beta = kl_regularised_rewards(r, logp_sum, anchor_sum, config.beta)
        if config.baseline == "rloo":
            advantages = rloo_advantages(r_beta.view(-1, n), ok.view(-1, n)).view(-1)
        else:
            advantages = torch.where(ok, r_beta, torch.zeros_like(r_beta))
        old = _pad_engine_logprobs(completions[mb], mask) if config.importance_clip is not None else None
        loss = reinforce_loss(logp, advantages, mask, old_logprobs=old, clip=config.importance_clip,
                              aggregation=config.loss_aggregation, normalizer=normalizer)
        if not torch.isfinite(loss):
            return stats, False
        loss.backward()
        stats.add(loss=loss.item(), kl_anchor=(logp_sum - anchor_sum).tolist(),
                  kl_start=(logp_sum - masked_sum(logp_start, mask)).tolist() if logp_start is not None
                  else (logp_sum - anchor_sum).tolist(),
                  entropy=(entropy.sum().item(), mask.sum().item()), r_beta=r_beta[ok].tolist(),
                  engine_lp=[c.logprobs for c in completions[mb]] if keep_logprobs else [],
                  trainer_lp=[logp[i, :len(c.token_ids)].detach().cpu() for i, c in enumerate(completions[mb])]
                  if keep_logprobs else [])
        stats.kl_anchor_k3 += k3_kl(logp.detach(), logp_anchor, mask).tolist()
        stats.kl_start_k3 += k3_kl(logp.detach(), logp_anchor if logp_start is None else logp_start, mask).tolist()
    return stats, True


# --- J-BOND and BOND (algorithm: jbond | bond) --------------------------------------------------
#
# Per step, on this rank's prompts (ALGORITHMS.md, section 3; posttrain.losses.bond):
#
#     1. sample      one completion per prompt from the policy; k from the EMA anchor (jbond: 2, bond: N)
#     2. reward      all 1 + k completions of a prompt in one reward call
#     3. score       without gradient: log pi, log pi_anchor (and log pi_start) of the policy sample,
#                    its backward reward R = r_J - log(pi/pi_anchor) (bond: log p_le - log(pi/pi_anchor)/(N-1))
#                    and the leave-one-out baseline over the whole batch (a sum over every rank)
#     4. loss        (1 - jeffreys_beta) * NLL(best anchor sample) + jeffreys_beta * -(R - b) * log pi(y)
#                    (+ kl_gamma * KL), one pass with gradient over [policy sample, best anchor sample]
#     5-7.           step, anchor EMA and weight sync as for rloo
#
# Scoring the policy sample twice (3 without gradient, 4 with) is what makes the baseline exact:
# it is the mean R of the *other* batch items, so every R must be known before the first backward,
# and under a token budget or data parallelism those items sit in other micro-batches and ranks.


class AnchorRollouts:
    """Samples of the EMA anchor, on the policy's engine (anchor_rollout: swap) or on an engine of its own.

    The anchor changes after every step (EMA), so either way a step pushes two weight sets (swap:
    anchor in, policy back; engine: policy to one engine, anchor to the other) and generates the
    same samples; a second engine adds its start-up and a second copy of weights and KV cache.
    Measured with bench/bench_bond.py --parts anchor (numbers in the README's BOND section), swap
    is the default.
    """

    def __init__(self, config: "RLStageConfig", engine, device):
        self.swap = config.anchor_rollout == "swap"
        self.engine = engine if self.swap else create_engine(config.model, config.rollout, device=device)

    def resume(self, anchor) -> None:
        """After a resume the engines were built from the starting weights; a second engine takes the anchor's."""
        if not self.swap:
            self.engine.update_weights(weights_for_engine(anchor))

    def generate(self, anchor, prompts, n: int, sampling: SamplingParams):
        if self.swap:
            self.engine.update_weights(weights_for_engine(anchor))
        return self.engine.generate(prompts, n=n, sampling=sampling)

    def sync(self, policy_engine, policy, anchor) -> None:
        """After the step: the policy engine gets the new policy; a second engine the new anchor."""
        policy_engine.update_weights(weights_for_engine(policy))
        if not self.swap:
            self.engine.update_weights(weights_for_engine(anchor))

    def close(self) -> None:
        if not self.swap:
            self.engine.close()


def anchor_sampling_seed(seed: int, step: int, rank: int = 0) -> int:
    """The anchor's sampling seed for a step and rank, apart from the policy's (sampling_seed)."""
    return random.Random(f"rl-anchor-sampling:{seed}:{step}:{rank}").randrange(2**31)


def _bond_step(step, config: RLStageConfig, ctx, session: TrainingSession, engine, anchor_rollouts: AnchorRollouts,
               reward: CombinedReward, drift, policy, anchor, start_model, rows, prompt_ids, pad_id,
               nan_streak) -> tuple[dict, int]:
    """One J-BOND / BOND iteration on this rank's share of the step; returns (metrics record, NaN streak)."""
    k = config.anchor_samples
    timer = _Timer()

    # 1. Sample: one policy completion per prompt (the engine holds the policy), then k anchor completions.
    batch_rows, batch_prompts, check_drift, sampling = _step_prompts(step, config, ctx, session, rows, prompt_ids)
    with timer("generate"):
        policy_samples = [g[0] for g in engine.generate(batch_prompts, n=1, sampling=sampling)]
    with timer("generate_anchor"):
        anchor_sampling = sampling.model_copy(update={"seed": anchor_sampling_seed(ctx.seed, step, session.rank),
                                                      "logprobs": False})
        anchor_groups = anchor_rollouts.generate(anchor, batch_prompts, k, anchor_sampling)

    # 2. Reward: per prompt [policy sample, anchor samples...], one call.
    with timer("reward"):
        samples = [c for p, group in zip(policy_samples, anchor_groups) for c in [p, *group]]
        scored = reward.compute([r["prompt"] for r in batch_rows for _ in range(1 + k)], [c.text for c in samples],
                                columns_from_rows(batch_rows, 1 + k), completion_ids=[c.token_ids for c in samples])

    # 3-4. Score, losses, backward; the engine sleeps meanwhile when asked to.
    with timer("train"), engine_asleep(engine, config.rollout.enable_sleep_mode):
        stats, finite = bond_gradient_pass(config, session, policy, anchor, start_model, batch_prompts, policy_samples,
                                           anchor_groups, scored.rewards, pad_id, keep_logprobs=check_drift)
        finite = session.all_sum(0.0 if finite else 1.0) == 0
        result = session.step(config.max_grad_norm) if finite else None
        if not finite:
            session.zero_grad()
    local = _local_step_values(_policy_part(scored, 1 + k), policy_samples)
    tie_metrics = {"ties/prompt_fraction": session.all_sum(stats.ties) / max(1.0, session.all_sum(stats.prompts))}
    tie_metrics["ties/step"] = float(tie_metrics["ties/prompt_fraction"] > 0)
    if result is None or not result.finite:
        if anchor_rollouts.swap:  # the engine holds the anchor's weights; the next samples are the policy's
            engine.update_weights(weights_for_engine(policy))
        nan_streak = _skipped_nonfinite_step(step, config, nan_streak)
        return {"skipped_nonfinite": 1, "nan_streak": nan_streak, **tie_metrics,
                **_reward_metrics(session, local)}, nan_streak
    nan_streak = 0

    # 5. Anchor EMA (identical on every rank, as for rloo), then 6. both weight sets to their engines.
    with timer("anchor"):
        ema_update_(anchor, {kname: v.to(anchor.device) for kname, v in weights_for_engine(policy)}, config.anchor_ema)
    with timer("sync"):
        anchor_rollouts.sync(engine, policy, anchor)

    drift_metrics = drift.check(stats.engine_lp, stats.trainer_lp, step=step + 1) if check_drift else {}
    anchor_rewards = [v for i, v in enumerate(scored.rewards) if i % (1 + k)]
    record = {
        **_reward_metrics(session, local),
        "reward_anchor/mean": _mean(session.gather_lists(anchor_rewards)),
        "backward_reward/mean": _mean(session.gather_lists(stats.backward_reward)),
        "loss": session.all_sum(stats.loss), "loss/forward": session.all_sum(stats.forward),
        "loss/backward": session.all_sum(stats.backward), "grad_norm": result.grad_norm, "lr": session.learning_rate,
        "kl_anchor": _mean(session.gather_lists(stats.kl_anchor)), "kl_start": _mean(session.gather_lists(stats.kl_start)),
        "kl_anchor_k3": _mean(session.gather_lists(stats.kl_anchor_k3)),
        "kl_start_k3": _mean(session.gather_lists(stats.kl_start_k3)),
        "entropy": session.all_sum(stats.entropy_sum) / max(1.0, session.all_sum(stats.entropy_count)),
        **tie_metrics, "micro_batches": stats.micro_batches, **drift_metrics, "skipped_nonfinite": 0,
    }
    if config.kl_gamma:
        record["loss/kl"] = session.all_sum(stats.kl_term)
    record.update(timer.report())
    return record, nan_streak


def _policy_part(scored: RewardBatch, per_prompt: int) -> RewardBatch:
    """The reward batch restricted to the policy samples (the first of every prompt's completions)."""
    keep = range(0, len(scored.rewards), per_prompt)
    return RewardBatch(rewards=[scored.rewards[i] for i in keep], skipped=[scored.skipped[i] for i in keep],
                       per_reward={name: [v[i] for i in keep] for name, v in scored.per_reward.items()},
                       faults=scored.faults)


def bond_gradient_pass(config: RLStageConfig, session: TrainingSession, policy, anchor, start_model,
                       batch_prompts: list[list[int]], policy_samples, anchor_groups, rewards: list, pad_id: int,
                       keep_logprobs: bool = False) -> tuple["_BondStats", bool]:
    """Steps 3-4 of J-BOND / BOND on this rank's prompts: accumulate the gradient of this rank's share
    of (1 - jeffreys_beta) * forward + jeffreys_beta * backward (+ kl_gamma * KL).

    rewards: per prompt [policy sample, k anchor samples], flat; a None anywhere (a skipped reward)
    leaves the whole prompt out. Every normaliser (token or sequence counts, the baseline's sum and
    count) is summed over the ranks, so the ranks' gradients add up to the single-process one.
    """
    k = config.anchor_samples
    per_prompt = 1 + k
    num = len(batch_prompts)
    valid = torch.tensor([all(v is not None for v in rewards[i * per_prompt:(i + 1) * per_prompt]) for i in range(num)],
                         dtype=torch.bool)
    r = torch.tensor([0.0 if v is None else float(v) for v in rewards], dtype=torch.float32).view(num, per_prompt)
    policy_r, anchor_r = r[:, 0], r[:, 1:]
    if config.algorithm == "jbond":
        quantile_reward, kl_coef = jbond_rewards(policy_r, anchor_r), 1.0
    else:
        quantile_reward, kl_coef = log_quantile_rewards(policy_r, anchor_r), 1.0 / (k - 1)
    best = better_sample_index(anchor_r)
    targets = [anchor_groups[i][int(best[i])] for i in range(num)]
    stats = _BondStats()
    stats.ties = float((ties(policy_r, anchor_r) & valid).sum())
    stats.prompts = float(valid.sum())
    group_size = 1 if config.gradient_checkpointing else None  # None: share each prompt over its rows

    def micro_batches(sizes: list[int], group: int) -> list[slice]:
        if config.max_tokens_per_microbatch is not None:
            return token_budget_batches(sizes, config.max_tokens_per_microbatch, group_size=group)
        prompts_per_mb = max(1, num // config.grad_accum)
        return [slice(s * group, (s + prompts_per_mb) * group) for s in range(0, num, prompts_per_mb)]

    def scorer(prompts, completions, group):
        return functools.partial(score_completions, prompt_ids=prompts, completion_ids=[c.token_ids for c in completions],
                                 temperature=config.temperature, pad_token_id=pad_id,
                                 group_size=group if group_size is None else group_size,
                                 chunk_size=_chunk_size(config, policy))

    # 3. Without gradient: the policy sample's log-probabilities under the policy, anchor and start model.
    logp_sum, anchor_sum, start_sum = torch.zeros(num), torch.zeros(num), torch.zeros(num)
    sizes = [len(p) + len(c.token_ids) for p, c in zip(batch_prompts, policy_samples)]
    for mb in micro_batches(sizes, 1):
        score = scorer(batch_prompts[mb], policy_samples[mb], 1)
        with torch.no_grad(), session.autocast():
            logp, mask, entropy = score(policy, with_entropy=True)
            logp_sum[mb] = masked_sum(logp, mask).float().cpu()
            logp_anchor = score(anchor)[0].to(logp.device)
            anchor_sum[mb] = masked_sum(logp_anchor, mask).float().cpu()
            logp_start = score(start_model)[0].to(logp.device) if start_model is not None else logp_anchor
            start_sum[mb] = masked_sum(logp_start, mask).float().cpu()
            stats.kl_anchor_k3 += k3_kl(logp, logp_anchor, mask)[valid[mb].to(logp.device)].tolist()
            stats.kl_start_k3 += k3_kl(logp, logp_start, mask)[valid[mb].to(logp.device)].tolist()
        ok = valid[mb].to(mask.device)
        stats.entropy_sum += float((entropy.sum(dim=-1) * ok).sum())
        stats.entropy_count += float((mask.sum(dim=-1) * ok).sum())
        if keep_logprobs:
            stats.engine_lp += [c.logprobs for c in policy_samples[mb]]
            stats.trainer_lp += [logp[i, :len(c.token_ids)].cpu() for i, c in enumerate(policy_samples[mb])]
    big_r = backward_rewards(quantile_reward, logp_sum, anchor_sum, kl_coef)
    if config.baseline == "rloo":
        advantages = leave_one_out_advantages(big_r, valid, session.all_sum(float(big_r[valid].sum())),
                                              session.all_sum(float(valid.sum())))
    else:
        advantages = torch.where(valid, big_r, torch.zeros_like(big_r))
    log_ratio = logp_sum - anchor_sum
    stats.kl_anchor = log_ratio[valid].tolist()
    stats.kl_start = (logp_sum - start_sum)[valid].tolist()
    stats.backward_reward = quantile_reward[valid].tolist()

    # 4. With gradient: [policy sample, best anchor sample] of each prompt, sharing the prompt's pass.
    #    A term whose weight is 0 is not scored (jeffreys_beta 1: backward only; 0 with kl_gamma 0: forward only).
    use_policy = config.jeffreys_beta > 0 or config.kl_gamma > 0
    use_target = config.jeffreys_beta < 1
    kinds = ["policy"] * use_policy + ["target"] * use_target
    per = len(kinds)
    seq_prompts = [p for p in batch_prompts for _ in kinds]
    seqs = [policy_samples[i] if kind == "policy" else targets[i] for i in range(num) for kind in kinds]
    weight = valid.float()
    counts = {kind: [len(seqs[i * per + j].token_ids) * float(weight[i]) for i in range(num)]
              for j, kind in enumerate(kinds)}
    normalizer = {kind: max(1.0, session.all_sum(sum(c))) if config.loss_aggregation == "token_mean"
                  else max(1.0, session.all_sum(float(weight.sum()))) for kind, c in counts.items()}
    mbs = micro_batches([len(p) + len(c.token_ids) for p, c in zip(seq_prompts, seqs)], per)
    stats.micro_batches = len(mbs)
    for mb in mbs:
        rows_mb = range(mb.start // per, min(num, mb.stop // per))
        score = scorer(seq_prompts[mb], seqs[mb], per)
        with session.autocast():
            logp, mask, _ = score(policy)
        ok = weight[rows_mb.start:rows_mb.stop].to(logp.device)[:, None]
        zero = logp.sum() * 0.0
        forward = backward = kl_term = zero
        if use_policy:
            j = kinds.index("policy")
            lp, m = logp[j::per], mask[j::per] * ok
            adv = advantages[rows_mb.start:rows_mb.stop].to(logp.device)
            old = (_pad_engine_logprobs([policy_samples[i] for i in rows_mb], mask[j::per])
                   if config.importance_clip is not None else None)
            backward = reinforce_loss(lp, adv, m, old_logprobs=old, clip=config.importance_clip,
                                      aggregation=config.loss_aggregation, normalizer=normalizer["policy"])
            if config.kl_gamma:
                # Score-function gradient of KL(pi || pi_anchor): E[log(pi/pi_anchor) * grad log pi].
                ratio = log_ratio[rows_mb.start:rows_mb.stop].to(logp.device)
                kl_term = reinforce_loss(lp, -ratio, m, aggregation=config.loss_aggregation,
                                         normalizer=normalizer["policy"])
        if use_target:
            j = kinds.index("target")
            forward = forward_nll_loss(logp[j::per], mask[j::per] * ok, config.loss_aggregation,
                                       normalizer=normalizer["target"])
        loss = jeffreys_loss(forward, backward, config.jeffreys_beta, kl_term, config.kl_gamma)
        if not torch.isfinite(loss):
            return stats, False
        loss.backward()
        stats.loss += loss.item()
        stats.forward += forward.item()
        stats.backward += backward.item()
        stats.kl_term += kl_term.item()
    return stats, True


class _BondStats:
    """A J-BOND / BOND step's statistics, over its micro-batches."""

    def __init__(self):
        self.loss = self.forward = self.backward = self.kl_term = 0.0
        self.kl_anchor, self.kl_start, self.backward_reward = [], [], []
        self.kl_anchor_k3, self.kl_start_k3 = [], []
        self.entropy_sum = self.entropy_count = 0.0
        self.engine_lp, self.trainer_lp = [], []
        self.ties = self.prompts = 0.0
        self.micro_batches = 0


def _chunk_size(config: RLStageConfig, policy) -> int | None:
    """logprob_chunk_size with "auto" resolved for the policy's vocabulary (by each pass, so callers
    that build a config themselves get the same numbers as the stage)."""
    return resolve_chunk_size(config.logprob_chunk_size, policy.get_output_embeddings().weight.shape[0])


def _skipped_nonfinite_step(step: int, config: RLStageConfig, nan_streak: int) -> int:
    """Count a step whose update was skipped for a non-finite loss or gradient; stop the run after
    max_nan_steps in a row. Returns the new streak."""
    nan_streak += 1
    log.warning("step %d: non-finite loss or gradient; skipped the update (%d in a row, limit %d)",
                step + 1, nan_streak, config.max_nan_steps)
    if nan_streak >= config.max_nan_steps:
        raise StageError(f"rl: {nan_streak} steps in a row had a non-finite loss or gradient (max_nan_steps="
                         f"{config.max_nan_steps}); check the rewards for NaN/inf and lower learning_rate")
    return nan_streak


def _local_step_values(scored, completions) -> dict:
    """This rank's per-sample values behind the step's reward metrics (gathered before averaging)."""
    return {"rewards": list(scored.rewards), "skipped": sum(scored.skipped),
            "lengths": [len(c.token_ids) for c in completions],
            "truncated": [c.finish_reason == "length" for c in completions],
            "per_reward": {k: list(v) for k, v in scored.per_reward.items()}, "faults": dict(scored.faults)}


def _reward_metrics(session: TrainingSession, local: dict) -> dict:
    """Reward, length and fault metrics over the whole step (every rank's samples)."""
    everyone = session.gather_lists([local])
    rewards = [v for part in everyone for v in part["rewards"]]
    lengths = [v for part in everyone for v in part["lengths"]]
    truncated = [v for part in everyone for v in part["truncated"]]
    out = {"reward/mean": _mean(rewards), "reward/std": _std(rewards),
           "reward/skipped": sum(part["skipped"] for part in everyone),
           "completion_length": sum(lengths) / max(1, len(lengths)),
           "truncation_rate": sum(truncated) / max(1, len(truncated))}
    for name in sorted({k for part in everyone for k in part["per_reward"]}):
        values = [v for part in everyone for v in part["per_reward"].get(name, [])]
        out[f"reward/{name}/mean"] = _mean(values)
        out[f"reward/{name}/std"] = _std(values)
    for name in sorted({k for part in everyone for k in part["faults"]}):
        out[f"reward/{name}/faults"] = sum(part["faults"].get(name, 0) for part in everyone)
    return out


def _pad_engine_logprobs(completions, mask: torch.Tensor) -> torch.Tensor:
    old = torch.zeros_like(mask)
    for i, c in enumerate(completions):
        if len(c.logprobs) != len(c.token_ids):
            raise StageError(f"importance_clip: the engine returned {len(c.logprobs)} logprobs for a completion of "
                             f"{len(c.token_ids)} tokens; importance weights need one per sampled token")
        old[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=old.dtype)
    return old


class _StepStats:
    """Accumulates a step's statistics over its micro-batches."""

    def __init__(self):
        self.loss = 0.0
        self.kl_anchor, self.kl_start, self.r_beta = [], [], []
        self.kl_anchor_k3, self.kl_start_k3 = [], []
        self.entropy_sum = self.entropy_count = 0.0
        self.engine_lp, self.trainer_lp = [], []
        self.micro_batches = 0

    def add(self, loss, kl_anchor, kl_start, entropy, r_beta, engine_lp, trainer_lp):
        self.loss += loss
        self.kl_anchor += kl_anchor
        self.kl_start += kl_start
        self.r_beta += r_beta
        self.entropy_sum += entropy[0]
        self.entropy_count += entropy[1]
        self.engine_lp += engine_lp
        self.trainer_lp += trainer_lp


class _Timer:
    """Wall-clock seconds per phase of a step, and the share spent in model compute."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - self.t

        return _Phase()

    def report(self) -> dict:
        total = time.perf_counter() - self._t0
        out = {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}
        out["time/step"] = round(total, 4)
        compute = self.seconds.get("generate", 0.0) + self.seconds.get("train", 0.0)
        out["time/model_compute_fraction"] = round(compute / total, 4) if total > 0 else 0.0
        return out
