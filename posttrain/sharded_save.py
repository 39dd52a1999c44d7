"""Saving models that no rank holds whole (`sharding: fsdp`).

- `save_hf_checkpoint`: the stage's output model as an ordinary Hugging Face checkpoint
  (safetensors shards, their index, config, tokenizer), streamed: the weights are gathered one
  tensor at a time on every rank (collectives) and rank 0 writes them out a shard file at a time,
  so no rank ever holds more than one shard file's worth of whole weights. export, merge and
  evaluate then read it as any other checkpoint.
- `save_dcp` / `load_dcp`: a training checkpoint's models and optimizer in
  torch.distributed.checkpoint's format, each rank writing and reading its own shards (resumed at
  the same world size, bit for bit; DCP reshards for another).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEFAULT_SHARD_MB = 2048


def _tied_names(model) -> set[str]:
    """State-dict names that repeat a tensor seen under an earlier name (an output layer tied to the
    embeddings): save_pretrained writes such a tensor once, and so does this."""
    seen, tied = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def save_hf_checkpoint(model, tokenizer, out_dir: Path, is_main: bool, shard_mb: int = DEFAULT_SHARD_MB) -> None:
    """Write `model` (sharded or not, plain or peft: LoRA merged in) as a Hugging Face checkpoint
    into `out_dir`, every rank calling it. Shard files of at most `shard_mb` MB (a tensor larger
    than that gets a file of its own)."""
    from safetensors.torch import save_file

    from posttrain.modeling import save_tokenizer
    from posttrain.rollout.weights import checkpoint_name, weights_for_engine

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = {checkpoint_name(n) for n in _tied_names(hf_model)}
    out_dir = Path(out_dir)
    limit = shard_mb * 2**20
    files: list[list[str]] = []  # names per written file
    bucket: dict[str, torch.Tensor] = {}
    used = total = 0

    def flush() -> None:
        nonlocal bucket, used
        if bucket and is_main:
            save_file(bucket, str(out_dir / f".part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            files.append(list(bucket))
        bucket, used = {}, 0

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name, tensor in weights_for_engine(model):  # whole tensors, one at a time, on every rank
        if name in tied:
            continue
        if not is_main:
            continue  # the gather was collective; only rank 0 keeps the result
        size = tensor.numel() * tensor.element_size()
        if bucket and used + size > limit:
            flush()
        bucket[name] = tensor.detach().to("cpu").contiguous()
        used += size
        total += size
    flush()
    if not is_main:
        return
    if len(files) == 1:
        os.replace(out_dir / ".part-00000.safetensors", out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, names in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(out_dir / f".part-{i:05d}.safetensors", out_dir / final)
            weight_map.update({n: final for n in names})
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_model.config.save_pretrained(str(out_dir))
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir)


def save_dcp(path: Path, models: dict[str, torch.nn.Module], policy, optimizer) -> None:
    """Every rank writes its shards of the named models and of the optimizer's state under `path`
    (torch.distributed.checkpoint; collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {f"model.{name}": get_model_state_dict(model) for name, model in models.items()}
    state["optimizer"] = get_optimizer_state_dict(policy, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_dcp(path: Path, models: dict[str, torch.nn.Module], policy, optimizer) -> None:
    """Restore what save_dcp wrote into the (already sharded) models and optimizer, on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {f"model.{name}": get_model_state_dict(model) for name, model in models.items()}
    state["optimizer"] = get_optimizer_state_dict(policy, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    for name, model in models.items():
        set_model_state_dict(model, state[f"model.{name}"])
    set_optimizer_state_dict(policy, optimizer, state["optimizer"])
