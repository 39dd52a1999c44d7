"""Logprobs of completion tokens under a model: the one shared definition.

Convention (every engine's `Completion.logprobs` follows it, and drift checks, RL and
distillation recompute it with `sequence_logprobs`):

    logprob(y_t) = log_softmax(logits_t / T)[y_t]    over the full vocabulary,

with T the sampling temperature, before any top-k/top-p truncation, and T = 1 for greedy
decoding (temperature 0). This is the quantity a policy gradient differentiates.

vLLM exception: vLLM can report logprobs either before temperature ("raw") or after
temperature *and* top-k/top-p truncation ("processed"). The vLLM engine uses processed
logprobs, which equal the convention whenever top_k = 0 and top_p = 1 (the RL default); with
truncation active its logprobs are those of the truncated, renormalised distribution (the
distribution actually sampled from) and the engine warns once.
"""

from __future__ import annotations

from typing import Sequence

import torch

from posttrain.losses.token_logprobs import chunked_token_logprobs, vocabulary_projection


def sequence_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      temperature: float = 1.0, requires_grad: bool = False, batch_size: int | None = None,
                      pad_token_id: int = 0, chunk_size: int | None = 1024) -> list[torch.Tensor]:
    """Per-token logprobs of each completion given its prompt, one 1-D float32 tensor per pair.

    Sequences are right-padded (positions stay 0..len-1, as in the engines, so no position-id
    bookkeeping is needed) and only completion positions are projected to the vocabulary.
    `chunk_size` (tokens at a time, see chunked_token_logprobs): the decoder's hidden states are
    projected chunk by chunk, so memory does not grow with batch x length x vocab; None runs the
    model's full forward and takes its logits (models without get_decoder()). `temperature` 0
    means greedy and is scored at T = 1.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"sequence_logprobs: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if temperature < 0:
        raise ValueError(f"sequence_logprobs: temperature must be >= 0, got {temperature}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sequence_logprobs: every prompt needs at least one token (the model's <bos>)")
    t = 1.0 if temperature == 0 else float(temperature)
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids) or 1
    out: list[torch.Tensor] = []
    with torch.set_grad_enabled(requires_grad):
        for start in range(0, len(prompt_ids), batch_size):
            prompts = prompt_ids[start:start + batch_size]
            completions = completion_ids[start:start + batch_size]
            seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
            attention = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
            # Position j predicts token j + 1: completion tokens are predicted from len(p) - 1 on.
            scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool, device=device)
            for i, (s, p) in enumerate(zip(seqs, prompts)):
                input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                attention[i, :len(s)] = 1
                scored[i, len(p) - 1:len(s) - 1] = True
            if chunk_size is None:
                hidden, project = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1], None
            else:
                decoder_out = model.get_decoder()(input_ids=input_ids, attention_mask=attention, use_cache=False)
                hidden, project = decoder_out.last_hidden_state[:, :-1], vocabulary_projection(model)
            logp, _ = chunked_token_logprobs(hidden, project, input_ids[:, 1:], t, chunk_size, mask=scored)
            for i, (p, c) in enumerate(zip(prompts, completions)):
                out.append(logp[i, len(p) - 1:len(p) + len(c) - 1].float())
    return out
