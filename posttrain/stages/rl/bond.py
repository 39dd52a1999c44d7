"""J-BOND and BOND (Sessa et al. 2024; docs/algorithms.md#bond): `algorithm: jbond | bond`.

The policy is distilled towards the best-of-N distribution of an EMA anchor by minimising the
Jeffreys divergence, (1 - jeffreys_beta) * forward KL + jeffreys_beta * backward KL. The pure
losses and rewards live in `posttrain.losses.bond`; this module runs them on rollouts.

One step, on this rank's prompts (`Bond.step`, top to bottom):

    1. sample      one completion per prompt from the policy; k from the EMA anchor (jbond: 2, bond: N)
    2. reward      all 1 + k completions of a prompt in one reward call
    3. score       without gradient: log pi, log pi_anchor (and log pi_start) of the policy sample,
                   its backward reward R = r_J - log(pi/pi_anchor) (bond: log p_le - log(pi/pi_anchor)/(N-1))
                   and the leave-one-out baseline over the whole batch (a sum over every rank)
    4. loss        (1 - jeffreys_beta) * NLL(best anchor sample) + jeffreys_beta * -(R - b) * log pi(y)
                   (+ kl_gamma * KL), one pass with gradient over [policy sample, best anchor sample]
    5. anchor      theta_anchor <- (1 - eta) * theta_anchor + eta * theta, as for rloo
    6. sync        the policy's weights to its engine (and the anchor's to the anchor's engine)

Scoring the policy sample twice (3 without gradient, 4 with) is what makes the baseline exact:
it is the mean R of the *other* batch items, so every R must be known before the first backward,
and under a token budget or data parallelism those items sit in other micro-batches and ranks.
Steps 3-4 are `bond_gradient_pass`, which runs on fixed completions as well.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from posttrain.images import prompt_has_images
from posttrain.losses.bond import (backward_rewards, better_sample_index, forward_nll_loss, jbond_rewards,
                                   jeffreys_loss, leave_one_out_advantages, log_quantile_rewards, ties)
from posttrain.losses.policy import k3_kl, masked_sum, reinforce_loss
from posttrain.rollout import SamplingParams, create_engine, sync_weights
from posttrain.stages.rl.config import RLStageConfig
from posttrain.stages.rl.step import (Learner, RLAlgorithm, StepState, StepStats, StepTimer, compute_rewards,
                                      count_skipped_step, engine_logprobs, mean, optimizer_step, reward_metrics,
                                      step_prompts, update_metrics)
from posttrain.training import engine_asleep
from rewards.combine import RewardBatch


class AnchorRollouts:
    """Samples of the EMA anchor, on the policy's engine (anchor_rollout: swap) or on an engine of its own.

    The anchor changes after every step (EMA), so either way a step pushes two weight sets (swap:
    anchor in, policy back; engine: policy to one engine, anchor to the other) and generates the
    same samples; a second engine adds its start-up and a second copy of weights and KV cache.
    Measured with bench/bench_bond.py --parts anchor (numbers in the README's BOND section), swap
    is the default.
    """

    def __init__(self, config: RLStageConfig, engine, device, images: bool = False):
        self.swap = config.bond.anchor_rollout == "swap"
        self.engine = engine if self.swap else create_engine(config.model, config.rollout, device=device,
                                                             images=images)

    def resume(self, anchor) -> None:
        """After a resume the engines were built from the starting weights; a second engine takes the anchor's."""
        if not self.swap:
            sync_weights(self.engine, anchor)

    def generate(self, anchor, prompts, n: int, sampling: SamplingParams):
        if self.swap:
            sync_weights(self.engine, anchor)
        return self.engine.generate(prompts, n=n, sampling=sampling)

    def sync(self, policy_engine, policy, anchor) -> None:
        """After the step: the policy engine gets the new policy; a second engine the new anchor."""
        sync_weights(policy_engine, policy)
        if not self.swap:
            sync_weights(self.engine, anchor)

    def close(self) -> None:
        if not self.swap:
            self.engine.close()


def anchor_sampling_seed(seed: int, step: int, rank: int = 0) -> int:
    """The anchor's sampling seed for a step and rank, apart from the policy's (step.sampling_seed)."""
    return random.Random(f"rl-anchor-sampling:{seed}:{step}:{rank}").randrange(2**31)


@dataclass
class BondBatch:
    """This rank's rollouts of one step: per prompt one policy sample and k anchor samples, and the
    rewards of all of them, flat in the order [policy sample, k anchor samples] per prompt."""

    prompt_ids: list[list[int]]
    policy_samples: list
    anchor_groups: list[list]
    rewards: list


@dataclass
class BondStats(StepStats):
    """A J-BOND / BOND step's statistics, over its micro-batches."""

    forward: float = 0.0
    backward: float = 0.0
    kl_term: float = 0.0
    backward_reward: list = field(default_factory=list)
    ties: float = 0.0
    prompts: float = 0.0


class Bond(RLAlgorithm):
    """algorithm: jbond or bond; the anchor samples on the policy's engine or on one of its own."""

    def __init__(self, state: StepState):
        # A second engine for the anchor is chosen as the policy's was, with the image prompts in view.
        images = any(prompt_has_images(p) for p in state.prompt_ids)
        self.rollouts = AnchorRollouts(state.config, state.engine, state.session.device, images)
        self.tie_steps: list[float] = []

    def resume(self, state: StepState) -> None:
        self.rollouts.resume(state.learner.anchor)

    def step(self, state: StepState, step: int) -> dict:
        """One J-BOND / BOND iteration on this rank's share of step `step`; returns its metrics record."""
        config, session, learner = state.config, state.session, state.learner
        k = config.anchor_samples
        timer = StepTimer()

        # 1. Sample: one policy completion per prompt (the engine holds the policy), then k anchor completions.
        batch = step_prompts(state, step)
        with timer("generate"):
            policy_samples = [g[0] for g in state.engine.generate(batch.prompt_ids, n=1, sampling=batch.sampling)]
        with timer("generate_anchor"):
            anchor_sampling = batch.sampling.model_copy(
                update={"seed": anchor_sampling_seed(state.seed, step, session.rank), "logprobs": False})
            anchor_groups = self.rollouts.generate(learner.anchor, batch.prompt_ids, k, anchor_sampling)

        # 2. Reward: per prompt [policy sample, anchor samples...], one call.
        with timer("reward"):
            samples = [c for p, group in zip(policy_samples, anchor_groups) for c in [p, *group]]
            scored = compute_rewards(state, batch, samples, 1 + k)

        # 3-4. Score, losses, backward; the engine sleeps meanwhile when asked to.
        with timer("train"), engine_asleep(state.engine, config.rollout.enable_sleep_mode):
            stats, finite = bond_gradient_pass(
                learner, BondBatch(batch.prompt_ids, policy_samples, anchor_groups, scored.rewards),
                keep_logprobs=batch.check_drift)
            result = optimizer_step(state, finite)
        rewards = reward_metrics(session, _policy_part(scored, 1 + k), policy_samples)
        tie_fraction = session.all_sum(stats.ties) / max(1.0, session.all_sum(stats.prompts))
        tie_metrics = {"ties/prompt_fraction": tie_fraction, "ties/step": float(tie_fraction > 0)}
        self.tie_steps.append(tie_metrics["ties/step"])
        if count_skipped_step(state, result, step):
            if self.rollouts.swap:  # the engine holds the anchor's weights; the next samples are the policy's
                sync_weights(state.engine, learner.policy)
            return {"skipped_nonfinite": 1, "nan_streak": state.nan_streak, **tie_metrics, **rewards}

        # 5. Anchor EMA (identical on every rank, as for rloo), then 6. both weight sets to their engines.
        with timer("anchor"):
            learner.update_anchor()
        with timer("sync"):
            self.rollouts.sync(state.engine, learner.policy, learner.anchor)

        drift = state.drift.check(stats.engine_lp, stats.trainer_lp, step=step + 1) if batch.check_drift else {}
        anchor_rewards = [v for i, v in enumerate(scored.rewards) if i % (1 + k)]
        update = update_metrics(state, stats, result)
        record = {**rewards, "reward_anchor/mean": mean(session.gather_lists(anchor_rewards)),
                  "backward_reward/mean": mean(session.gather_lists(stats.backward_reward)),
                  "loss": update.pop("loss"), "loss/forward": session.all_sum(stats.forward),
                  "loss/backward": session.all_sum(stats.backward), **update, **tie_metrics,
                  "micro_batches": stats.micro_batches, **drift, "skipped_nonfinite": 0}
        if config.bond.kl_gamma:
            record["loss/kl"] = session.all_sum(stats.kl_term)
        return {**record, **timer.report()}

    def summary(self) -> dict:
        """The share of this run's steps where the tie rule decided something."""
        return {"ties/step_fraction": sum(self.tie_steps) / len(self.tie_steps)} if self.tie_steps else {}

    def close(self) -> None:
        self.rollouts.close()


def _policy_part(scored: RewardBatch, per_prompt: int) -> RewardBatch:
    """The reward batch restricted to the policy samples (the first of every prompt's completions)."""
    keep = range(0, len(scored.rewards), per_prompt)
    return RewardBatch(rewards=[scored.rewards[i] for i in keep], skipped=[scored.skipped[i] for i in keep],
                       per_reward={name: [v[i] for i in keep] for name, v in scored.per_reward.items()},
                       faults=scored.faults)


def bond_gradient_pass(learner: Learner, batch: BondBatch, keep_logprobs: bool = False) -> tuple[BondStats, bool]:
    """Steps 3-4 of J-BOND / BOND on this rank's prompts: accumulate the gradient of this rank's share
    of (1 - jeffreys_beta) * forward + jeffreys_beta * backward (+ kl_gamma * KL).

    A None reward anywhere in a prompt's group (a skipped reward) leaves the whole prompt out. Every
    normaliser (token or sequence counts, the baseline's sum and count) is summed over the ranks, so
    the ranks' gradients add up to the single-process one.
    """
    config, session = learner.config, learner.session
    k = config.anchor_samples
    num = len(batch.prompt_ids)
    rewards = batch.rewards
    valid = torch.tensor([all(v is not None for v in rewards[i * (1 + k):(i + 1) * (1 + k)]) for i in range(num)],
                         dtype=torch.bool)
    r = torch.tensor([0.0 if v is None else float(v) for v in rewards], dtype=torch.float32).view(num, 1 + k)
    policy_r, anchor_r = r[:, 0], r[:, 1:]
    if config.algorithm == "jbond":
        quantile_reward, kl_coef = jbond_rewards(policy_r, anchor_r), 1.0
    else:
        quantile_reward, kl_coef = log_quantile_rewards(policy_r, anchor_r), 1.0 / (k - 1)
    best = better_sample_index(anchor_r)
    targets = [batch.anchor_groups[i][int(best[i])] for i in range(num)]
    stats = BondStats(ties=float((ties(policy_r, anchor_r) & valid).sum()), prompts=float(valid.sum()))

    # 3. Without gradient: the backward reward R of each policy sample and its leave-one-out advantage.
    logp_sum, anchor_sum, start_sum = _score_policy_samples(learner, batch, valid, stats, keep_logprobs)
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

    # 4. With gradient: the Jeffreys loss over [policy sample, best anchor sample] of each prompt.
    finite = _jeffreys_backward(learner, batch, targets, valid.float(), advantages, log_ratio, stats)
    return stats, finite


def _score_policy_samples(learner: Learner, batch: BondBatch, valid: torch.Tensor, stats: BondStats,
                          keep_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3's scores: sum log pi, log pi_anchor and log pi_start of each policy sample (no gradient);
    the policy's entropy and (for the drift check) its per-token logprobs go into `stats`."""
    num = len(batch.prompt_ids)
    logp_sum, anchor_sum, start_sum = torch.zeros(num), torch.zeros(num), torch.zeros(num)
    sizes = [len(p) + len(c.token_ids) for p, c in zip(batch.prompt_ids, batch.policy_samples)]
    for mb, real in learner.session.even_micro_batches(learner.micro_batches(sizes, 1)):
        score = learner.scorer(batch.prompt_ids[mb], batch.policy_samples[mb], 1)
        with torch.no_grad(), learner.session.autocast():
            logp, mask, entropy = score(learner.policy, with_entropy=True)
            logp_anchor = score(learner.anchor)[0].to(logp.device)
            logp_start = score(learner.start_model)[0].to(logp.device) if learner.start_model is not None else logp_anchor
        if not real:
            continue  # a repeat that keeps a sharded model's collectives in step (fsdp)
        logp_sum[mb] = masked_sum(logp, mask).float().cpu()
        anchor_sum[mb] = masked_sum(logp_anchor, mask).float().cpu()
        start_sum[mb] = masked_sum(logp_start, mask).float().cpu()
        ok = valid[mb].to(mask.device)
        stats.kl_anchor_k3 += k3_kl(logp, logp_anchor, mask)[ok].tolist()
        stats.kl_start_k3 += k3_kl(logp, logp_start, mask)[ok].tolist()
        stats.entropy_sum += float((entropy.sum(dim=-1) * ok).sum())
        stats.entropy_count += float((mask.sum(dim=-1) * ok).sum())
        if keep_logprobs:
            stats.engine_lp += [c.logprobs for c in batch.policy_samples[mb]]
            stats.trainer_lp += [logp[i, :len(c.token_ids)].cpu() for i, c in enumerate(batch.policy_samples[mb])]
    return logp_sum, anchor_sum, start_sum


def _jeffreys_backward(learner: Learner, batch: BondBatch, targets: list, weight: torch.Tensor,
                       advantages: torch.Tensor, log_ratio: torch.Tensor, stats: BondStats) -> bool:
    """Step 4: accumulate the gradient of the Jeffreys loss, each prompt's policy sample and best
    anchor sample sharing the prompt's pass. A term whose weight is 0 is not scored (jeffreys_beta
    1: backward only; 0 with kl_gamma 0: forward only). Returns whether every loss was finite."""
    config, session = learner.config, learner.session
    options = config.bond
    num = len(batch.prompt_ids)
    kinds = ["policy"] * (options.jeffreys_beta > 0 or options.kl_gamma > 0) + ["target"] * (options.jeffreys_beta < 1)
    per = len(kinds)
    seq_prompts = [p for p in batch.prompt_ids for _ in kinds]
    seqs = [batch.policy_samples[i] if kind == "policy" else targets[i] for i in range(num) for kind in kinds]
    normalizer = {}
    for j, kind in enumerate(kinds):
        tokens = sum(len(seqs[i * per + j].token_ids) * float(weight[i]) for i in range(num))
        count = tokens if config.loss_aggregation == "token_mean" else float(weight.sum())
        normalizer[kind] = max(1.0, session.all_sum(count))
    mbs = learner.micro_batches([len(p) + len(c.token_ids) for p, c in zip(seq_prompts, seqs)], per)
    stats.micro_batches = len(mbs)
    finite = True
    for mb, real in session.even_micro_batches(mbs):  # fsdp: as many passes on every rank
        rows = slice(mb.start // per, min(num, mb.stop // per))
        with session.autocast():
            logp, mask, _ = learner.scorer(seq_prompts[mb], seqs[mb], per)(learner.policy)
        ok = weight[rows].to(logp.device)[:, None]
        forward = backward = kl_term = logp.sum() * 0.0
        if "policy" in kinds:
            j = kinds.index("policy")
            lp, m = logp[j::per], mask[j::per] * ok
            old = (engine_logprobs(batch.policy_samples[rows], mask[j::per])
                   if config.importance_clip is not None else None)
            backward = reinforce_loss(lp, advantages[rows].to(logp.device), m, old_logprobs=old,
                                      clip=config.importance_clip, aggregation=config.loss_aggregation,
                                      normalizer=normalizer["policy"])
            if options.kl_gamma:
                # Score-function gradient of KL(pi || pi_anchor): E[log(pi/pi_anchor) * grad log pi].
                kl_term = reinforce_loss(lp, -log_ratio[rows].to(logp.device), m, aggregation=config.loss_aggregation,
                                         normalizer=normalizer["policy"])
        if "target" in kinds:
            j = kinds.index("target")
            forward = forward_nll_loss(logp[j::per], mask[j::per] * ok, config.loss_aggregation,
                                       normalizer=normalizer["target"])
        loss = jeffreys_loss(forward, backward, options.jeffreys_beta, kl_term, options.kl_gamma)
        if not real:
            (loss * 0.0).backward()  # a repeat that keeps a sharded model's collectives in step
            continue
        if not torch.isfinite(loss):
            finite = False
            if not session.fsdp:
                return False
            # Under fsdp the other ranks still run their passes; the step is skipped on every rank.
        loss.backward()
        stats.loss += loss.item()
        stats.forward += forward.item()
        stats.backward += backward.item()
        stats.kl_term += kl_term.item()
    return finite


__all__ = ["AnchorRollouts", "Bond", "BondBatch", "BondStats", "anchor_sampling_seed", "bond_gradient_pass"]
