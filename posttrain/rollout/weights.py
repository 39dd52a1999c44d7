"""The trainer's weights as (name, tensor) pairs named as in the HF checkpoint, for engines."""

from __future__ import annotations

import re
from typing import Iterator

import torch

# Prefixes that wrappers add in front of the checkpoint's names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _strip_wrappers(name: str) -> str:
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


def weights_for_engine(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield detached tensors of a plain or peft model, LoRA deltas merged in.

    A model sharded by FSDP yields whole tensors, gathered one at a time (collectives: every rank
    iterates through all of them, in the same order).

    For a peft model the training model is left untouched: each LoRA layer's merged weight
    W + scale * B @ A is computed on the fly with peft's own `get_delta_weight` (so every
    LoRA variant peft supports is merged the way peft merges it), one layer at a time.
    """
    model = _unwrap(model)
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but a plain model needs nothing from it
        PeftModel = LoraLayer = ()
    if PeftModel and isinstance(model, PeftModel):
        for name, tensor in _merged_peft_weights(model, LoraLayer):
            yield name, _whole(tensor)
        return
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            yield _strip_wrappers(name), _whole(tensor.detach())


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    # An FSDP shard (DTensor) is gathered into the whole tensor the engine loads.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _merged_peft_weights(peft_model, lora_layer_cls) -> Iterator[tuple[str, torch.Tensor]]:
    base = peft_model.get_base_model()
    lora_modules = {name: m for name, m in base.named_modules() if isinstance(m, lora_layer_cls)}
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if "lora_" in name or "lora_magnitude_vector" in name:
                continue  # adapter parameters: folded into the base weight below
            module_name, _, leaf = name.rpartition(".")
            if module_name.endswith(".base_layer"):
                owner_name = module_name[: -len(".base_layer")]
                owner = lora_modules.get(owner_name)
                clean = f"{owner_name}.{leaf}"
                if owner is not None and leaf == "weight" and not owner.merged:
                    delta = torch.zeros_like(tensor)
                    for adapter in owner.active_adapters:
                        if adapter in owner.lora_A:
                            delta = delta + owner.get_delta_weight(adapter).to(tensor.dtype)
                    yield _strip_wrappers(clean), tensor.detach() + delta
                else:
                    yield _strip_wrappers(clean), tensor.detach()
                continue
            if ".modules_to_save." in name or ".original_module." in name:
                # modules_to_save: the trained copy replaces the original under the original name
                if ".original_module." in name:
                    continue
                name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            yield _strip_wrappers(name), tensor.detach()
