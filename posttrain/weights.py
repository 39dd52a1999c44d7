"""Weight-space operations on models and state dicts: EMA of an anchor (WARP, J-BOND), linear
averages (WARM), SLERP of task vectors and LITI (WARP), and a streaming merge of checkpoints.

Functions take `torch.nn.Module`s or name -> tensor mappings and match parameters by name,
so they work across a plain model, its copy, and the merged weights of a LoRA model.

SLERP (WARP, Rame et al. 2024) interpolates the *task vectors* delta_m = theta_m - theta_init,
one parameter tensor at a time: with Omega the angle between delta_1 and delta_2,

    slerp(init, theta_1, theta_2, lam) = init + sin((1-lam) Omega)/sin Omega * delta_1 + sin(lam Omega)/sin Omega * delta_2

and M models by recursion, slerp_M = slerp(init, slerp_{M-1}, theta_M, lam = 1/M). Where the two
task vectors are parallel, anti-parallel or zero, sin Omega vanishes and linear interpolation (the
limit) is used instead. LITI moves back towards the initialisation: (1-eta) init + eta merged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch

from posttrain.sharding import full_tensor, reshard_all

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

    An anchor sharded by FSDP (posttrain.sharding) is averaged shard by shard, with no
    communication: with a model sharded the same way each rank averages its own shards; with
    whole tensors (a sharded peft policy's merged weights, gathered on every rank) each rank
    averages its slice of them.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"ema_update_: mu must lie in [0, 1], got {mu}")
    if mu == 0.0:
        return
    if isinstance(anchor, torch.nn.Module):
        reshard_all(anchor)  # a frozen sharded model's root may still hold gathered copies, not its shards
    source = _as_mapping(model)
    for name, param in _parameters(anchor).items():
        src = source.get(name)
        if src is None:
            raise KeyError(f"ema_update_: the model has no parameter {name!r} to average into the anchor")
        if src.shape != param.shape:
            raise ValueError(f"ema_update_: {name!r} has shape {tuple(src.shape)} in the model but "
                             f"{tuple(param.shape)} in the anchor")
        if hasattr(param, "to_local"):
            param.to_local().lerp_(_local_slice(src, param, name), mu)
        else:
            # A whole anchor (placed apart from a sharded policy) takes the policy's whole tensors:
            # gathered one at a time, on every rank in the same order.
            src = full_tensor(src)
            param.lerp_(src.to(device=param.device, dtype=param.dtype), mu)


def _local_slice(src: torch.Tensor, param, name: str) -> torch.Tensor:
    """This rank's part of `src` laid out as the DTensor `param`'s shard, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(src, DTensor):
        if src.placements != param.placements or src.to_local().shape != param.to_local().shape:
            raise ValueError(f"ema_update_: {name!r} is sharded differently in the model and the anchor")
        return src.to_local().to(param.dtype)
    whole = src.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()


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


# --- SLERP of task vectors, LITI ------------------------------------------------------------------

# Below this sin(Omega) the two task vectors count as parallel or anti-parallel: the SLERP weights
# sin(.)/sin(Omega) would divide by (nearly) zero, and linear interpolation is their limit.
_PARALLEL_SIN = 1e-6


def _slerp_pair(init: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """SLERP of one tensor's task vectors a - init and b - init, in float32, in init's dtype."""
    base = init.to(torch.float32)
    d1, d2 = a.to(torch.float32) - base, b.to(torch.float32) - base
    # Norms and the dot product in float64: a large tensor's float32 sums lose the small angles.
    n1, n2 = float(d1.double().norm()), float(d2.double().norm())
    c1, c2 = 1.0 - lam, lam
    if n1 > 0.0 and n2 > 0.0:
        cos = max(-1.0, min(1.0, float((d1.double() * d2.double()).sum()) / (n1 * n2)))
        omega = math.acos(cos)
        if math.sin(omega) > _PARALLEL_SIN:
            c1 = math.sin((1.0 - lam) * omega) / math.sin(omega)
            c2 = math.sin(lam * omega) / math.sin(omega)
    return (base + c1 * d1 + c2 * d2).to(init.dtype)


def merge_tensor(name: str, init: torch.Tensor | None, tensors: Sequence[torch.Tensor], method: str = "slerp",
                 lam: float | None = None, eta: float = 1.0) -> torch.Tensor:
    """One tensor of a merge: `method` (linear | slerp) over `tensors`, then LITI towards `init`.

    slerp: M-way recursion on task vectors (needs init); lam, for M = 2 only, weighs the second
    model (default 1/M). linear: uniform average, or (1 - lam, lam) for M = 2. eta < 1 then
    returns (1 - eta) * init + eta * merged. Tensors that are not floating point (integer
    buffers) are copied and must agree. Both the in-memory and the streaming merge call this,
    so they agree bit for bit.
    """
    ref = init if init is not None else tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != ref.shape:
            raise ValueError(f"merge: tensor {name!r} has shape {tuple(t.shape)} in model {i} but "
                             f"{tuple(ref.shape)} in {'init' if init is not None else 'model 0'}")
    if not ref.is_floating_point():
        for i, t in enumerate(tensors):
            if not torch.equal(t, ref):
                raise ValueError(f"merge: non-float tensor {name!r} differs in model {i} and cannot be merged")
        return ref.clone()
    if all(torch.equal(t, ref) for t in tensors):
        # No model changed this tensor (a composite's frozen vision tower under text post-training):
        # it passes through byte-identical rather than through float arithmetic that may round it.
        return ref.clone()
    m = len(tensors)
    if method == "slerp":
        if init is None:
            raise ValueError("merge: slerp interpolates task vectors theta - theta_init and needs init")
        merged = tensors[0]
        for k in range(1, m):
            step_lam = lam if (lam is not None and m == 2) else 1.0 / (k + 1)
            merged = _slerp_pair(init, merged, tensors[k], step_lam)
    elif method == "linear":
        weights = [1.0 - lam, lam] if (lam is not None and m == 2) else [1.0 / m] * m
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for w, t in zip(weights, tensors):
            acc.add_(t.to(torch.float32), alpha=w)
        merged = acc.to(ref.dtype)
    else:
        raise ValueError(f"merge: method must be 'linear' or 'slerp', got {method!r}")
    if eta != 1.0:
        if init is None:
            raise ValueError("merge: LITI (eta < 1) interpolates towards init and needs init")
        merged = liti_tensor(init, merged, eta)
    return merged


def liti_tensor(init: torch.Tensor, merged: torch.Tensor, eta: float) -> torch.Tensor:
    """(1 - eta) * init + eta * merged in float32, returned in init's dtype."""
    if not init.is_floating_point():
        return init.clone()
    return torch.lerp(init.to(torch.float32), merged.to(torch.float32), eta).to(init.dtype)


def _check_names(reference: Iterable[str], others: Sequence[Iterable[str]], what: str) -> list[str]:
    names = list(reference)
    known = set(names)
    for i, other in enumerate(others):
        other = set(other)
        missing = [n for n in names if n not in other]
        if missing:
            raise ValueError(f"merge: tensor {missing[0]!r} is missing from model {i} ({what} has it)")
        extra = sorted(other - known)
        if extra:
            raise ValueError(f"merge: tensor {extra[0]!r} is in model {i} but missing from {what}")
    return names


@torch.no_grad()
def slerp(init, models: Sequence, lam: float | None = None) -> dict[str, torch.Tensor]:
    """In memory: SLERP of the task vectors of `models` (modules or mappings) relative to `init`."""
    return merge_state_dicts(init, models, "slerp", lam)


@torch.no_grad()
def liti(init, merged, eta: float) -> dict[str, torch.Tensor]:
    """In memory: (1 - eta) * init + eta * merged for every tensor, matched by name."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"liti: eta must lie in [0, 1], got {eta}")
    a = _named_tensors(init, "liti: init")
    b = _named_tensors(merged, "liti: merged")
    names = _check_names(a, [b], "init")
    out = {}
    for n in names:
        if b[n].shape != a[n].shape:
            raise ValueError(f"liti: tensor {n!r} has shape {tuple(b[n].shape)} in merged but {tuple(a[n].shape)} in init")
        out[n] = liti_tensor(a[n].detach().cpu(), b[n].detach().cpu(), eta)
    return out


@torch.no_grad()
def merge_state_dicts(init, models: Sequence, method: str = "slerp", lam: float | None = None,
                      eta: float = 1.0) -> dict[str, torch.Tensor]:
    """In memory: `merge_tensor` over every tensor name (CPU tensors). The reference for
    `merge_checkpoints`, which computes the same thing one tensor at a time from disk."""
    dicts = [_named_tensors(x, f"merge: models[{i}]") for i, x in enumerate(models)]
    if not dicts:
        raise ValueError("merge: expected at least one model, got none")
    base = _named_tensors(init, "merge: init") if init is not None else None
    names = _check_names(base if base is not None else dicts[0], dicts, "init" if base is not None else "model 0")
    return {n: merge_tensor(n, base[n].detach().cpu() if base is not None else None,
                            [d[n].detach().cpu() for d in dicts], method, lam, eta) for n in names}


# --- task-vector statistics -----------------------------------------------------------------------

def tensor_group(name: str) -> str:
    """The group a tensor's statistics are reported under: its name with layer indices as '*'
    (all layers' q_proj weights form one group)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


class TaskVectorStats:
    """Accumulates, per tensor group and overall, the dot products of the task vectors
    delta_m = theta_m - theta_init: their norms and the angles between them."""

    def __init__(self, num_models: int):
        self.m = num_models
        self.groups: dict[str, torch.Tensor] = {}  # group -> [M, M] Gram matrix, float64

    def add(self, name: str, init: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        if not init.is_floating_point():
            return
        deltas = torch.stack([(t.double() - init.double()).reshape(-1) for t in tensors])
        gram = deltas @ deltas.T
        for key in (tensor_group(name), "all"):
            self.groups[key] = self.groups.get(key, torch.zeros(self.m, self.m, dtype=torch.float64)) + gram

    def report(self) -> dict[str, dict]:
        """{group: {"norms": [|delta_m|], "cosine": mean pairwise cosine, "angle_deg": its angle}}."""
        out = {}
        for key, gram in self.groups.items():
            norms = gram.diagonal().clamp_min(0).sqrt()
            cosines = [float(gram[i, j] / (norms[i] * norms[j])) for i in range(self.m) for j in range(i + 1, self.m)
                       if norms[i] > 0 and norms[j] > 0]
            cosine = sum(cosines) / len(cosines) if cosines else float("nan")
            out[key] = {"norms": [round(float(v), 6) for v in norms],
                        "cosine": round(cosine, 6) if cosines else None,
                        "angle_deg": round(math.degrees(math.acos(max(-1.0, min(1.0, cosine)))), 3) if cosines else None}
        return out


def task_vector_stats(init, models: Sequence) -> dict[str, dict]:
    """In memory: `TaskVectorStats.report()` for models relative to init."""
    base = _named_tensors(init, "task_vector_stats: init")
    dicts = [_named_tensors(x, f"task_vector_stats: models[{i}]") for i, x in enumerate(models)]
    stats = TaskVectorStats(len(dicts))
    for n in _check_names(base, dicts, "init"):
        stats.add(n, base[n].detach().cpu(), [d[n].detach().cpu() for d in dicts])
    return stats.report()


# --- streaming merge of checkpoints on disk --------------------------------------------------------

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Reads one tensor at a time from a Hugging Face checkpoint directory (one safetensors file
    or shards with an index), through safetensors.safe_open, which maps the file and copies only
    the tensor asked for."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / WEIGHTS_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / WEIGHTS_NAME).exists():
            files = [WEIGHTS_NAME]
            weight_map = None
        else:
            raise ValueError(f"{self.dir}: expected a checkpoint directory with {WEIGHTS_NAME} or {WEIGHTS_INDEX}")
        self._handles = {f: safe_open(str(self.dir / f), framework="pt", device="cpu") for f in files}
        if weight_map is None:
            weight_map = {k: WEIGHTS_NAME for k in self._handles[WEIGHTS_NAME].keys()}
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.weight_map[name]].get_tensor(name)


class _ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, so the merged model is
    never held whole in memory; names the files as save_pretrained does when done."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.out_dir / WEIGHTS_NAME)
            return
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
        (self.out_dir / WEIGHTS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def materialize_checkpoint(path: str | Path, scratch_dir: str | Path) -> Path:
    """A plain checkpoint directory for `path`: itself, or, for a LoRA adapter directory, the
    adapter merged into its base model (peft) and saved under `scratch_dir`."""
    p = Path(path)
    if not (p / "adapter_config.json").exists():
        return p
    from posttrain.modeling import load_lora_merged

    out = Path(scratch_dir) / hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:16]
    if not (out / ".complete").exists():
        model, tokenizer = load_lora_merged(p)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        (out / ".complete").write_text(str(p))
    return out


_NOT_COPIED = (".safetensors", ".bin", ".pt", ".complete", WEIGHTS_INDEX, "adapter_config.json")


@torch.no_grad()
def merge_checkpoints(init_dir: str | Path | None, model_dirs: Sequence[str | Path], out_dir: str | Path,
                      method: str = "slerp", lam: float | None = None, eta: float = 1.0,
                      max_shard_bytes: int = 5 * 2**30, scratch_dir: str | Path | None = None) -> dict[str, dict]:
    """Merge checkpoints on disk tensor by tensor: `merge_tensor` for every name, written to
    `out_dir` as safetensors shards, with the config and tokenizer files of init (or model 0).

    Memory: one tensor per input plus the output shard being filled, whatever the number of
    models. LoRA adapter directories are merged into their base first (under `scratch_dir`,
    default `out_dir/../_merged_adapters`). Returns the task-vector statistics per tensor group
    (empty without init). A missing tensor or a shape mismatch is a ValueError naming it.
    """
    out_dir = Path(out_dir)
    if not model_dirs:
        raise ValueError("merge: expected at least one model, got none")
    scratch = Path(scratch_dir) if scratch_dir is not None else out_dir.parent / "_merged_adapters"
    init_path = materialize_checkpoint(init_dir, scratch) if init_dir is not None else None
    paths = [materialize_checkpoint(d, scratch) for d in model_dirs]
    init_reader = CheckpointReader(init_path) if init_path is not None else None
    readers = [CheckpointReader(p) for p in paths]
    reference = init_reader or readers[0]
    names = _check_names(reference.names(), [r.names() for r in readers], "init" if init_reader else "model 0")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.safetensors")) + list(out_dir.glob(WEIGHTS_INDEX)):
        stale.unlink()
    stats = TaskVectorStats(len(readers)) if init_reader is not None else None
    writer = _ShardWriter(out_dir, max_shard_bytes)
    for name in names:
        base = init_reader.get(name) if init_reader is not None else None
        tensors = [r.get(name) for r in readers]
        merged = merge_tensor(name, base, tensors, method, lam, eta)
        if stats is not None:
            stats.add(name, base, tensors)
        writer.add(name, merged)
        del base, tensors
    writer.close()
    source = init_path if init_path is not None else paths[0]
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(_NOT_COPIED) and not f.name.startswith("."):
            shutil.copy2(f, out_dir / f.name)
    return stats.report() if stats is not None else {}


def flat_task_vector_metrics(report: dict[str, dict]) -> dict[str, float]:
    """The statistics as flat manifest metrics: task_vectors/<group>/{angle_deg,cosine,norm_m}."""
    out: dict[str, float] = {}
    for group, values in report.items():
        prefix = "task_vectors" if group == "all" else f"task_vectors/{group}"
        if values["angle_deg"] is not None:
            out[f"{prefix}/angle_deg"] = values["angle_deg"]
            out[f"{prefix}/cosine"] = values["cosine"]
        for m, norm in enumerate(values["norms"]):
            out[f"{prefix}/norm_{m}"] = norm
    return out
