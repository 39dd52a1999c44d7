"""Policy-gradient pieces of RL finetuning, as pure functions on tensors.

WARP's first stage (docs/algorithms.md#rloo) reads, per prompt x and sampled completion y:

    r_beta(x, y) = r(x, y) - beta * log(pi(y|x) / pi_anchor(y|x))         kl_regularised_rewards
    A(x, y_i)    = r_beta(x, y_i) - mean_{j != i} r_beta(x, y_j)           rloo_advantages
    loss         = - A(x, y) * log pi(y|x)                                 reinforce_loss

Shapes: sequence-level values are [P, n] (P prompts, n samples each) or flat [B]; token-level
values are [B, T] with a 0/1 mask marking completion tokens. Nothing here knows about models,
rollouts or recipes, so the same functions serve REINFORCE, J-BOND and user code.
"""

from __future__ import annotations

from typing import Literal

import torch

from posttrain.losses.token_logprobs import chunked_token_logprobs

Aggregation = Literal["token_mean", "sequence_mean", "sequence_sum"]


def rloo_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out advantages over the n samples of each prompt.

    rewards: [P, n]. A[p, i] = rewards[p, i] - mean_{j != i} rewards[p, j]
                             = n / (n - 1) * (rewards[p, i] - mean_j rewards[p, j]).
    The baseline of each sample excludes the sample itself, so it stays an unbiased
    REINFORCE estimator (Kool et al. 2019; Ahmadian et al. 2024). Needs n >= 2.

    valid: optional [P, n] booleans; invalid samples (a reward left out by the fault policy)
    get advantage 0 and are left out of the others' baselines. A prompt with fewer than two
    valid samples has no baseline, and all its advantages are 0.
    """
    if valid is not None:
        valid = valid.to(torch.bool)
        r = torch.where(valid, rewards, torch.zeros_like(rewards))
        count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)
        baseline = (r.sum(dim=1, keepdim=True) - r) / (count - 1).clamp(min=1.0)
        usable = valid & (count >= 2)
        return torch.where(usable, r - baseline, torch.zeros_like(rewards))
    if rewards.dim() != 2:
        raise ValueError(f"rloo_advantages: expected rewards of shape [prompts, samples], got {tuple(rewards.shape)}")
    n = rewards.shape[1]
    if n < 2:
        raise ValueError("rloo_advantages: the leave-one-out baseline needs at least 2 samples per prompt "
                         f"(num_generations >= 2); got {n}")
    total = rewards.sum(dim=1, keepdim=True)
    baseline = (total - rewards) / (n - 1)
    return rewards - baseline


def kl_regularised_rewards(rewards: torch.Tensor, logp_policy_sum: torch.Tensor,
                           logp_anchor_sum: torch.Tensor, beta: float) -> torch.Tensor:
    """WARP's sequence reward r_beta = r - beta * (log pi(y|x) - log pi_anchor(y|x)).

    The log-ratio of one sample is a Monte Carlo estimate of KL(pi || pi_anchor); as a reward it
    penalises drifting from the anchor. Inputs are summed over the completion tokens and are
    treated as constants (detached): the reward is not differentiated, only log pi in the loss.
    beta = 0 returns `rewards` unchanged.
    """
    if beta == 0:
        return rewards
    log_ratio = logp_policy_sum.detach() - logp_anchor_sum.detach()
    return rewards - beta * log_ratio


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over the masked (completion) tokens: [B, T] -> [B]."""
    return (values * mask).sum(dim=-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL(pi || ref) by Schulman's k3 estimator, summed over the masked tokens: [B, T] -> [B].

    With d = log ref - log pi at each sampled token, k3 = exp(d) - 1 - d. Its expectation under pi
    is the token's KL, as for k1 = -d, but every sample is >= 0 (k1 is negative whenever the
    sample is likelier under ref), so a small KL is not read as a negative one. TRL's GRPO logs
    this estimator as `kl` (per token; here per sequence, as the penalty log pi/pi_ref is)."""
    d = (ref_logprobs - logprobs).float()
    return ((torch.exp(d) - 1.0 - d) * mask).sum(dim=-1)


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   old_logprobs: torch.Tensor | None = None, clip: float | None = None,
                   aggregation: Aggregation = "token_mean", normalizer: float | None = None) -> torch.Tensor:
    """REINFORCE loss with one advantage per sequence; its gradient is -A * grad log pi.

    logprobs: [B, T] log pi(y_t | x, y_<t) of the sampled tokens, with gradient.
    advantages: [B] (or [P, n], flattened), treated as constants.
    mask: [B, T], 1 on the completion tokens that are trained on (including <end_of_turn>).

    Importance weighting (optional). The samples come from the rollout engine, whose numerics
    differ slightly from the trainer's; with `old_logprobs` (the engine's per-token logprobs)
    each token's term is weighted by w_t = pi_trainer(y_t) / pi_engine(y_t), detached, and
    truncated at `clip` when given (truncated importance sampling, so one badly mismatched
    token cannot blow up the step): per-token loss = -min(w_t, clip) * A * log pi(y_t).

    Aggregation of the per-token losses l[b, t]:
      - "token_mean":    sum_{b,t} l / (number of completion tokens in the batch). Equals the
                          REINFORCE gradient (sequence_sum) divided by the batch's mean length,
                          so the scale does not depend on how long completions are. Default.
      - "sequence_mean": mean over sequences of (sum_t l / length of that sequence), as GRPO.
                          Tokens of short sequences weigh more.
      - "sequence_sum":  mean over sequences of sum_t l: the textbook estimator of
                          grad E[r] = E[A * grad log pi(y|x)], as written in WARP.
    `normalizer` replaces the denominator (token count for token_mean, sequence count for the
    other two), so gradient accumulation over micro-batches adds up to the full-batch loss.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"reinforce_loss: logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} differ in shape")
    advantages = advantages.reshape(-1).detach()
    if advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"reinforce_loss: {advantages.shape[0]} advantages for {logprobs.shape[0]} sequences")
    mask = mask.to(logprobs.dtype)
    weight = torch.ones_like(logprobs)
    if old_logprobs is not None:
        weight = torch.exp(logprobs.detach() - old_logprobs)
        if clip is not None:
            weight = weight.clamp(max=clip)
    per_token = -weight * advantages[:, None] * logprobs * mask
    return aggregate_token_losses(per_token, mask, aggregation, normalizer, "reinforce_loss")


def aggregate_token_losses(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation,
                           normalizer: float | None = None, who: str = "loss") -> torch.Tensor:
    """Reduce masked per-token losses [B, T] to a scalar: token_mean (over all counted tokens),
    sequence_mean (each sequence's token mean, then over sequences) or sequence_sum. `normalizer`
    replaces the final denominator (a global token or sequence count), so micro-batches and
    data-parallel ranks add up to the full-batch loss."""
    if aggregation == "token_mean":
        return per_token.sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1.0))
    if aggregation == "sequence_mean":
        per_seq = per_token.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    elif aggregation == "sequence_sum":
        per_seq = per_token.sum(dim=-1)
    else:
        raise ValueError(f"{who}: aggregation must be token_mean, sequence_mean or sequence_sum; got {aggregation!r}")
    return per_seq.sum() / (normalizer if normalizer is not None else per_seq.shape[0])


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `labels` under softmax(logits / temperature), and the entropy.

    logits: [B, T, V] already aligned with labels [B, T] (logits[:, t] predicts labels[:, t]).
    The temperature is the sampling temperature, so the trainer scores samples under the same
    distribution the engine drew them from (as TRL does). The entropy is returned detached,
    for logging only. For logits that already exist; from hidden states (no [B, T, V] tensor
    at all) use posttrain.losses.token_logprobs.chunked_token_logprobs, which this calls.
    """
    logp, entropy = chunked_token_logprobs(logits, None, labels, temperature, chunk_size, with_entropy=True)
    return logp, entropy
