"""REINFORCE with a leave-one-out baseline and a KL penalty to an EMA anchor (WARP, stage 1;
docs/algorithms.md#rloo): `algorithm: rloo`.

One step, on this rank's share of the step's prompts (`RLOO.step`, top to bottom):

    1. sample      a batch of prompts; n completions each from the rollout engine (temperature T)
    2. reward      r(x, y): the recipe's rewards, combined with weights (rewards.combine)
    3. forward     log pi(y|x) with gradient; log pi_anchor(y|x) without (posttrain.scoring: each
                   prompt runs once for its n samples)
    4. advantage   r_beta = r - beta * log(pi / pi_anchor);  A = r_beta - mean of the other n-1 samples
    5. loss        -A * log pi(y|x) (optionally importance-weighted against the engine), backward, step
    6. anchor      theta_anchor <- (1 - mu) * theta_anchor + mu * theta
    7. sync        push the new weights to the engine

Steps 3-5 are `policy_gradient_pass`, which runs on fixed completions as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.losses.policy import k3_kl, kl_regularised_rewards, masked_sum, reinforce_loss, rloo_advantages
from posttrain.rollout import sync_weights
from posttrain.stages.rl.step import (Learner, RLAlgorithm, StepState, StepStats, StepTimer, compute_rewards,
                                      count_skipped_step, engine_logprobs, mean, optimizer_step, reward_metrics,
                                      step_prompts, update_metrics)
from posttrain.training import engine_asleep


class RLOO(RLAlgorithm):
    """algorithm: rloo, sampling from the policy's engine only."""

    def step(self, state: StepState, step: int) -> dict:
        """One iteration on this rank's share of step `step`; returns its metrics record."""
        config, session, learner = state.config, state.session, state.learner
        n = config.num_generations
        timer = StepTimer()

        # 1. Sample: this rank's share of the step's prompts, n completions each on its own engine.
        batch = step_prompts(state, step)
        with timer("generate"):
            groups = state.engine.generate(batch.prompt_ids, n=n, sampling=batch.sampling)
        completions = [c for group in groups for c in group]

        # 2. Reward: every reward function on every completion, combined with the recipe's weights.
        with timer("reward"):
            scored = compute_rewards(state, batch, completions, n)

        # 3-5. Forward, advantages, loss and backward; the engine sleeps meanwhile when asked to.
        with timer("train"), engine_asleep(state.engine, config.rollout.enable_sleep_mode):
            stats, finite = policy_gradient_pass(learner, batch.prompt_ids, completions, scored.rewards,
                                                 keep_logprobs=batch.check_drift)
            result = optimizer_step(state, finite)
        rewards = reward_metrics(session, scored, completions)
        if count_skipped_step(state, result, step):
            return {"skipped_nonfinite": 1, "nan_streak": state.nan_streak, **rewards}

        # 6. Anchor: EMA of the policy's weights.
        with timer("anchor"):
            learner.update_anchor()

        # 7. Sync: the engine samples the next batch from the updated policy.
        with timer("sync"):
            sync_weights(state.engine, learner.policy)

        drift = state.drift.check(stats.engine_lp, stats.trainer_lp, step=step + 1) if batch.check_drift else {}
        return {**rewards, "reward_beta/mean": mean(session.gather_lists(stats.r_beta)),
                **update_metrics(state, stats, result), "micro_batches": stats.micro_batches, **drift,
                "skipped_nonfinite": 0, **timer.report()}


@dataclass
class RLOOStats(StepStats):
    """A step's statistics, accumulated over its micro-batches."""

    r_beta: list = field(default_factory=list)


def policy_gradient_pass(learner: Learner, prompt_ids: list[list[int]], completions, rewards: list,
                         keep_logprobs: bool = False) -> tuple[RLOOStats, bool]:
    """Steps 3-5 on this rank's completions (n per prompt, in prompt order): score them under the
    policy (with gradient), the anchor and the start model, form r_beta and RLOO advantages, and
    accumulate the gradient of this rank's share of the global loss. Returns the step's statistics
    and whether every loss was finite.

    The loss is normalised by the *global* token count (token_mean) or sequence count, so summing
    the ranks' gradients (TrainingSession.step) gives exactly the single-process gradient.
    """
    config, session = learner.config, learner.session
    n = config.num_generations
    # None: the fault policy skipped the sample, or no reward applies to it; it is left out of the update.
    valid = torch.tensor([v is not None for v in rewards])
    reward_t = torch.tensor([0.0 if v is None else float(v) for v in rewards], dtype=torch.float32)
    seq_prompts = [p for p in prompt_ids for _ in range(n)]
    if config.loss_aggregation == "token_mean":
        normalizer = max(1.0, session.all_sum(sum(len(c.token_ids) for c in completions)))
    else:
        normalizer = session.all_sum(len(completions))
    micro = learner.micro_batches([len(p) + len(c.token_ids) for p, c in zip(seq_prompts, completions)], n)
    stats = RLOOStats(micro_batches=len(micro))
    finite = True
    for mb, real in session.even_micro_batches(micro):  # fsdp: as many passes on every rank
        score = learner.scorer(seq_prompts[mb], completions[mb], n)
        with session.autocast():
            logp, mask, entropy = score(learner.policy, with_entropy=True)
            with torch.no_grad():
                logp_anchor = score(learner.anchor)[0].to(logp.device)
                logp_start = score(learner.start_model)[0].to(logp.device) if learner.start_model is not None else None
        logp_sum, anchor_sum = masked_sum(logp.detach(), mask), masked_sum(logp_anchor, mask)
        start_sum = masked_sum(logp_start, mask) if logp_start is not None else anchor_sum
        r, ok = reward_t[mb].to(logp.device), valid[mb].to(logp.device)
        r_beta = kl_regularised_rewards(r, logp_sum, anchor_sum, config.beta)
        if config.baseline == "rloo":
            advantages = rloo_advantages(r_beta.view(-1, n), ok.view(-1, n)).view(-1)
        else:
            advantages = torch.where(ok, r_beta, torch.zeros_like(r_beta))
        old = engine_logprobs(completions[mb], mask) if config.importance_clip is not None else None
        loss = reinforce_loss(logp, advantages, mask, old_logprobs=old, clip=config.importance_clip,
                              aggregation=config.loss_aggregation, normalizer=normalizer)
        if not real:
            (loss * 0.0).backward()  # a repeat that keeps a sharded model's collectives in step
            continue
        if not torch.isfinite(loss):
            finite = False
            if not session.fsdp:
                return stats, False
            # Under fsdp the other ranks still run their passes; this one runs its own (the step is
            # skipped on every rank by the all-reduced flag).
        loss.backward()
        stats.loss += loss.item()
        stats.kl_anchor += (logp_sum - anchor_sum).tolist()
        stats.kl_start += (logp_sum - start_sum).tolist()
        stats.kl_anchor_k3 += k3_kl(logp.detach(), logp_anchor, mask).tolist()
        stats.kl_start_k3 += k3_kl(logp.detach(), logp_anchor if logp_start is None else logp_start, mask).tolist()
        stats.r_beta += r_beta[ok].tolist()
        stats.entropy_sum += entropy.sum().item()
        stats.entropy_count += mask.sum().item()
        if keep_logprobs:
            stats.engine_lp += [c.logprobs for c in completions[mb]]
            stats.trainer_lp += [logp[i, :len(c.token_ids)].detach().cpu() for i, c in enumerate(completions[mb])]
    return stats, finite


__all__ = ["RLOO", "RLOOStats", "policy_gradient_pass"]
