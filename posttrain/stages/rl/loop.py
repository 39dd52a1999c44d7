"""The `rl` stage's loop, whichever the algorithm: set up, resume, step, evaluate, checkpoint, save.

All log-probabilities are taken at the sampling temperature T (log_softmax(logits / T)), the
convention of the rollout engines, so trainer and engine score the same distribution.
Checkpoints (policy, anchor, optimizer, RNG states, step, NaN streak) go to `checkpoints/` in the
stage directory; re-running the stage there resumes from the newest one with the same data order,
because the prompts of step s and its sampling seed are functions of (seed, s) only.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.allocator import retain_freed_memory
from posttrain.data import load_prompts
from posttrain.evaluation import evaluate_with_rewards
from posttrain.images import prompt_has_images
from posttrain.modeling import load_causal_lm, load_processor, load_tokenizer
from posttrain.rollout import DriftMonitor, create_engine, sync_weights
from posttrain.stages.base import StageContext, StageResult
from posttrain.stages.rl.bond import Bond
from posttrain.stages.rl.config import RLStageConfig
from posttrain.stages.rl.rloo import RLOO
from posttrain.stages.rl.step import Learner, RLAlgorithm, StepState
from posttrain.training import TrainingSession, checkpoint_due, resume_latest, save_checkpoint
from rewards.combine import CombinedReward

log = logging.getLogger(__name__)

# The algorithm of each `algorithm:` value; the loop looks every step up on its object (see RLAlgorithm).
ALGORITHMS = {"rloo": RLOO, "jbond": Bond, "bond": Bond}


@dataclass
class RLRun:
    """A set-up run: the step state, the tokenizer to save with the model, the held-out prompts
    (None without eval_dataset), the count of prompts dropped as too long, and the first step."""

    state: StepState
    tokenizer: Any
    eval_rows: list[dict] | None
    eval_ids: list[list[int]] | None
    dropped: int
    start_step: int


def run_rl(config: RLStageConfig, ctx: StageContext) -> StageResult:
    """REINFORCE/RLOO with a KL penalty to an EMA anchor (WARP stage 1) on rollout-engine samples."""
    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    run = setup_run(config, ctx)
    state, algorithm = run.state, None
    try:
        algorithm = ALGORITHMS[config.algorithm](state)
        if run.start_step:
            sync_weights(state.engine, state.learner.policy)
            algorithm.resume(state)
        summary = train(run, algorithm, ctx)
    finally:
        if algorithm is not None:
            algorithm.close()
        state.engine.close()

    out_dir = stage_dir / "model"
    session = state.session
    session.save_output_model(state.learner.policy, run.tokenizer, out_dir)
    session.close()
    return StageResult(outputs={"model": str(out_dir)}, metrics=summary)


def _build_policy(config: RLStageConfig):
    """(the policy to train, a plain copy of the starting weights for the anchor and start model)."""
    base = load_causal_lm(config.model)
    if config.lora is None:
        return base, base
    from peft import get_peft_model

    plain_copy = copy.deepcopy(base)  # the anchor lives in merged-weight space, outside peft
    return get_peft_model(base, config.lora.to_peft_config(base)), plain_copy


def setup_run(config: RLStageConfig, ctx: StageContext) -> RLRun:
    """Data, models (policy, EMA anchor, fixed start model), optimizer, the newest checkpoint if
    there is one, rewards and the rollout engine, in that order (the RNG states a checkpoint
    restores come before anything that draws from them)."""
    stage_dir = Path(ctx.stage_dir)
    retain_freed_memory()  # see posttrain.allocator: steps stop page-faulting their activations
    torch.manual_seed(ctx.seed)
    random.seed(ctx.seed)
    session = TrainingSession(config.precision, ctx.seed, config.sharding, config.fsdp_offload)
    session.shard(range(config.prompts_per_step), "prompts_per_step")  # fails early unless it splits over the ranks
    tokenizer = load_tokenizer(config.model)
    processor = load_processor(config.model)  # a composite model's: prompts with images (None: text only)
    rows, prompt_ids, dropped = load_prompts(config.dataset, tokenizer, config.max_prompt_tokens, processor=processor)
    eval_rows = eval_ids = None
    if config.eval_dataset:
        eval_rows, eval_ids, _ = load_prompts(config.eval_dataset, tokenizer, config.max_prompt_tokens,
                                              processor=processor)
        eval_rows, eval_ids = eval_rows[:config.eval_max_prompts], eval_ids[:config.eval_max_prompts]

    # Models: the policy being trained, the anchor (EMA of the policy), the starting model (fixed).
    policy, plain = _build_policy(config)
    # Under fsdp (placement 'accelerator') both are sharded like the policy.
    anchor = session.place_frozen(copy.deepcopy(plain), config.anchor_placement, "anchor_placement")
    start_model = (session.place_frozen(copy.deepcopy(plain), config.anchor_placement, "anchor_placement")
                   if (config.log_kl_to_start and config.anchor_ema > 0) else None)
    del plain
    policy = session.prepare(policy, config.learning_rate, config.weight_decay, config.warmup_steps,
                             gradient_checkpointing=config.gradient_checkpointing,
                             shard_optimizer=config.shard_optimizer)
    resumed = resume_latest(session, stage_dir, {"policy": policy, "anchor": anchor}, stage_dir / "metrics.jsonl")
    if resumed["path"] is not None:
        log.info("resuming %s from %s (step %d)", ctx.name, resumed["path"], resumed["step"])

    recipe_dir = getattr(ctx, "recipe_dir", None)  # file-path rewards are relative to the recipe
    reward = CombinedReward(config.rewards, config.fault_policy, base_dir=str(recipe_dir) if recipe_dir else None)
    reward.warm_up()  # reward workers start while the engine loads
    images = any(prompt_has_images(p) for p in [*prompt_ids, *(eval_ids or [])])
    engine = create_engine(config.model, config.rollout, device=session.device, images=images)
    learner = Learner(config, session, policy, anchor, start_model, tokenizer.pad_token_id)
    state = StepState(learner, engine, reward, DriftMonitor.from_config(config.rollout), rows, prompt_ids, ctx.seed,
                      nan_streak=resumed.get("nan_streak", 0))
    return RLRun(state, tokenizer, eval_rows, eval_ids, dropped, resumed["step"])


def _evaluate(run: RLRun) -> dict:
    state = run.state
    return evaluate_with_rewards(state.engine, state.reward, run.eval_rows, run.eval_ids, state.config.max_new_tokens,
                                 state.session, columns=state.columns)


def train(run: RLRun, algorithm: RLAlgorithm, ctx: StageContext) -> dict:
    """Steps start_step..max_steps of `algorithm`, with the held-out evaluations and checkpoints;
    returns the stage's summary metrics."""
    state, config, session = run.state, run.state.config, run.state.session
    models = {"policy": state.learner.policy, "anchor": state.learner.anchor}
    summary: dict[str, Any] = {"prompts_dropped_too_long": run.dropped,
                               **session.describe(config.prompts_per_step * config.completions_per_prompt, "sequences")}
    record: dict[str, Any] = {}
    with ctx.metrics(config.report_to) as metrics, ctx.progress(config.max_steps, "RL steps") as advance:
        advance(run.start_step)
        if run.eval_rows and run.start_step == 0:
            before = _evaluate(run)
            metrics.log(0, **before)
            summary.update({k + "_before": v for k, v in before.items()})
        for step in range(run.start_step, config.max_steps):
            record = algorithm.step(state, step)
            record["prompts_dropped_too_long"] = run.dropped
            if (config.eval_every and run.eval_rows and (step + 1) % config.eval_every == 0
                    and step + 1 < config.max_steps):  # the last step's evaluation is the one after training
                record.update(_evaluate(run))
            metrics.log(step + 1, **record)
            advance(1)
            if checkpoint_due(step + 1, config.checkpoint_every, config.max_steps):
                save_checkpoint(session, Path(ctx.stage_dir), step + 1, models, {"nan_streak": state.nan_streak},
                                config.keep_checkpoints)
        if config.max_steps > run.start_step:
            summary.update({k: v for k, v in record.items() if not k.startswith("time/")})
        summary.update(algorithm.summary())
        if run.eval_rows:
            after = _evaluate(run)
            metrics.log(config.max_steps, **after)
            summary.update({k + "_after": v for k, v in after.items()})
    return summary
