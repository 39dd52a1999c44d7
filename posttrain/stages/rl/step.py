"""What one step of the `rl` stage works with, whichever the algorithm: its state, its prompts,
its micro-batches, its update and its metrics.

`Learner` is the trainer side (config, session, the policy, anchor and start model, pad id): all
that a gradient pass needs, so the passes can be driven on fixed completions (as the data-parallel
tests do). `StepState` adds the rollout side (engine, rewards, drift monitor, prompt rows, seed)
and the NaN streak that carries from step to step.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.modeling import output_rows
from posttrain.rollout import DriftMonitor, SamplingParams, weights_for_engine
from posttrain.rollout.weights import peft_model_of
from posttrain.scoring import score_completions
from posttrain.stages.base import StageError
from posttrain.stages.rl.config import RLStageConfig
from posttrain.training import StepResult, TrainingSession, token_budget_batches
from posttrain.weights import ema_update_
from rewards.combine import CombinedReward, RewardBatch, columns_from_rows, dataset_columns

log = logging.getLogger(__name__)


@dataclass
class Learner:
    """The trainer side of a step: the models and how they are scored and updated."""

    config: RLStageConfig
    session: TrainingSession
    policy: torch.nn.Module
    anchor: torch.nn.Module
    start_model: torch.nn.Module | None  # None: the KL to the start model is the KL to the anchor
    pad_id: int

    @property
    def chunk_size(self) -> int | None:
        """logprob_chunk_size with "auto" resolved for the policy's vocabulary."""
        vocabulary = output_rows(self.policy)
        return resolve_chunk_size(self.config.logprob_chunk_size, vocabulary)

    def scorer(self, prompt_ids: list[list[int]], completions, group_size: int):
        """`score_completions` bound to these rows: call it with a model (and with_entropy).

        Rows come in runs of `group_size` sharing a prompt, which then runs once for them; gradient
        checkpointing drops the key/value cache that layout reuses, so rows are scored flat then."""
        return functools.partial(score_completions, prompt_ids=prompt_ids,
                                 completion_ids=[c.token_ids for c in completions],
                                 temperature=self.config.temperature, pad_token_id=self.pad_id,
                                 group_size=1 if self.config.gradient_checkpointing else group_size,
                                 chunk_size=self.chunk_size)

    def micro_batches(self, sizes: list[int], group_size: int) -> list[slice]:
        """Slices of the rows (`sizes`: tokens each) into micro-batches of whole prompt groups: by
        max_tokens_per_microbatch when set, else grad_accum micro-batches (at least one prompt each)."""
        if self.config.max_tokens_per_microbatch is not None:
            return token_budget_batches(sizes, self.config.max_tokens_per_microbatch, group_size=group_size)
        prompts = len(sizes) // group_size
        per_micro_batch = max(1, prompts // self.config.grad_accum) * group_size
        return [slice(s, s + per_micro_batch) for s in range(0, len(sizes), per_micro_batch)]

    def update_anchor(self) -> None:
        """theta_anchor <- (1 - mu) theta_anchor + mu theta, on the policy's (LoRA-merged) weights. The
        update was the same on every rank, so every rank's anchor stays identical without communication.
        Under fsdp the anchor is sharded like the policy and each rank averages its own shards.
        A full-parameter policy is averaged from its parameters as they are (its shards under fsdp,
        no gather); a peft policy from its LoRA-merged weights."""
        source = self.policy if peft_model_of(self.policy) is None else weights_for_engine(self.policy)
        ema_update_(self.anchor, source, self.config.anchor_ema)


@dataclass
class StepState:
    """Everything a step of the loop reads, and the NaN streak it updates."""

    learner: Learner
    engine: Any  # the rollout engine holding the policy (posttrain.rollout.RolloutEngine)
    reward: CombinedReward
    drift: DriftMonitor
    rows: list[dict]
    prompt_ids: list[list[int]]
    seed: int
    nan_streak: int = 0
    # The reward columns of the whole prompt set: each step's rewards see every one of them (see
    # rewards.combine.columns_from_rows), also when the step drew no row of some task of a mix.
    columns: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.columns:
            self.columns = dataset_columns(self.rows)

    @property
    def config(self) -> RLStageConfig:
        return self.learner.config

    @property
    def session(self) -> TrainingSession:
        return self.learner.session


class RLAlgorithm:
    """One algorithm of the stage. The loop builds it once (`ALGORITHMS[config.algorithm](state)`),
    calls `resume` after a resume, looks `step` up on it for every step, adds `summary()` to the
    stage's metrics and calls `close` at the end, also after a failure."""

    def __init__(self, state: StepState):
        del state  # what the algorithm keeps beyond the step state (a second engine, counts)

    def step(self, state: StepState, step: int) -> dict:
        """One iteration on this rank's share of step `step` (0-based); returns its metrics record."""
        raise NotImplementedError

    def resume(self, state: StepState) -> None:
        """After a resume: restore what the algorithm holds beyond the models (the loop pushes the
        policy's weights to the engine itself)."""

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        """Release what the algorithm started."""


@dataclass
class StepPrompts:
    """This rank's prompts of one step, and how they are sampled."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    check_drift: bool
    sampling: SamplingParams


@dataclass
class StepStats:
    """What every algorithm's gradient pass accumulates over its micro-batches, for the metrics."""

    loss: float = 0.0
    kl_anchor: list = field(default_factory=list)  # per sample: log pi(y) - log pi_anchor(y)
    kl_start: list = field(default_factory=list)  # per sample: log pi(y) - log pi_start(y)
    # Per sample, the non-negative k3 estimates of the same two KLs (what TRL logs as the KL).
    kl_anchor_k3: list = field(default_factory=list)
    kl_start_k3: list = field(default_factory=list)
    entropy_sum: float = 0.0
    entropy_count: float = 0.0
    engine_lp: list = field(default_factory=list)  # for the drift check: the engine's and the
    trainer_lp: list = field(default_factory=list)  # trainer's per-token logprobs of the same samples
    micro_batches: int = 0


# --- data order and seeds -----------------------------------------------------------------------

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


def step_prompts(state: StepState, step: int) -> StepPrompts:
    """This rank's prompts of step `step`, whether the step checks drift, and its sampling.

    The step's prompts are a function of (seed, step) and each rank takes its share. The engine's
    logprobs feed importance weights (every step) and the drift check (every
    rollout.drift_check_every steps, from the first); other steps sample without them, which is cheaper.
    """
    config, session = state.config, state.session
    batch_idx = session.shard(prompt_indices_for_step(len(state.rows), step, config.prompts_per_step, state.seed),
                              "prompts_per_step")
    check_drift = step % config.rollout.drift_check_every == 0
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                              seed=sampling_seed(state.seed, step, session.rank),
                              logprobs=check_drift or config.importance_clip is not None)
    return StepPrompts([state.rows[i] for i in batch_idx], [state.prompt_ids[i] for i in batch_idx], check_drift,
                       sampling)


def compute_rewards(state: StepState, batch: StepPrompts, completions, per_prompt: int) -> RewardBatch:
    """Every reward function on every completion (`per_prompt` consecutive ones per prompt of the
    batch), combined with the recipe's weights."""
    return state.reward.compute([r["prompt"] for r in batch.rows for _ in range(per_prompt)],
                                [c.text for c in completions], columns_from_rows(batch.rows, per_prompt, keys=state.columns),
                                completion_ids=[c.token_ids for c in completions])


# --- the update ---------------------------------------------------------------------------------

def optimizer_step(state: StepState, finite: bool) -> StepResult | None:
    """Step the optimizer unless some rank's loss was non-finite (then every rank skips: the
    gradient all-reduce in step() is collective). None: skipped."""
    session = state.session
    finite = session.all_sum(0.0 if finite else 1.0) == 0
    if not finite:
        session.zero_grad()
        return None
    return session.step(state.config.max_grad_norm)


def count_skipped_step(state: StepState, result: StepResult | None, step: int) -> bool:
    """Whether the step's update was skipped for a non-finite loss or gradient; counts it in the
    streak, which stops the run at max_nan_steps in a row, or resets the streak."""
    if result is not None and result.finite:
        state.nan_streak = 0
        return False
    config = state.config
    state.nan_streak += 1
    log.warning("step %d: non-finite loss or gradient; skipped the update (%d in a row, limit %d)",
                step + 1, state.nan_streak, config.max_nan_steps)
    if state.nan_streak >= config.max_nan_steps:
        raise StageError(f"rl: {state.nan_streak} steps in a row had a non-finite loss or gradient (max_nan_steps="
                         f"{config.max_nan_steps}); check the rewards for NaN/inf and lower learning_rate")
    return True


def engine_logprobs(completions, mask: torch.Tensor) -> torch.Tensor:
    """The engine's logprobs of the completions, padded like `mask` (for importance weights)."""
    old = torch.zeros_like(mask)
    for i, c in enumerate(completions):
        if len(c.logprobs) != len(c.token_ids):
            raise StageError(f"importance_clip: the engine returned {len(c.logprobs)} logprobs for a completion of "
                             f"{len(c.token_ids)} tokens; importance weights need one per sampled token")
        old[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=old.dtype)
    return old


# --- metrics ------------------------------------------------------------------------------------

def mean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def std(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return 0.0
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def reward_metrics(session: TrainingSession, scored: RewardBatch, completions) -> dict:
    """Reward, length and fault metrics over the whole step (every rank's samples)."""
    local = {"rewards": list(scored.rewards), "skipped": sum(scored.skipped),
             "lengths": [len(c.token_ids) for c in completions],
             "truncated": [c.finish_reason == "length" for c in completions],
             "per_reward": {k: list(v) for k, v in scored.per_reward.items()}, "faults": dict(scored.faults)}
    everyone = session.gather_lists([local])
    rewards = [v for part in everyone for v in part["rewards"]]
    lengths = [v for part in everyone for v in part["lengths"]]
    truncated = [v for part in everyone for v in part["truncated"]]
    out = {"reward/mean": mean(rewards), "reward/std": std(rewards),
           "reward/skipped": sum(part["skipped"] for part in everyone),
           "completion_length": sum(lengths) / max(1, len(lengths)),
           "truncation_rate": sum(truncated) / max(1, len(truncated))}
    for name in sorted({k for part in everyone for k in part["per_reward"]}):
        values = [v for part in everyone for v in part["per_reward"].get(name, [])]
        out[f"reward/{name}/mean"] = mean(values)
        out[f"reward/{name}/std"] = std(values)
    for name in sorted({k for part in everyone for k in part["faults"]}):
        out[f"reward/{name}/faults"] = sum(part["faults"].get(name, 0) for part in everyone)
    return out


def update_metrics(state: StepState, stats: StepStats, result: StepResult) -> dict:
    """The metrics every algorithm logs about its update: loss, gradient, KLs, entropy, micro-batches."""
    session = state.session
    return {"loss": session.all_sum(stats.loss), "grad_norm": result.grad_norm, "lr": session.learning_rate,
            "kl_anchor": mean(session.gather_lists(stats.kl_anchor)),
            "kl_start": mean(session.gather_lists(stats.kl_start)),
            "kl_anchor_k3": mean(session.gather_lists(stats.kl_anchor_k3)),
            "kl_start_k3": mean(session.gather_lists(stats.kl_start_k3)),
            "entropy": session.all_sum(stats.entropy_sum) / max(1.0, session.all_sum(stats.entropy_count))}


class StepTimer:
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
