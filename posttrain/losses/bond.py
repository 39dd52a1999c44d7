"""BOND and J-BOND (Sessa et al. 2024, arXiv 2407.14622) as pure functions on tensors.

BOND distils the Best-of-N distribution of a reference policy into the policy, so that one
sample does what best-of-N sampling did. With p_le(y) = P_{y'~pi_ref}[r(y') <= r(y)] and p_lt
its strict version,

    pi_BoN(y) = pi_ref(y) * p_le(y)^(N-1) * sum_{i=1..N} (p_lt(y) / p_le(y))^(i-1)   best_of_n_probs

and the loss is the Jeffreys divergence (1 - beta) * KL(pi_BoN || pi) + beta * KL(pi || pi_BoN):

- forward term: negative log-likelihood of best-of-N samples of pi_ref           forward_nll_loss
- backward term: policy gradient on log p_le(y) (quantile estimate)              log_quantile_rewards
  minus (1 / (N - 1)) * log(pi(y) / pi_ref(y))                                   backward_rewards

J-BOND (their Algorithm 2) takes N = 2 with two anchor samples y'_1, y'_2 per prompt: the
forward target is the better of the two (better_sample_index), the backward reward is
r_J = -log(16) when the policy sample is worse than both, else 0 (jbond_rewards), and the KL
coefficient 1 / (N - 1) is 1.

Tie rule (the paper writes "<" in one place and "<=" in another). Here:
- best-of-N selection keeps the *first* sample of maximal reward (torch.argmax's rule). This is
  exactly the distribution best_of_n_probs computes: y is chosen at draw i when the draws before
  it are strictly worse (p_lt) and the draws after it are not better (p_le).
- r_J uses the strict "<": a policy sample that ties the worse anchor sample is not penalised.
  Then E[r_J(y)] = -log(16) * P(r(y'_1) > r(y)) * P(r(y'_2) > r(y)) = -log(16) * (1 - p_le(y))^2,
  the paper's identity, with p_le counting ties as "not better" (tests check both by enumeration).
With 0/1 rewards ties are the common case, and both terms then carry little signal.

Shapes: B sequences (one per prompt); anchor rewards [B, k]; token values [B, T] with a 0/1 mask.
"""

from __future__ import annotations

import math

import torch

from posttrain.losses.policy import Aggregation, aggregate_token_losses

# -log(16): makes E[r_J] = log(0.5) at the median, p_le = 0.5 (see the module docstring).
JBOND_PENALTY = -math.log(16.0)


# --- the Best-of-N distribution (exact, for categoricals) ----------------------------------------

def reward_quantiles(ref_probs: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_le, p_lt) of every outcome of a categorical: the reference mass with reward <= / < its own.

    ref_probs, rewards: [..., K] over the same K outcomes. Exact (no sampling)."""
    le = (rewards[..., None, :] <= rewards[..., :, None]).to(ref_probs.dtype)  # [.., y, y']: r(y') <= r(y)
    lt = (rewards[..., None, :] < rewards[..., :, None]).to(ref_probs.dtype)
    return (le * ref_probs[..., None, :]).sum(-1), (lt * ref_probs[..., None, :]).sum(-1)


def best_of_n_probs(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """pi_BoN(y) = pi_ref(y) * sum_{i=1..N} p_lt(y)^(i-1) * p_le(y)^(N-i) over the K outcomes.

    The sum form equals the paper's p_le^(N-1) * sum_i (p_lt / p_le)^(i-1) and needs no division
    (p_le >= pi_ref(y) > 0 wherever pi_ref(y) > 0). Ties: the first of the maximal draws wins."""
    if n < 1:
        raise ValueError(f"best_of_n_probs: n must be at least 1, got {n}")
    p_le, p_lt = reward_quantiles(ref_probs, rewards)
    total = torch.zeros_like(ref_probs)
    for i in range(1, n + 1):
        total = total + p_lt ** (i - 1) * p_le ** (n - i)
    return ref_probs * total


def categorical_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, with 0 * log(0 / q) = 0."""
    ratio = torch.where(p > 0, torch.log(p.clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300)), torch.zeros_like(p))
    return (p * ratio).sum(-1)


def best_of_n_kl_bound(n: int) -> float:
    """log N - (N - 1) / N: the largest KL(pi_BoN || pi_ref), reached in the continuous limit."""
    return math.log(n) - (n - 1) / n


# --- sample estimates ----------------------------------------------------------------------------

def better_sample_index(anchor_rewards: torch.Tensor) -> torch.Tensor:
    """Index of the best of each row's anchor samples ([B, k] -> [B]); ties: the first one.

    For k = 2 this is J-BOND's forward target; for k = N, a draw of pi_BoN (best_of_n_probs)."""
    if anchor_rewards.dim() != 2 or anchor_rewards.shape[1] < 1:
        raise ValueError(f"better_sample_index: expected anchor rewards [prompts, samples], got "
                         f"{tuple(anchor_rewards.shape)}")
    return torch.argmax(anchor_rewards, dim=1)  # documented to return the first maximal index


def jbond_rewards(policy_rewards: torch.Tensor, anchor_rewards: torch.Tensor) -> torch.Tensor:
    """r_J(y) = -log(16) where r(y) < min(r(y'_1), r(y'_2)) (strictly: ties are not penalised), else 0.

    policy_rewards: [B]; anchor_rewards: [B, 2]."""
    if anchor_rewards.dim() != 2 or anchor_rewards.shape[1] != 2:
        raise ValueError(f"jbond_rewards: expected two anchor rewards per prompt [B, 2], got {tuple(anchor_rewards.shape)}")
    worse = policy_rewards < anchor_rewards.min(dim=1).values
    return torch.where(worse, torch.full_like(policy_rewards, JBOND_PENALTY), torch.zeros_like(policy_rewards))


def ties(policy_rewards: torch.Tensor, anchor_rewards: torch.Tensor) -> torch.Tensor:
    """[B] booleans: the prompt's comparison involved a tie (policy sample equal to an anchor sample,
    or anchor samples equal to each other), i.e. where the tie rule decided something."""
    policy_tie = (anchor_rewards == policy_rewards[:, None]).any(dim=1)
    k = anchor_rewards.shape[1]
    anchor_tie = torch.zeros_like(policy_tie)
    for i in range(k):
        for j in range(i + 1, k):
            anchor_tie |= anchor_rewards[:, i] == anchor_rewards[:, j]
    return policy_tie | anchor_tie


def quantile_estimates(policy_rewards: torch.Tensor, anchor_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo (p_le, p_lt) of each policy sample over its k anchor samples: the fraction of
    anchor rewards <= / < r(y). [B], [B, k] -> [B], [B]."""
    r = policy_rewards[:, None]
    return (anchor_rewards <= r).float().mean(dim=1), (anchor_rewards < r).float().mean(dim=1)


def log_quantile_rewards(policy_rewards: torch.Tensor, anchor_rewards: torch.Tensor) -> torch.Tensor:
    """BOND's backward reward log p_le(y), estimated over k anchor samples as
    log((1 + #{j: r(y'_j) <= r(y)}) / (k + 1)).

    The plain fraction is 0 (log = -inf) whenever y is worse than every anchor sample; counting y
    itself among the k + 1 draws keeps the estimate in [1/(k+1), 1], a rank-based quantile that
    tends to p_le as k grows."""
    k = anchor_rewards.shape[1]
    count = (anchor_rewards <= policy_rewards[:, None]).float().sum(dim=1)
    return torch.log((count + 1.0) / (k + 1.0))


def backward_rewards(quantile_rewards: torch.Tensor, logp_policy_sum: torch.Tensor, logp_anchor_sum: torch.Tensor,
                     kl_coef: float) -> torch.Tensor:
    """R = reward - kl_coef * (log pi(y) - log pi_anchor(y)), detached: the backward term's reward
    (J-BOND: r_J with kl_coef = 1; BOND: log p_le with kl_coef = 1 / (N - 1))."""
    return quantile_rewards.detach() - kl_coef * (logp_policy_sum.detach() - logp_anchor_sum.detach())


def leave_one_out_advantages(values: torch.Tensor, valid: torch.Tensor, total: float, count: float) -> torch.Tensor:
    """A_i = R_i - mean of the *other* batch items' R, for a batch that may be split over ranks.

    values, valid: [B] this rank's items; total, count: the sum of valid R and their number over
    the whole batch (every rank), so every rank gets the single-process advantages. Invalid items
    and a batch of one valid item get 0."""
    valid = valid.to(torch.bool)
    if count < 2:
        return torch.zeros_like(values)
    baseline = (total - values) / (count - 1.0)
    return torch.where(valid, values - baseline, torch.zeros_like(values))


# --- losses --------------------------------------------------------------------------------------

def forward_nll_loss(logprobs: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation = "token_mean",
                     normalizer: float | None = None) -> torch.Tensor:
    """The forward term: negative log-likelihood of the best-of-N targets under the policy (SFT).

    logprobs, mask: [B, T]. Aggregated as posttrain.losses.policy.reinforce_loss does (token_mean
    over all target tokens, sequence_mean, sequence_sum); `normalizer` replaces the denominator so
    micro-batches and ranks add up to the full-batch loss."""
    if logprobs.shape != mask.shape:
        raise ValueError(f"forward_nll_loss: logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.to(logprobs.dtype)
    return aggregate_token_losses(-logprobs * mask, mask, aggregation, normalizer, "forward_nll_loss")


def jeffreys_loss(forward: torch.Tensor, backward: torch.Tensor, beta: float = 0.5,
                  kl: torch.Tensor | None = None, gamma: float = 0.0) -> torch.Tensor:
    """(1 - beta) * forward + beta * backward (+ gamma * kl): J-BOND's step 5 (beta = 0.5 in the paper).

    beta = 1 is backward-only (mode seeking: entropy collapses), beta = 0 forward-only (mass covering)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jeffreys_loss: beta must lie in [0, 1], got {beta}")
    loss = (1.0 - beta) * forward + beta * backward
    if gamma and kl is not None:
        loss = loss + gamma * kl
    return loss
