"""Training losses as pure functions on tensors (distillation, policy gradient, BOND, Bradley-Terry, log-probs)."""

from posttrain.losses.token_logprobs import chunked_token_logprobs, vocabulary_projection  # noqa: F401

from posttrain.losses.policy import (  # noqa: F401
    kl_regularised_rewards,
    masked_sum,
    reinforce_loss,
    rloo_advantages,
)
from posttrain.losses.distillation import (  # noqa: F401
    EMPTY_SLOT,
    DistillationObjective,
    ProjectedLogits,
    divergence_loss,
    forward_kl,
    generalized_jsd,
    gkd_loss,
    reverse_kl,
    sample_teacher_targets,
    sampled_target_loss,
    sparse_target_entropy,
    teacher_targets,
    token_log_probs,
    top_k_teacher_targets,
)
from posttrain.losses.bond import (  # noqa: F401
    JBOND_PENALTY,
    backward_rewards,
    best_of_n_kl_bound,
    best_of_n_probs,
    better_sample_index,
    categorical_kl,
    forward_nll_loss,
    jbond_rewards,
    jeffreys_loss,
    leave_one_out_advantages,
    log_quantile_rewards,
    quantile_estimates,
    reward_quantiles,
    ties,
)
from posttrain.losses.preference import bradley_terry_loss, ensemble_scores, pairwise_accuracy  # noqa: F401
