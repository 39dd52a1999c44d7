"""Training losses as pure functions on tensors (distillation, policy gradient)."""

from posttrain.losses.policy import (  # noqa: F401
    kl_regularised_rewards,
    masked_sum,
    reinforce_loss,
    rloo_advantages,
    token_logprobs_and_entropy,
)
