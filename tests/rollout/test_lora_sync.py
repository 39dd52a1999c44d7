"""`rollout.lora_sync: adapter`: the real vLLM CPU engine keeps the base weights and receives only
the LoRA adapter; what it samples must equal the transformers engine given the merged weights."""

from __future__ import annotations

import pytest
import torch

from posttrain.modeling import load_causal_lm
from posttrain.rollout import RolloutConfig, RolloutError, SamplingParams, create_engine, sync_weights, vllm_available
from rollout_helpers import PROMPTS, flat, perturbed

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(engine):
    return [c.token_ids for c in flat(engine.generate(PROMPTS[:2], sampling=GREEDY))]


def _lora_policy(model_dir, r: int = 8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(load_causal_lm(model_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                                init_lora_weights=False))


def test_adapter_sync_sends_only_the_adapter_and_samples_like_the_merged_model(tiny_llama_dir):
    config = RolloutConfig(backend="vllm", max_model_len=256, lora_sync="adapter", max_lora_rank=8)
    vllm = create_engine(str(tiny_llama_dir), config)
    hf = create_engine(str(tiny_llama_dir), RolloutConfig(backend="transformers", max_model_len=256))
    try:
        base_tokens = _tokens(vllm)
        policy = _lora_policy(tiny_llama_dir)
        model_bytes = sum(p.numel() * p.element_size() for p in policy.get_base_model().parameters())
        stats = sync_weights(vllm, policy)
        sync_weights(hf, policy)  # the transformers engine gets the merged weights
        assert stats.bytes < model_bytes / 5  # the adapter alone (a tiny model's adapter is relatively large)
        assert stats.tensors == 2 * len(TARGETS) * 2  # lora_A and lora_B of each target in both layers
        first = _tokens(vllm)
        assert first != base_tokens
        assert first == _tokens(hf)

        # The next training step: a new adapter version replaces the previous one.
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.5)
        sync_weights(vllm, policy)
        sync_weights(hf, policy)
        second = _tokens(vllm)
        assert second != first and second == _tokens(hf)
        assert vllm.weight_version == 2

        # Other weights on the same engine (BOND's anchor, for one) are sampled without the
        # adapter; the next adapter sync puts the policy's base weights back first.
        anchor = perturbed(load_causal_lm(tiny_llama_dir), seed=3, scale=0.2)
        sync_weights(vllm, anchor)
        sync_weights(hf, anchor)
        assert _tokens(vllm) == _tokens(hf) != second
        restored = sync_weights(vllm, policy)
        assert restored.bytes > model_bytes  # base weights, then the adapter
        assert _tokens(vllm) == second

        with pytest.raises(RolloutError, match="rollout.max_lora_rank: 8 is below the policy's LoRA rank 16"):
            sync_weights(vllm, _lora_policy(tiny_llama_dir, r=16))
    finally:
        vllm.close()


def test_adapter_sync_is_refused_where_no_vllm_engine_applies_it(tiny_llama_dir):
    with pytest.raises(ValueError, match="rollout.lora_sync: adapter.*backend: vllm"):
        RolloutConfig(backend="transformers", lora_sync="adapter")
    hf = create_engine(str(tiny_llama_dir), RolloutConfig(backend="transformers"))
    with pytest.raises(RolloutError, match="lora_sync: adapter needs the colocated vLLM engine"):
        hf.update_adapter({}, None)
