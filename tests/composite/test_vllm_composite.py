"""vLLM (the CPU build, in-process) on a composite Gemma 3 checkpoint: it serves the language model
alone, built from the text config, and follows weight syncs of the whole composite policy."""

from __future__ import annotations

import pytest
import torch

from posttrain.modeling import load_causal_lm
from posttrain.rollout import RolloutConfig, SamplingParams, create_engine, vllm_available, weights_for_engine
from posttrain.scoring import sequence_logprobs
from posttrain.toy.models import TinyModelSpec, build_tiny_model

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")

PROMPTS = ["What is 2 plus 3?", "Name a colour.", "Write a word."]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def composite_dir(tmp_path_factory, toy_tokenizer):
    d = tmp_path_factory.mktemp("composite_vllm")
    build_tiny_model(TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                   vision={}, seed=3), toy_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def engines(composite_dir):
    vllm = create_engine(str(composite_dir), RolloutConfig(max_model_len=256))  # backend auto
    hf = create_engine(str(composite_dir), RolloutConfig(backend="transformers", max_model_len=256))
    yield vllm, hf
    vllm.close()


def _tokens(groups):
    return [c.token_ids for g in groups for c in g]


def test_auto_picks_vllm_and_it_answers_from_the_checkpoint_as_transformers_does(engines):
    vllm, hf = engines
    assert vllm.backend == "vllm"
    assert _tokens(vllm.generate(PROMPTS, sampling=GREEDY)) == _tokens(hf.generate(PROMPTS, sampling=GREEDY))


def test_weight_sync_of_the_composite_policy_reaches_the_engine(engines, composite_dir):
    vllm, hf = engines
    model = load_causal_lm(composite_dir)
    before = _tokens(vllm.generate(PROMPTS, sampling=GREEDY))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    for engine in (vllm, hf):
        engine.update_weights(weights_for_engine(model))  # composite names, vision tower included
    after = _tokens(vllm.generate(PROMPTS, sampling=GREEDY))
    assert after != before
    assert after == _tokens(hf.generate(PROMPTS, sampling=GREEDY))
    # Sampled log-probabilities are those of the trainer's forward pass on the same weights.
    sampled = vllm.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
    completions = [c for g in sampled for c in g]
    prompt_ids = [ids for ids in hf_prompt_ids(hf, PROMPTS) for _ in range(2)]
    trainer = sequence_logprobs(model.eval(), prompt_ids, [c.token_ids for c in completions], 1.0)
    for c, lp in zip(completions, trainer):
        assert torch.allclose(torch.tensor(c.logprobs), lp, atol=2e-3)


def hf_prompt_ids(engine, prompts):
    from posttrain.rollout.prompts import render_prompts

    return render_prompts(engine.tokenizer, prompts)
