"""Global deduplication: exact (hash of normalised text) and near (MinHash LSH, datasketch).

Signatures are computed where the rows are (in worker processes, or on each machine);
`Deduplicator` then sees every signature in input order in one place and keeps the first
row of each group, which makes the result independent of how rows were split up.
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np

from data_filters.config import DedupConfig
from data_filters.rows import Rejection, Turn, prompt_turns
from data_filters.text import (concatenated, is_printable_ascii, ngram_hashes, text_word_hashes,
                               windowed_ngram_hashes, word_hashes)

# datasketch's 32-bit scheme: signatures are uint32, half the memory of the 64-bit one.
SCHEME = "affine32"


def normalize(text: str) -> str:
    """Case-folded, NFKC-normalised, whitespace collapsed."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    elif is_printable_ascii(text) and "  " not in text and text[:1] != " " and text[-1:] != " ":
        # Printable ASCII has no white space but " ": single-spaced text is already collapsed
        # (split and join cost ~4 us per turn).
        return text.lower()
    return " ".join(text.lower().split())


def dedup_text(turns: list[Turn], prompt_only: bool = False) -> str:
    """The text two rows are compared on: role-tagged normalised turns."""
    chosen = prompt_turns(turns) if prompt_only else turns
    return "\n".join(f"{t.role}: {normalize(t.text)}" for t in chosen)


def exact_key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def shingle_hashes(turns: list[Turn], n: int, prompt_only: bool = False) -> list[int]:
    """32-bit hashes of the distinct word n-gram shingles of the role-tagged turns (lower
    case, punctuation dropped); a row shorter than n words is one shingle."""
    chosen = prompt_turns(turns) if prompt_only else turns
    parts = []
    for t in chosen:
        parts.append(word_hashes((t.role + ":",)))
        parts.append(text_word_hashes(t.text))
    hashes = np.concatenate(parts) if parts else np.zeros(1, dtype=np.uint64)
    grams = ngram_hashes(hashes, min(n, len(hashes)))
    return np.unique(grams & np.uint64(0xFFFFFFFF)).tolist()


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, the pre-mix datasketch's affine32 scheme applies to
    every input hash before its permutations (tested against datasketch)."""
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


# Shingles per block when applying the permutations: a (num_perm, block) uint32 array of
# 2 MiB stays in cache.
_BLOCK_SHINGLES = 4096


class MinHasher:
    """MinHash signatures with datasketch's affine32 permutations, drawn once.

    The permutations come from `datasketch.MinHash`; applying them is done here for a whole
    chunk of rows at once: datasketch's `update_batch` runs the hash function and builds its
    input array in Python for every shingle of every row, which cost more than the hashing.
    `signature(turns)` equals `MinHash(..., hashfunc=identity).update_batch(shingles)`.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5,
                 permutations: np.ndarray | None = None):
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        # Worker processes get `permutations` from their parent, which spares each of them
        # importing datasketch (~0.4 CPU-s, scipy included).
        a, b = permutations if permutations is not None else self.permutations(num_perm, seed)
        self._a, self._b = a.astype(np.uint32), b.astype(np.uint32)
        self._role_hashes: dict[str, np.ndarray] = {}
        self._scratch = np.empty((num_perm, _BLOCK_SHINGLES), dtype=np.uint32)

    @staticmethod
    def permutations(num_perm: int, seed: int) -> np.ndarray:
        """datasketch's (a, b) permutation parameters for `num_perm` and `seed`, shape (2, num_perm)."""
        from datasketch import MinHash

        return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations

    def signature(self, turns: list[Turn], prompt_only: bool = False) -> np.ndarray:
        return self.signatures([turns], prompt_only)[0]

    def _role_hash(self, role: str) -> np.ndarray:
        h = self._role_hashes.get(role)
        if h is None:
            h = self._role_hashes[role] = word_hashes((role + ":",))
        return h

    def signatures(self, rows: list[list[Turn]], prompt_only: bool = False) -> np.ndarray:
        """One signature per row, shape (rows, num_perm), dtype uint32."""
        # The word hashes of each row's role-tagged turns, as in `shingle_hashes`, end to end.
        parts: list[np.ndarray] = []
        part_row: list[int] = []
        for r, turns in enumerate(rows):
            chosen = prompt_turns(turns) if prompt_only else turns
            if not chosen:
                parts.append(np.zeros(1, dtype=np.uint64))
                part_row.append(r)
            for t in chosen:
                parts.append(self._role_hash(t.role))
                parts.append(text_word_hashes(t.text))
                part_row += (r, r)
        flat, part_of = concatenated(parts)
        owner = np.array(part_row, dtype=np.int64)[part_of]
        row_start = np.searchsorted(owner, np.arange(len(rows) + 1))
        starts, grams = windowed_ngram_hashes(flat, owner, self.ngram)
        shingle_row = owner[starts]
        # A row shorter than n words is one shingle (all its words).
        row_len = np.diff(row_start)
        short = np.flatnonzero(row_len < self.ngram).tolist()
        if short:
            extra = np.concatenate([ngram_hashes(flat[row_start[r]:row_start[r + 1]], int(row_len[r]))
                                    for r in short])
            grams = np.concatenate([grams, extra])
            shingle_row = np.concatenate([shingle_row, np.array(short, dtype=shingle_row.dtype)])
            order = np.argsort(shingle_row, kind="stable")
            grams, shingle_row = grams[order], shingle_row[order]
        # Every row now has at least one shingle, its shingles contiguous and in row order.
        values = _fmix32((grams & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        first = np.flatnonzero(np.r_[True, shingle_row[1:] != shingle_row[:-1]])
        out = np.empty((len(rows), self.num_perm), dtype=np.uint32)
        a, b = self._a[:, None], self._b[:, None]
        # Blocks of whole rows of about _BLOCK_SHINGLES shingles; permutations along the
        # first axis so that the per-row minimum runs over contiguous memory (7x faster).
        bounds = np.r_[first, len(values)]
        r = 0
        while r < len(rows):
            end_row = max(r + 1, int(np.searchsorted(bounds, bounds[r] + _BLOCK_SHINGLES, "right")) - 1)
            end_row = min(end_row, len(rows))
            lo, hi = bounds[r], bounds[end_row]
            # Permuted value = a * h + b mod 2^32, written into a reused buffer (a fresh
            # 2 MiB array per block cost a third of the arithmetic in page faults).
            block = self._scratch[:, :hi - lo] if hi - lo <= _BLOCK_SHINGLES else None
            block = np.multiply(a, values[None, lo:hi], out=block)
            np.add(block, b, out=block)
            out[r:end_row] = np.minimum.reduceat(block, bounds[r:end_row] - lo, axis=1).T
            r = end_row
        return out


class Deduplicator:
    """Feed rows in input order; says whether each repeats an earlier kept row."""

    name = "dedup"

    def __init__(self, config: DedupConfig):
        from datasketch import LeanMinHash, MinHashLSH

        self._lean = LeanMinHash
        self.config = config
        self._exact: dict[str, int] = {}
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm) if config.near else None
        self._signatures: dict[int, np.ndarray] = {}

    def check(self, index: int, key: str | None, signature: np.ndarray | None) -> Rejection | None:
        """None (and remember the row) if `index` is new, else a Rejection naming the original."""
        if self.config.exact and key is not None:
            first = self._exact.get(key)
            if first is not None:
                return Rejection(self.name, "exact_duplicate", {"duplicate_of": first})
        if self._lsh is not None and signature is not None:
            lean = self._lean(seed=self.config.seed, hashvalues=signature, scheme=SCHEME)
            best, best_sim = None, 0.0
            for other in self._lsh.query(lean):
                sim = float(np.mean(self._signatures[other] == signature))
                if sim >= self.config.threshold and (sim > best_sim or sim == best_sim and other < best):
                    best, best_sim = other, sim
            if best is not None:
                return Rejection(self.name, "near_duplicate",
                                 {"duplicate_of": best, "estimated_jaccard": round(best_sim, 3)})
            self._lsh.insert(index, lean, check_duplication=False)
            self._signatures[index] = signature
        if self.config.exact and key is not None:
            self._exact[key] = index
        return None
