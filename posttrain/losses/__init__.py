"""Training losses as pure functions on tensors (distillation, policy gradient, per-token log-probs)."""

from posttrain.losses.token_logprobs import chunked_token_logprobs, vocabulary_projection  # noqa: F401

from posttrain.losses.policy import (  # noqa: F401
    kl_regularised_rewards,
    masked_sum,
    reinforce_loss,
    rloo_advantages,
    token_logprobs_and_entropy,
)
from posttrain.losses.distillation import (  # noqa: F401
    EMPTY_SLOT,
    ProjectedLogits,
    divergence_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sample_teacher_targets,
    sampled_target_loss,
    sparse_target_entropy,
    token_log_probs,
    top_k_teacher_targets,
)
