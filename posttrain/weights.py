"""Weight-space operations on models and state dicts: EMA of an anchor (WARP, J-BOND).

Functions take `torch.nn.Module`s or name -> tensor mappings and match parameters by name,
so they work across a plain model, its copy, and the merged weights of a LoRA model.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

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


def _named_tensors(item, where: str) -> dict[str, torch.Tensor]:
    # A module contributes its full state dict (buffers included), which is what a merged
    # checkpoint has to reload; a mapping is taken as it is.
    if isinstance(item, torch.nn.Module):
        return item.state_dict()
    if isinstance(item, Mapping):
        return dict(item)
    raise TypeError(f"{where}: expected a torch.nn.Module or a name -> tensor mapping, got {type(item).__name__}")


@torch.no_grad()
def linear_average(models_or_state_dicts: Sequence, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """sum_i w_i * theta_i for every tensor name, uniform weights (1/M) by default.

    Inputs are modules or name -> tensor mappings, matched by name: every input must hold
    every tensor of the others with the same shape, or a ValueError names the tensor. The sum
    is accumulated in float32 and returned in the first input's dtype and device. Tensors that
    are not floating point (integer buffers) are copied, and must agree across inputs.
    """
    items = list(models_or_state_dicts)
    if not items:
        raise ValueError("linear_average: expected at least one model or state dict, got none")
    if weights is None:
        weights = [1.0 / len(items)] * len(items)
    weights = [float(w) for w in weights]
    if len(weights) != len(items):
        raise ValueError(f"linear_average: weights has {len(weights)} entries for {len(items)} models")
    dicts = [_named_tensors(x, f"linear_average: models_or_state_dicts[{i}]") for i, x in enumerate(items)]
    names = list(dicts[0])
    for i, d in enumerate(dicts[1:], start=1):
        extra = [n for n in d if n not in dicts[0]]
        if extra:
            raise ValueError(f"linear_average: tensor {extra[0]!r} is in models_or_state_dicts[{i}] "
                             "but missing from models_or_state_dicts[0]")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = dicts[0][name]
        for i, d in enumerate(dicts[1:], start=1):
            t = d.get(name)
            if t is None:
                raise ValueError(f"linear_average: tensor {name!r} is missing from models_or_state_dicts[{i}]")
            if t.shape != first.shape:
                raise ValueError(f"linear_average: tensor {name!r} has shape {tuple(t.shape)} in "
                                 f"models_or_state_dicts[{i}] but {tuple(first.shape)} in models_or_state_dicts[0]")
        if not first.is_floating_point():
            for i, d in enumerate(dicts[1:], start=1):
                if not torch.equal(d[name].to(first.device), first):
                    raise ValueError(f"linear_average: non-float tensor {name!r} differs in "
                                     f"models_or_state_dicts[{i}] and cannot be averaged")
            out[name] = first.detach().clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
        for w, d in zip(weights, dicts):
            acc.add_(d[name].detach().to(device=first.device, dtype=torch.float32), alpha=w)
        out[name] = acc.to(first.dtype)
    return out
