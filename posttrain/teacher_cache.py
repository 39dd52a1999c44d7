"""An offline teacher cache: per-token sparse teacher targets stored once, read many times.

A large teacher scores a dataset once (typically on another machine); the student then trains
from the stored targets without loading the teacher. Per scored position the cache keeps K
token ids (int32) and K target probabilities (float16), as the Gemma 3 report's sampled-logit
distillation needs, instead of a full vocabulary row: 6 K bytes instead of 4 V (fp32) or 2 V
(bf16) bytes per token.

Layout of a cache directory:
    index.json           format name, version, what was sampled and how, tokenizer fingerprint,
                         the list of shards with their sizes and sha256; written last
    shard-00000.safetensors ...
Each shard holds, for its sequences concatenated:
    input_ids    int32 [tokens]          the full sequences (prompt + completion)
    loss_mask    uint8 [tokens]          1 on tokens the student is trained to predict
    seq_offsets  int64 [sequences + 1]   token offsets of each sequence
    target_ids   int32 [positions, K]    one row per predicted token (loss_mask == 1), in order
    target_probs float16 [positions, K]  target distribution over target_ids (EMPTY_SLOT ids have 0)
Row j of a sequence's targets is the teacher's target for its j-th masked token, i.e. the
distribution read off the logits one position earlier. A shard whose sequences were scored with
images (a composite teacher's image rows) also holds, in its safetensors metadata under "images",
a JSON object mapping each such sequence's position in the shard to its image parts
(`{"type": "image", "path": ...}`, posttrain.chat), in the order its image tokens stand for them.

Writes are atomic: every shard goes through a temporary file and a rename, and index.json is
written last, so a directory without index.json is an unfinished cache, never a valid one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

FORMAT = "posttrain-teacher-cache"
VERSION = 1
INDEX = "index.json"


class TeacherCacheError(ValueError):
    """A cache that is missing, unfinished, corrupt, or made for another tokenizer or setting."""


@dataclass
class CachedSequence:
    input_ids: torch.Tensor     # int64 [length]
    loss_mask: torch.Tensor     # int64 [length]
    target_ids: torch.Tensor    # int32 [masked tokens, K]
    target_probs: torch.Tensor  # float16 [masked tokens, K]
    images: list[dict] | None = None  # the image parts its image tokens stand for (None: text only)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and special tokens: equal fingerprints mean ids mean the same text."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def bytes_per_token(k: int) -> int:
    """Bytes one scored position takes in the cache: K int32 ids + K float16 probabilities."""
    return k * (4 + 2)


def full_row_bytes(vocab_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one full-vocabulary row (fp32 by default, 2 for bf16/fp16)."""
    return vocab_size * dtype_bytes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TeacherCacheWriter:
    """Append scored sequences, then `close()` to write the index. Use as a context manager."""

    def __init__(self, path: str | Path, k: int, vocab_size: int, metadata: dict[str, Any] | None = None,
                 shard_size: int = 1024):
        self.path = Path(path)
        if (self.path / INDEX).exists():
            raise TeacherCacheError(f"{self.path}: a finished teacher cache is already here; choose another directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.k, self.vocab_size, self.shard_size = k, vocab_size, shard_size
        self.metadata = dict(metadata or {})
        self._shards: list[dict] = []
        self._pending: list[CachedSequence] = []
        self._num_tokens = self._num_positions = 0
        self._closed = False

    def add(self, input_ids: Sequence[int] | torch.Tensor, loss_mask: Sequence[int] | torch.Tensor,
            target_ids: torch.Tensor, target_probs: torch.Tensor, images: list[dict] | None = None) -> None:
        """One scored sequence; `images`: the image parts it was scored with (JSON: paths, not pixels)."""
        ids = torch.as_tensor(input_ids, dtype=torch.int64).reshape(-1)
        mask = torch.as_tensor(loss_mask, dtype=torch.int64).reshape(-1)
        n_masked = int((mask != 0).sum())
        if ids.shape != mask.shape:
            raise TeacherCacheError(f"input_ids and loss_mask differ in length ({ids.numel()} vs {mask.numel()})")
        if mask.numel() and mask[0] != 0:
            raise TeacherCacheError("loss_mask[0] is set, but the first token has no earlier position to predict it")
        if tuple(target_ids.shape) != (n_masked, self.k) or target_probs.shape != target_ids.shape:
            raise TeacherCacheError(f"targets: expected shape ({n_masked}, {self.k}) (masked tokens, K), got ids "
                                    f"{tuple(target_ids.shape)} and probs {tuple(target_probs.shape)}")
        if images:
            try:
                json.dumps(images)
            except TypeError:
                raise TeacherCacheError("images: the cache stores image parts as JSON (a 'path' to the file); "
                                        "an image held in memory cannot be stored") from None
        self._pending.append(CachedSequence(ids, mask, target_ids.to(torch.int32).cpu(),
                                            target_probs.to(torch.float16).cpu(), list(images) if images else None))
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        seqs, self._pending = self._pending, []
        lengths = torch.tensor([0] + [s.input_ids.numel() for s in seqs])
        tensors = {
            "input_ids": torch.cat([s.input_ids for s in seqs]).to(torch.int32),
            "loss_mask": torch.cat([s.loss_mask for s in seqs]).to(torch.uint8),
            "seq_offsets": lengths.cumsum(0).to(torch.int64),
            "target_ids": torch.cat([s.target_ids for s in seqs]).contiguous(),
            "target_probs": torch.cat([s.target_probs for s in seqs]).contiguous(),
        }
        name = f"shard-{len(self._shards):05d}.safetensors"
        final = self.path / name
        tmp = final.with_name(name + ".tmp")
        images = {str(i): s.images for i, s in enumerate(seqs) if s.images}
        save_file(tensors, str(tmp), metadata={"images": json.dumps(images)} if images else None)
        os.replace(tmp, final)
        n_tokens, n_positions = int(tensors["input_ids"].numel()), int(tensors["target_ids"].shape[0])
        self._shards.append({"file": name, "num_sequences": len(seqs), "num_tokens": n_tokens,
                             "num_positions": n_positions, "num_image_sequences": len(images),
                             "sha256": _sha256(final)})
        self._num_tokens += n_tokens
        self._num_positions += n_positions

    def close(self) -> dict:
        """Flush the last shard and write index.json (last, atomically); returns the index."""
        from posttrain.data import write_json

        if self._closed:
            return self.index
        self._flush()
        positions = max(self._num_positions, 1)
        stored = sum((self.path / s["file"]).stat().st_size for s in self._shards)
        self.index = {
            "format": FORMAT, "version": VERSION, "k": self.k, "vocab_size": self.vocab_size,
            **self.metadata,
            "num_sequences": sum(s["num_sequences"] for s in self._shards),
            "num_tokens": self._num_tokens, "num_positions": self._num_positions,
            "num_image_sequences": sum(s["num_image_sequences"] for s in self._shards),
            "target_bytes_per_position": bytes_per_token(self.k),
            "full_row_bytes_fp32": full_row_bytes(self.vocab_size, 4),
            "full_row_bytes_bf16": full_row_bytes(self.vocab_size, 2),
            "stored_bytes": stored,
            "stored_bytes_per_position": round(stored / positions, 2),
            "shards": self._shards,
        }
        write_json(self.path / INDEX, self.index)
        self._closed = True
        return self.index

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class TeacherCache:
    """Read a finished cache: `len(cache)`, `cache[i] -> CachedSequence`, iteration.

    Opening checks the index (format, version, shard files present and of the recorded sizes);
    `verify=True` also checks every shard's sha256. `expect` maps index keys to required values
    (for example the student tokenizer's fingerprint, or K) and names any that differ.
    """

    def __init__(self, path: str | Path, verify: bool = False, expect: dict[str, Any] | None = None):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not self.path.is_dir():
            raise TeacherCacheError(f"{self.path}: teacher cache directory not found")
        if not index_path.exists():
            raise TeacherCacheError(f"{index_path}: missing; the cache was not finished (index.json is written last)")
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise TeacherCacheError(f"{index_path}: not valid JSON ({e})") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise TeacherCacheError(f"{index_path}: expected format {FORMAT!r} version {VERSION}, got "
                                    f"{self.index.get('format')!r} version {self.index.get('version')!r}")
        for key, value in (expect or {}).items():
            if self.index.get(key) != value:
                raise TeacherCacheError(f"{index_path}: {key} is {self.index.get(key)!r}, expected {value!r}")
        self._starts: list[int] = []
        total = 0
        for i, shard in enumerate(self.index["shards"]):
            f = self.path / shard["file"]
            if not f.exists():
                raise TeacherCacheError(f"{index_path}: shards[{i}] file {shard['file']} is missing")
            if verify and _sha256(f) != shard["sha256"]:
                raise TeacherCacheError(f"{f}: sha256 differs from the one in index.json; the shard is corrupt")
            self._starts.append(total)
            total += shard["num_sequences"]
        self._len = total
        self._loaded: tuple[int, dict[str, torch.Tensor], dict[int, list[dict]]] | None = None

    @property
    def k(self) -> int:
        return int(self.index["k"])

    @property
    def image_sequences(self) -> int:
        """How many sequences were scored with images (0 for a cache written before images)."""
        return int(self.index.get("num_image_sequences", 0))

    def __len__(self) -> int:
        return self._len

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if self._loaded is None or self._loaded[0] != s:
            f = self.path / self.index["shards"][s]["file"]
            try:
                tensors = load_file(str(f))
                with safe_open(str(f), "pt") as handle:
                    images = json.loads((handle.metadata() or {}).get("images", "{}"))
            except (SafetensorError, OSError, json.JSONDecodeError) as e:
                raise TeacherCacheError(f"{f}: cannot be read as safetensors ({e}); the shard is corrupt") from None
            meta = self.index["shards"][s]
            expected = {"input_ids": (meta["num_tokens"],), "seq_offsets": (meta["num_sequences"] + 1,),
                        "target_ids": (meta["num_positions"], self.k), "target_probs": (meta["num_positions"], self.k)}
            for key, shape in expected.items():
                if key not in tensors or tuple(tensors[key].shape) != shape:
                    got = tuple(tensors[key].shape) if key in tensors else "missing"
                    raise TeacherCacheError(f"{f}: tensor {key} should have shape {shape}, got {got}; the shard is corrupt")
            # Row offset of each sequence's targets: masked tokens of the sequences before it.
            masked = torch.cat([torch.zeros(1, dtype=torch.int64), (tensors["loss_mask"] != 0).to(torch.int64).cumsum(0)])
            tensors["row_offsets"] = masked[tensors["seq_offsets"]]
            self._loaded = (s, tensors, {int(k): v for k, v in images.items()})
        return self._loaded[1]

    def __getitem__(self, i: int) -> CachedSequence:
        if not 0 <= i < self._len:
            raise IndexError(f"teacher cache has {self._len} sequences; index {i} is out of range")
        s = max(j for j, start in enumerate(self._starts) if start <= i)
        t = self._shard(s)
        local = i - self._starts[s]
        a, b = int(t["seq_offsets"][local]), int(t["seq_offsets"][local + 1])
        mask = t["loss_mask"][a:b].to(torch.int64)
        rows = slice(int(t["row_offsets"][local]), int(t["row_offsets"][local + 1]))
        return CachedSequence(t["input_ids"][a:b].to(torch.int64), mask, t["target_ids"][rows], t["target_probs"][rows],
                              self._loaded[2].get(local))

    def __iter__(self) -> Iterator[CachedSequence]:
        for i in range(self._len):
            yield self[i]


def scatter_targets(cached: Sequence[CachedSequence], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [batch, length - 1, K] target tensors aligned with shifted logits (position n predicts n + 1).

    Sequences are right-padded to `length`; positions without a target get EMPTY_SLOT ids.
    """
    from posttrain.losses.distillation import EMPTY_SLOT

    k = cached[0].target_ids.shape[-1]
    ids = torch.full((len(cached), length - 1, k), EMPTY_SLOT, dtype=torch.int32)
    probs = torch.zeros((len(cached), length - 1, k), dtype=torch.float16)
    for b, seq in enumerate(cached):
        predicted = (seq.loss_mask[1:] != 0).nonzero().squeeze(-1)  # logit positions whose next token is trained
        ids[b, predicted] = seq.target_ids
        probs[b, predicted] = seq.target_probs
    return ids, probs
