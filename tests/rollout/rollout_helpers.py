"""Model edits shared by the rollout tests (real weights, no mocks)."""

from __future__ import annotations

import torch

from posttrain.chat import tokenize_prompt
from posttrain.modeling import end_of_turn_id

PROMPTS = ["What is 12 + 7?", [{"role": "user", "content": "Write a short poem about rivers."}], "hi"]


def perturbed(model, seed: int, scale: float = 0.05):
    """The same model with every weight moved by Gaussian noise: new weights to push."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_end_of_turn_likely(model, tokenizer, strength: float = 5.0):
    """Point <end_of_turn>'s output embedding at the mean final hidden state.

    The random tiny model then ends its turn after a few tokens at temperature 1, so stopping
    is exercised on real generations.
    """
    ids = torch.tensor([tokenize_prompt(tokenizer, "What is 2+3? and a few more words here")])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        mean = hidden.mean(0)
        model.get_output_embeddings().weight[end_of_turn_id(tokenizer)] = strength * mean / mean.norm() ** 2
    return model


def flat(groups):
    return [c for g in groups for c in g]


def prompt_ids_per_completion(tokenizer, prompts, n):
    from posttrain.rollout.prompts import prompt_to_ids

    return [prompt_to_ids(tokenizer, p, "p") for p in prompts for _ in range(n)]
