"""vLLM serves export's compressed-tensors int4 checkpoint as written (its CPU W4A16 kernel here,
Marlin/Machete on GPUs): the tokens it samples get the log-probabilities of the dequantised weights
the file holds, not those of the full-precision model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


def _token_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


@pytest.mark.parametrize("scheme", ["int4_per_group"])
def test_vllm_generates_from_the_int4_file_with_the_weights_it_stores(tmp_path, full_precision_dir, scheme):
    from posttrain.chat import tokenize_prompt
    from posttrain.modeling import load_policy
    from posttrain.quantized_export import as_stored, write_compressed_tensors
    from posttrain.rollout.types import RolloutConfig, SamplingParams
    from posttrain.rollout.vllm_engine import VLLMEngine

    model, tok = load_policy(full_precision_dir)
    model.eval()
    out = tmp_path / scheme
    write_compressed_tensors(model, tok, out, scheme, group_size=32)
    stored = as_stored(model, "compressed-tensors", scheme, group_size=32).eval()

    engine = VLLMEngine(str(out), RolloutConfig(backend="vllm", dtype="bfloat16"))
    try:
        prompts = [tokenize_prompt(tok, q) for q in ("What is 12 + 7?", "What is 31 - 4?", "Say hello.")]
        groups = engine.generate(prompts, sampling=SamplingParams(temperature=0.0, max_new_tokens=12))
    finally:
        engine.close()
    to_stored, to_full = [], []
    for prompt_ids, [completion] in zip(prompts, groups):
        served = torch.tensor(completion.logprobs)
        to_stored.append((served - _token_logprobs(stored, prompt_ids, completion.token_ids)).abs())
        to_full.append((served - _token_logprobs(model, prompt_ids, completion.token_ids)).abs())
    to_stored, to_full = torch.cat(to_stored), torch.cat(to_full)
    # bf16 activations in vLLM's kernel: close to the stored weights' log-probs, and measurably
    # closer to them than to the full-precision model's (the file is really what vLLM runs).
    assert to_stored.mean() < 0.05, to_stored
    assert to_stored.mean() < 0.5 * to_full.mean(), (to_stored.mean(), to_full.mean())
