"""Reward functions for RL and evaluation: protocol, registry, combination, and built-ins.

A reward function is called as TRL's GRPOTrainer calls one, with keywords only:
``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``
(async functions are accepted; see :mod:`rewards.combine`). Built-ins, loaded lazily by registry name:
``math`` (:mod:`rewards.math`), ``code`` (:mod:`rewards.code`), ``instructions``
(:mod:`rewards.instructions`) and ``reward_model`` (:mod:`rewards.reward_model`).
"""

from rewards.combine import CombinedReward, RewardBatch, RewardFaultError, RewardSpec, compute_rewards
from rewards.registry import RewardLoadError, load_reward, register_reward, registered_rewards

__all__ = ["CombinedReward", "RewardBatch", "RewardFaultError", "RewardSpec", "compute_rewards",
           "RewardLoadError", "load_reward", "register_reward", "registered_rewards"]
