"""Fully sharded models for the hand-written loops: torch's FSDP2 (`fully_shard`), one unit per
decoder layer and one for the rest of the model.

Under `sharding: fsdp` each rank holds 1/W of every parameter (and of its gradient and AdamW
state); a layer's full weights exist only while it runs (all-gathered before its forward and
again in backward, freed after), and gradients are reduce-scattered into the shards.

Two rules follow from the all-gathers being collectives, and the loops keep both:

- every rank runs the same number of forward (and backward) calls through a sharded model: a
  rank whose share of a step needs fewer micro-batches runs a repeat of its first one with the
  loss multiplied by 0 (`TrainingSession.even_micro_batches`);
- whatever reads the model's root parameters outside a layer (the scoring code calls the decoder
  and then projects its hidden states with the output layer chunk by chunk) runs inside one
  forward of the root unit (`in_root_forward`), so the embeddings and output layer are gathered
  for it; FSDP keeps the root's parameters gathered until the backward has used them.

A frozen model's root unit (embeddings, output layer) is released after each scoring pass, except
a distillation teacher's: its logits are projected lazily by the loss, so its root stays gathered
(1/W less memory for the layers, none for the root; the price of never building its full logits).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SHARDING_MODES = ("none", "fsdp")
_ROOT_FORWARD = "_posttrain_root_forward"


def is_sharded(model) -> bool:
    """Whether `model` is an FSDP2 root (its parameters are DTensor shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have made one
        return False
    return isinstance(model, FSDPModule)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of `model`'s language decoder: the modules of the classes its
    Hugging Face classes name in `_no_split_modules` (Gemma3DecoderLayer, LlamaDecoderLayer...),
    found inside `model.get_decoder()` (through peft wrappers and composite models too), so a
    composite's vision tower stays in the root unit."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = [m for m in decoder.modules() if type(m).__name__ in names]
    # A listed class nested in another listed class is covered by its parent's unit.
    inside = {id(c) for m in layers for c in m.modules() if c is not m}
    layers = [m for m in layers if id(m) not in inside]
    if not layers:
        raise ValueError(f"sharding: fsdp found no decoder layers in {type(model).__name__} (classes named in "
                         f"_no_split_modules: {sorted(names) or 'none'}); it shards one unit per decoder layer")
    return layers


def shard_model(model, device: torch.device, bf16: bool = False, offload: bool = False):
    """FSDP2 over the ranks of the default process group: `fully_shard` each decoder layer, then
    the root (embeddings, output layer, final norm and anything else). Returns the same model
    object, now an FSDP module whose parameters are this rank's shards.

    `bf16` (on CUDA): parameters are gathered and computed in bfloat16 and gradients reduced in
    float32, the shards and AdamW's state staying float32. `offload`: shards, gradients and
    optimizer state live in CPU memory (FSDP's CPUOffloadPolicy) and are copied to the device
    for each layer's compute. Gradients are summed over the ranks (the loops normalise their
    losses by the global count, as in data-parallel runs), not averaged as FSDP does by default.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("sharding: fsdp needs a multi-process launch (torchrun or accelerate launch)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    if bf16 and device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # fully_shard shards the parameters where they are and moves the shards to the mesh's device
    # (or keeps them in CPU memory under offload): the whole model never has to fit on one.
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if is_sharded(module):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (gloo has no pre-multiplied sum; with a factor of 1 there is nothing to scale).
            module.set_force_sum_reduction_for_comms(True)
    # A parameter no rank's micro-batches reached still takes part in the reduce-scatter (as zeros).
    model.set_reduce_scatter_unused_params(True)
    return model


def in_root_forward(model, fn: Callable, *args, release: bool = False, **kwargs):
    """`fn(*args, **kwargs)`, run as a forward of `model`'s root FSDP unit when it is sharded
    (its parameters gathered for it), else simply called. The scoring functions run the decoder
    and the chunked output projection through this.

    FSDP keeps the root's parameters gathered after its forward, for the backward; `release`
    (for a caller whose result no longer reads them) frees them at once when nothing will
    backpropagate, as after a frozen model's scoring."""
    if not is_sharded(model):
        return fn(*args, **kwargs)
    if _ROOT_FORWARD not in model.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        # register_fsdp_forward_method wraps a method of the module with the root's pre- and
        # post-forward hooks; this one runs whatever function it is given.
        object.__setattr__(model, _ROOT_FORWARD, lambda function, *a, **k: function(*a, **k))
        register_fsdp_forward_method(model, _ROOT_FORWARD)
    out = getattr(model, _ROOT_FORWARD)(fn, *args, **kwargs)
    if release and not torch.is_grad_enabled():
        model.reshard()
    return out


def reshard_all(model) -> None:
    """Free the gathered parameters of every FSDP unit of `model` (a frozen model's root stays
    gathered after a forward that nothing backpropagates through)."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()


def parameter_bytes_on_rank(model) -> int:
    """Bytes of `model`'s parameters held by this process: its local shards when sharded."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered from every rank, a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    if not isinstance(tensor, DTensor):
        return tensor
    local = tensor.to_local()
    if local.device.type != tensor.device_mesh.device_type:
        # Shards offloaded to CPU memory (FSDP's CPUOffloadPolicy) are gathered over the mesh's
        # backend (NCCL on GPUs), which needs them on the mesh's device.
        device = torch.device(tensor.device_mesh.device_type, torch.cuda.current_device()) \
            if tensor.device_mesh.device_type == "cuda" else torch.device(tensor.device_mesh.device_type)
        tensor = DTensor.from_local(local.to(device), tensor.device_mesh, tensor.placements,
                                    shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor()
