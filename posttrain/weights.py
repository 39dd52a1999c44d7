"""Weight-space operations on models and state dicts: EMA of an anchor (WARP, J-BOND).

Functions take `torch.nn.Module`s or name -> tensor mappings and match parameters by name,
so they work across a plain model, its copy, and the merged weights of a LoRA model.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Union

import torch

Weights = Union[torch.nn.Module, Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def _as_mapping(weights: Weights) -> Mapping[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        return dict(weights.named_parameters())
    if isinstance(weights, Mapping):
        return weights
    return dict(weights)


def _parameters(target: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    # named_parameters() lists a tied tensor (embeddings / lm_head) once, so it is updated once.
    if isinstance(target, torch.nn.Module):
        return dict(target.named_parameters())
    seen: set[int] = set()
    out = {}
    for name, t in target.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


@torch.no_grad()
def ema_update_(anchor: torch.nn.Module | Mapping[str, torch.Tensor], model: Weights, mu: float) -> None:
    """In place: theta_anchor <- (1 - mu) * theta_anchor + mu * theta, for every anchor parameter.

    mu = 0 leaves the anchor fixed (a frozen reference), mu = 1 copies the model. `model` may be
    a module, a mapping, or (name, tensor) pairs such as the LoRA-merged weights of a peft model;
    every anchor parameter must have a same-shaped counterpart in it.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"ema_update_: mu must lie in [0, 1], got {mu}")
    if mu == 0.0:
        return
    source = _as_mapping(model)
    for name, param in _parameters(anchor).items():
        src = source.get(name)
        if src is None:
            raise KeyError(f"ema_update_: the model has no parameter {name!r} to average into the anchor")
        if src.shape != param.shape:
            raise ValueError(f"ema_update_: {name!r} has shape {tuple(src.shape)} in the model but "
                             f"{tuple(param.shape)} in the anchor")
        param.lerp_(src.to(device=param.device, dtype=param.dtype), mu)
