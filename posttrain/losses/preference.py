"""The Bradley-Terry reward-model loss and the figures WARM reports, as pure functions.

A reward model r(x, y) is trained on pairs (x, y_chosen, y_rejected) under the Bradley-Terry
model of preferences, P(y_chosen > y_rejected | x) = sigmoid(r(x, y_chosen) - r(x, y_rejected)),
by minimising the negative log-likelihood per pair:

    L = -log sigmoid(r_c - r_r - m)  +  c * (r_c + r_r)^2                       bradley_terry_loss

m is the pair's margin (0 for the plain loss; Llama 2's margin loss for rated pairs) and c the
optional centring coefficient (Eisenstein et al. 2023): the loss sees only differences, so
without it a reward's offset drifts freely. A model is judged by its held-out pairwise
accuracy, the fraction of pairs with r_c > r_r, a tie counting half (pairwise_accuracy). WARM
(Rame et al. 2024) compares the weight average of M reward models with the ensemble of their
predictions, whose reward is the mean of the members' rewards (ensemble_scores).
"""

from __future__ import annotations

from typing import Sequence

import torch


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) (summed by the caller; margin None
    is the plain Bradley-Terry loss), plus center_coefficient * (r_chosen + r_rejected)^2 when given."""
    difference = r_chosen - r_rejected if margin is None else r_chosen - r_rejected - margin
    loss = -torch.nn.functional.logsigmoid(difference)
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen + r_rejected) ** 2
    return loss


def ensemble_scores(members: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float]]:
    """The prediction ensemble's (r_chosen, r_rejected) per pair: the mean of the members' rewards."""
    chosen = [sum(values) / len(members) for values in zip(*(c for c, _ in members))]
    rejected = [sum(values) / len(members) for values in zip(*(r for _, r in members))]
    return chosen, rejected


def pairwise_accuracy(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> float:
    """Fraction of pairs ranked right; a tie counts half (nan for no pairs)."""
    if not r_chosen:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected)) / len(r_chosen)
