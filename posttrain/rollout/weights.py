"""The trainer's weights as the engines need them: whole tensors named as in the HF checkpoint.

`engine_tensor_plan(model)` lists them before anything is assembled: name, unsharded shape and
dtype, and how to assemble the tensor. Under FSDP2 (`fully_shard`) each parameter is a DTensor
whose `.shape` is the whole tensor's, so sizes are known without gathering (the local shard's
numel would undercount them by the world size); assembling is `DTensor.full_tensor()`, a
collective that every rank must run in the same order. A peft model's LoRA deltas are merged on
the assembled base weight with peft's own `get_delta_weight`, which works on DTensors (it returns
a sharded delta, gathered like the weight); the training model is never modified.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch

from posttrain.sharding import full_tensor

# Prefixes that wrappers add in front of the checkpoint's names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor the engine will receive: its checkpoint name, unsharded shape and dtype, and how
    to assemble it (a collective when the model is sharded)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    gather: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def checkpoint_name(name: str) -> str:
    """A parameter's name as the Hugging Face checkpoint spells it, without the prefixes that DDP,
    torch.compile and FSDP wrappers add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        name = name.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
    return name


def _unwrap(model):
    # DDP / torch.compile wrappers keep the real model in `.module` / `._orig_mod`.
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _planned(name: str, tensor: torch.Tensor, gather: Callable[[], torch.Tensor] | None = None) -> PlannedTensor:
    # A DTensor's shape and dtype are those of the whole tensor, known without gathering it.
    return PlannedTensor(checkpoint_name(name), tuple(tensor.shape), tensor.dtype,
                         gather or partial(full_tensor, tensor))


def peft_model_of(model):
    """The peft model inside `model`'s wrappers, or None for a plain model."""
    model = _unwrap(model)
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain model needs nothing from it
        return None
    return model if isinstance(model, PeftModel) else None


def engine_tensor_plan(model, merge_lora: bool = True) -> list[PlannedTensor]:
    """Every tensor an engine needs from a plain or peft model (sharded or not), in the model's
    state-dict order (the same on every rank): LoRA merged in, or with `merge_lora=False` the
    base weights alone (for an engine that applies the adapter itself)."""
    peft_model = peft_model_of(model)
    if peft_model is not None:
        from peft.tuners.lora import LoraLayer

        return _merged_peft_plan(peft_model, LoraLayer, merge_lora)
    return [_planned(name, tensor) for name, tensor in _unwrap(model).state_dict().items()]


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The whole tensors of a peft model's active LoRA adapter, named as peft saves them
    (`adapter_model.safetensors`). Under FSDP every rank gathers them, in the same order."""
    from peft import get_peft_model_state_dict

    peft_model = peft_model_of(model)
    with torch.no_grad():
        state = {name: full_tensor(t) for name, t in peft_model.state_dict().items() if "lora_" in name}
    return get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=peft_model.active_adapter)


def _merged_base_weight(base: torch.Tensor, owner) -> torch.Tensor:
    """W + the active adapters' deltas, on the gathered W. peft's `get_delta_weight` is used so
    that every LoRA variant peft supports is merged the way peft merges it; under FSDP it returns
    a sharded delta, gathered like the weight."""
    merged = full_tensor(base).clone()
    for adapter in owner.active_adapters:
        if adapter in owner.lora_A:
            merged += full_tensor(owner.get_delta_weight(adapter)).to(merged.dtype)
    return merged


def _merged_peft_plan(peft_model, lora_layer_cls, merge_lora: bool) -> list[PlannedTensor]:
    base = peft_model.get_base_model()
    lora_modules = {name: m for name, m in base.named_modules() if isinstance(m, lora_layer_cls)}
    plan = []
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "lora_magnitude_vector" in name:
            continue  # adapter parameters: folded into the base weight below
        module_name, _, leaf = name.rpartition(".")
        if module_name.endswith(".base_layer"):
            owner_name = module_name[: -len(".base_layer")]
            owner = lora_modules.get(owner_name)
            clean = f"{owner_name}.{leaf}"
            if merge_lora and owner is not None and leaf == "weight" and not owner.merged:
                plan.append(_planned(clean, tensor, partial(_merged_base_weight, tensor, owner)))
            else:
                plan.append(_planned(clean, tensor))
            continue
        if ".original_module." in name:
            continue  # modules_to_save: the trained copy replaces the original under the original name
        if ".modules_to_save." in name:
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        plan.append(_planned(name, tensor))
    return plan


def weights_for_engine(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Detached whole tensors of a plain or peft model (sharded or not), LoRA deltas merged in, one at a time.

    The training model is left untouched. For a push into an engine, prefer `posttrain.rollout.sync.sync_weights`, which
    sizes buckets and can send only a LoRA adapter.
    """
    for planned in engine_tensor_plan(model):
        with torch.no_grad():
            yield planned.name, planned.gather()
