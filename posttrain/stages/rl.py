"""`rl`: REINFORCE with a leave-one-out baseline and a KL penalty to an EMA anchor (WARP, stage 1).

Every step, written out in `run_rl` top to bottom (ALGORITHMS.md, section 4):

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
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from posttrain.allocator import retain_freed_memory
from posttrain.chat import ChatFormatError, tokenize_prompt
from posttrain.data import DataError, iter_rows, write_json
from posttrain.losses.policy import Aggregation, kl_regularised_rewards, masked_sum, reinforce_loss, rloo_advantages
from posttrain.modeling import load_causal_lm, load_tokenizer
from posttrain.rollout import DriftMonitor, RolloutConfig, SamplingParams, create_engine, weights_for_engine
from posttrain.scoring import score_completions
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage
from posttrain.stages.sft import LoraSpec, adamw_with_warmup
from posttrain.weights import ema_update_
from rewards.combine import CombinedReward, FaultPolicy, RewardSpec, columns_from_rows

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
                            "groups) accumulated into one update; prompts_per_step must be divisible by it.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights; the output model is merged.")
    checkpoint_every: int = Field(50, ge=0, description="Save a resumable checkpoint every this many steps (0: never).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest this many checkpoints.")
    max_nan_steps: int = Field(3, ge=1, description="A non-finite loss or gradient skips the step; this many in a row stops the run.")
    log_kl_to_start: bool = Field(True, description="Also score samples under the starting model to log the KL to it "
                                  "(one extra forward per step when anchor_ema > 0).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout engine settings, including the "
                                   "logprob drift thresholds (drift_warn_threshold, drift_stop_threshold).")
    report_to: list[str] = Field(default_factory=list, description="Extra trackers: tensorboard, wandb, trackio.")

    @model_validator(mode="after")
    def _check(self):
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("num_generations: the rloo baseline needs at least 2 samples per prompt; "
                             "raise num_generations or set baseline: none")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(f"grad_accum: prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"grad_accum={self.grad_accum} (micro-batches hold whole prompt groups)")
        if not self.rewards:
            raise ValueError("rewards: name at least one reward, e.g. [{name: math, weight: 1.0}]")
        return self


# --- data ---------------------------------------------------------------------------------------

def load_prompts(path: str, tokenizer, max_prompt_tokens: int) -> tuple[list[dict], list[list[int]], int]:
    """(rows, prompt token ids, number dropped as too long). Rows keep every column for the rewards."""
    rows, ids, too_long = [], [], 0
    for where, row in iter_rows(path):
        if "prompt" not in row:
            raise DataError(f"{where}: expected a 'prompt' (text or messages) for RL; the row has {sorted(row)}")
        try:
            prompt_ids = tokenize_prompt(tokenizer, row["prompt"], where=f"{where}: prompt")
        except ChatFormatError as e:
            raise DataError(str(e)) from None
        if len(prompt_ids) > max_prompt_tokens:
            too_long += 1
            continue
        rows.append(row)
        ids.append(prompt_ids)
    if not rows:
        raise DataError(f"{path}: no usable prompt ({too_long} longer than max_prompt_tokens={max_prompt_tokens})")
    if too_long:
        log.warning("%s: dropped %d prompts longer than max_prompt_tokens=%d", path, too_long, max_prompt_tokens)
    return rows, ids, too_long


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


def sampling_seed(seed: int, step: int) -> int:
    """The engine's seed for step `step`. Engines derive per-sample seeds as base + offset, so
    consecutive integers would replay shifted streams; a hash of (seed, step) keeps steps apart."""
    return random.Random(f"rl-sampling:{seed}:{step}").randrange(2**31)


# --- checkpoints --------------------------------------------------------------------------------

def _checkpoint_dirs(stage_dir: Path) -> list[Path]:
    root = stage_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
                  and (p / "state.json").exists())


def save_checkpoint(stage_dir: Path, step: int, policy, anchor, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoints/step_N atomically (temporary directory, then rename); prune old ones."""
    root = stage_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().clone() for k, v in policy.state_dict().items()}, tmp / "policy.pt")
    torch.save({k: v.detach().clone() for k, v in anchor.state_dict().items()}, tmp / "anchor.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
    write_json(tmp / "state.json", {**state, "step": step})  # written last: its presence marks a complete checkpoint
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, policy, anchor, optimizer, scheduler) -> dict:
    policy.load_state_dict(torch.load(path / "policy.pt", weights_only=True))
    anchor.load_state_dict(torch.load(path / "anchor.pt", weights_only=True))
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    return json.loads((path / "state.json").read_text())


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop logged rows of steps after the checkpoint: they are about to be redone."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


# --- evaluation ---------------------------------------------------------------------------------

def evaluate(engine, reward: CombinedReward, rows: list[dict], prompt_ids: list[list[int]], max_new_tokens: int) -> dict:
    """Greedy completions of held-out prompts, scored with the training rewards (e.g. accuracy for math)."""
    groups = engine.generate(prompt_ids, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    texts = [g[0].text for g in groups]
    batch = reward.compute([r["prompt"] for r in rows], texts, columns_from_rows(rows))
    out = {"eval/reward": _mean(batch.rewards)}
    for name, values in batch.per_reward.items():
        out[f"eval/{name}"] = _mean(values)
    return out


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


def _frozen(model):
    model = copy.deepcopy(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@register_stage("rl", RLStageConfig, outputs=("model",))
def run_rl(config: RLStageConfig, ctx: StageContext) -> StageResult:
    """REINFORCE/RLOO with a KL penalty to an EMA anchor (WARP stage 1) on rollout-engine samples."""
    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    retain_freed_memory()  # see posttrain.allocator: steps stop page-faulting their activations
    torch.manual_seed(ctx.seed)
    random.seed(ctx.seed)
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id
    rows, prompt_ids, dropped = load_prompts(config.dataset, tokenizer, config.max_prompt_tokens)
    eval_rows = eval_ids = None
    if config.eval_dataset:
        eval_rows, eval_ids, _ = load_prompts(config.eval_dataset, tokenizer, config.max_prompt_tokens)
        eval_rows, eval_ids = eval_rows[:config.eval_max_prompts], eval_ids[:config.eval_max_prompts]

    # Models: the policy being trained, the anchor (EMA of the policy), the starting model (fixed).
    policy, plain = _build_policy(config)
    policy.train()
    anchor = _frozen(plain)
    start_model = _frozen(plain) if (config.log_kl_to_start and config.anchor_ema > 0) else None
    del plain
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = adamw_with_warmup(params, config.learning_rate, config.weight_decay, config.warmup_steps)

    start_step, nan_streak = 0, 0
    checkpoints = _checkpoint_dirs(stage_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], policy, anchor, optimizer, scheduler)
        start_step, nan_streak = state["step"], state.get("nan_streak", 0)
        _truncate_metrics(stage_dir / "metrics.jsonl", start_step)
        log.info("resuming %s from %s (step %d)", ctx.name, checkpoints[-1], start_step)

    recipe_dir = getattr(ctx, "recipe_dir", None)  # file-path rewards are relative to the recipe
    reward = CombinedReward(config.rewards, config.fault_policy, base_dir=str(recipe_dir) if recipe_dir else None)
    reward.warm_up()  # reward workers start while the engine loads
    engine = create_engine(config.model, config.rollout)
    drift = DriftMonitor.from_config(config.rollout)
    summary: dict[str, Any] = {"prompts_dropped_too_long": dropped}
    try:
        if start_step:
            engine.update_weights(weights_for_engine(policy))
        with ctx.metrics(config.report_to) as metrics, ctx.progress(config.max_steps, "RL steps") as advance:
            advance(start_step)
            if eval_rows and start_step == 0:
                before = evaluate(engine, reward, eval_rows, eval_ids, config.max_new_tokens)
                metrics.log(0, **before)
                summary.update({k + "_before": v for k, v in before.items()})
            for step in range(start_step, config.max_steps):
                record, nan_streak = _rl_step(step, config, ctx, engine, reward, drift, policy, anchor, start_model,
                                              optimizer, scheduler, params, rows, prompt_ids, pad_id, nan_streak)
                record["prompts_dropped_too_long"] = dropped
                if config.eval_every and eval_rows and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
                    record.update(evaluate(engine, reward, eval_rows, eval_ids,
                                           config.max_new_tokens))
                metrics.log(step + 1, **record)
                advance(1)
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.max_steps:
                    save_checkpoint(stage_dir, step + 1, policy, anchor, optimizer, scheduler,
                                    {"nan_streak": nan_streak}, config.keep_checkpoints)
            summary.update({k: v for k, v in record.items() if not k.startswith("time/")} if config.max_steps > start_step else {})
            if eval_rows:
                after = evaluate(engine, reward, eval_rows, eval_ids, config.max_new_tokens)
                metrics.log(config.max_steps, **after)
                summary.update({k + "_after": v for k, v in after.items()})
    finally:
        engine.close()

    out_dir = stage_dir / "model"
    final = policy.merge_and_unload() if config.lora is not None else policy
    final.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return StageResult(outputs={"model": str(out_dir)}, metrics=summary)


def _rl_step(step, config: RLStageConfig, ctx, engine, reward: CombinedReward, drift, policy, anchor, start_model, optimizer, scheduler,
             params, rows, prompt_ids, pad_id, nan_streak) -> tuple[dict, int]:
    """One iteration of the loop; returns (metrics record, updated NaN streak)."""
    n = config.num_generations
    timer = _Timer()

    # 1. Sample: a deterministic batch of prompts, n completions each.
    batch_idx = prompt_indices_for_step(len(rows), step, config.prompts_per_step, ctx.seed)
    batch_rows = [rows[i] for i in batch_idx]
    batch_prompts = [prompt_ids[i] for i in batch_idx]
    # The engine's logprobs feed importance weights (every step) and the drift check (every
    # rollout.drift_check_every steps, from the first); other steps sample without them, which is cheaper.
    check_drift = step % config.rollout.drift_check_every == 0
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                              seed=sampling_seed(ctx.seed, step),
                              logprobs=check_drift or config.importance_clip is not None)
    with timer("generate"):
        groups = engine.generate(batch_prompts, n=n, sampling=sampling)
    completions = [c for group in groups for c in group]
    seq_prompts = [p for p in batch_prompts for _ in range(n)]

    # 2. Reward: every reward function on every completion, combined with the recipe's weights.
    with timer("reward"):
        scored = reward.compute([r["prompt"] for r in batch_rows for _ in range(n)], [c.text for c in completions],
                                columns_from_rows(batch_rows, n))
    # None: the fault policy skipped the sample, or no reward applies to it; it is left out of the update.
    valid = torch.tensor([v is not None for v in scored.rewards])
    rewards = torch.tensor([0.0 if v is None else float(v) for v in scored.rewards], dtype=torch.float32)

    # 3-5. Forward, advantages and loss per micro-batch of whole prompt groups, accumulated.
    optimizer.zero_grad(set_to_none=True)
    lengths = [len(c.token_ids) for c in completions]
    total_tokens = max(1, sum(lengths))
    group_size = config.prompts_per_step // config.grad_accum * n
    stats = _StepStats()
    finite = True
    device = next(policy.parameters()).device
    # Forward passes only; backward runs outside autocast, as torch.autocast prescribes.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    with timer("train"):
        for start in range(0, len(completions), group_size):
            mb = slice(start, start + group_size)
            comp_ids = [c.token_ids for c in completions[mb]]
            score = functools.partial(score_completions, prompt_ids=seq_prompts[mb], completion_ids=comp_ids,
                                      temperature=config.temperature, pad_token_id=pad_id, group_size=n)
            with autocast:
                logp, mask, entropy = score(policy, with_entropy=True)
                with torch.no_grad():
                    logp_anchor, _, _ = score(anchor)
                    logp_start = score(start_model)[0] if start_model is not None else None
            logp_sum, anchor_sum = masked_sum(logp.detach(), mask), masked_sum(logp_anchor, mask)
            r, ok = rewards[mb].to(logp.device), valid[mb].to(logp.device)
            r_beta = kl_regularised_rewards(r, logp_sum, anchor_sum, config.beta)
            if config.baseline == "rloo":
                advantages = rloo_advantages(r_beta.view(-1, n), ok.view(-1, n)).view(-1)
            else:
                advantages = torch.where(ok, r_beta, torch.zeros_like(r_beta))
            old = None
            if config.importance_clip is not None:
                old = _pad_engine_logprobs(completions[mb], mask)
            normalizer = total_tokens if config.loss_aggregation == "token_mean" else len(completions)
            loss = reinforce_loss(logp, advantages, mask, old_logprobs=old, clip=config.importance_clip,
                                  aggregation=config.loss_aggregation, normalizer=normalizer)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            stats.add(loss=loss.item(), kl_anchor=(logp_sum - anchor_sum).tolist(),
                      kl_start=(logp_sum - masked_sum(logp_start, mask)).tolist() if logp_start is not None
                      else (logp_sum - anchor_sum).tolist(),
                      entropy=(entropy.sum().item(), mask.sum().item()), r_beta=r_beta[ok].tolist(),
                      engine_lp=[c.logprobs for c in completions[mb]] if check_drift else [],
                      trainer_lp=[logp[i, :len(c.token_ids)].detach() for i, c in enumerate(completions[mb])]
                      if check_drift else [])
        grad_norm = float("nan")
        if finite:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
            finite = math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    if not finite:
        nan_streak += 1
        log.warning("step %d: non-finite loss or gradient; skipped the update (%d in a row, limit %d)",
                    step + 1, nan_streak, config.max_nan_steps)
        if nan_streak >= config.max_nan_steps:
            raise StageError(f"rl: {nan_streak} steps in a row had a non-finite loss or gradient (max_nan_steps="
                             f"{config.max_nan_steps}); check the rewards for NaN/inf and lower learning_rate")
        return {"skipped_nonfinite": 1, "nan_streak": nan_streak, **_reward_metrics(scored, completions)}, nan_streak
    nan_streak = 0

    # 6. Anchor: EMA of the policy's (LoRA-merged) weights.
    with timer("anchor"):
        ema_update_(anchor, dict(weights_for_engine(policy)), config.anchor_ema)

    # 7. Sync: the engine samples the next batch from the updated policy.
    with timer("sync"):
        engine.update_weights(weights_for_engine(policy))

    drift_metrics = drift.check(stats.engine_lp, stats.trainer_lp, step=step + 1) if check_drift else {}
    record = {
        **_reward_metrics(scored, completions),
        "reward_beta/mean": _mean(stats.r_beta),
        "loss": stats.loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
        "kl_anchor": _mean(stats.kl_anchor), "kl_start": _mean(stats.kl_start),
        "entropy": stats.entropy_sum / max(1.0, stats.entropy_count),
        **drift_metrics, "skipped_nonfinite": 0,
    }
    record.update(timer.report())
    return record, nan_streak


def _reward_metrics(scored, completions) -> dict:
    lengths = [len(c.token_ids) for c in completions]
    out = {"reward/mean": _mean(scored.rewards), "reward/std": _std(scored.rewards), "reward/skipped": sum(scored.skipped),
           "completion_length": sum(lengths) / len(lengths),
           "truncation_rate": sum(c.finish_reason == "length" for c in completions) / len(completions)}
    for name, values in scored.per_reward.items():
        out[f"reward/{name}/mean"] = _mean(values)
        out[f"reward/{name}/std"] = _std(values)
    for name, count in scored.faults.items():
        out[f"reward/{name}/faults"] = count
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
        self.entropy_sum = self.entropy_count = 0.0
        self.engine_lp, self.trainer_lp = [], []

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
