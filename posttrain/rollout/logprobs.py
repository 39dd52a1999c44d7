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


def sequence_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      temperature: float = 1.0, requires_grad: bool = False, batch_size: int | None = None,
                      pad_token_id: int = 0) -> list[torch.Tensor]:
    """Per-token logprobs of each completion given its prompt, one 1-D float32 tensor per pair.

    Sequences are right-padded (positions stay 0..len-1, as in the engines, so no position-id
    bookkeeping is needed) and only completion positions are normalised, which keeps memory at
    O(completion tokens x vocab). `temperature` 0 means greedy and is scored at T = 1.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"sequence_logprobs: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if temperature < 0:
        raise ValueError(f"sequence_logprobs: temperature must be >= 0, got {temperature}")
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
            for i, s in enumerate(seqs):
                input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                attention[i, :len(s)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            for i, (p, c) in enumerate(zip(prompts, completions)):
                if len(c) == 0:
                    out.append(logits.new_zeros(0, dtype=torch.float32))
                    continue
                # The logits at position j predict token j + 1.
                rows = logits[i, len(p) - 1:len(p) + len(c) - 1].float() / t
                targets = torch.tensor(list(c), dtype=torch.long, device=device)
                out.append(torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).squeeze(-1))
    return out
