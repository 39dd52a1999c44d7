"""Options a stage kind gains later leave the runner's hash of an unchanged recipe as it was, so run
directories made before them are still skipped when complete and resumed when killed."""

from __future__ import annotations

import hashlib
import json

import pytest

from posttrain.stages import STAGE_KINDS

CONFIGS = {"filter": {"dataset": "d"}, "sft": {"model": "m", "dataset": "d"}, "export": {"model": "m"},
           "evaluate": {"model": "m", "datasets": {"a": "x"}, "rewards": [{"name": "math"}]},
           "rl": {"model": "m", "dataset": "d", "rewards": [{"name": "math"}]},
           "reward_model": {"model": "m", "dataset": "d"}, "distill": {"model": "m", "teacher": "t", "dataset": "d"}}

# The digests of these configs' resolved forms as the runner hashed them before the options added
# since (multilingual filters, sft epochs and held-out loss, quantised export, tolerate_all_faults,
# the shared training options, the bond block).
EARLIER = {"filter": "bb23b73b0b90a8ea", "sft": "7de947e8032d9d06", "export": "718907438bed3532",
           "evaluate": "b093543741cee607", "rl": "1c762d23a8cf57c2", "reward_model": "a3c46ef007921d27",
           "distill": "41b5247748e20b34"}


def _digest(kind: str, **extra) -> str:
    cls = STAGE_KINDS[kind].config_cls
    resolved = cls(**{**CONFIGS[kind], **extra}).model_dump(mode="json")
    return hashlib.sha256(json.dumps(cls.hash_form(resolved), sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_an_unchanged_config_hashes_as_it_did_before_the_options_added_since(kind):
    assert _digest(kind) == EARLIER[kind]


@pytest.mark.parametrize("kind, option", [
    ("sft", {"num_train_epochs": 2}), ("export", {"quantize": {"format": "gguf", "type": "q4_0"}}),
    ("filter", {"toxicity": {"multilingual": False}}), ("reward_model", {"shard_optimizer": True}),
    ("rl", {"rewards": [{"name": "math", "tolerate_all_faults": True}]}),
    ("rl", {"rollout": {"sync_bucket_mb": 256}}), ("distill", {"rollout": {"lora_sync": "adapter", "backend": "vllm"}}),
    ("evaluate", {"rollout": {"max_lora_rank": 16}}),
    ("rl", {"sharding": "fsdp"}),
    ("distill", {"fsdp_offload": True}), ("reward_model", {"sharding": "fsdp"}), ("sft", {"sharding": "fsdp"}),
])
def test_a_later_option_counts_once_it_is_set(kind, option):
    assert _digest(kind, **option) != EARLIER[kind]
