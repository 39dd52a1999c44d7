"""Global deduplication: exact (hash of normalised text) and near (MinHash LSH, datasketch).

Signatures are computed where the rows are (in worker processes, or on each machine);
`Deduplicator` then sees every signature in input order in one place and keeps the first
row of each group, which makes the result independent of how rows were split up.
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from data_filters.config import DedupConfig
from data_filters.rows import Rejection, Turn, prompt_turns
from data_filters.text import ngram_hashes, text_word_hashes, word_hashes

# datasketch's 32-bit scheme: signatures are uint32, half the memory of the 64-bit one.
SCHEME = "affine32"


def normalize(text: str) -> str:
    """Case-folded, NFKC-normalised, whitespace collapsed."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
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


def _identity(value: int) -> int:
    return value


class MinHasher:
    """MinHash signatures with permutations drawn once (datasketch draws them per object)."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5):
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        self._template = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME)
        # Shingles arrive already hashed (vectorised in numpy); datasketch's default hashes
        # each shingle with SHA-1 in Python, the bottleneck of a naive implementation.
        self._hashfunc = _identity

    def signature(self, turns: list[Turn], prompt_only: bool = False) -> np.ndarray:
        m = MinHash(num_perm=self.num_perm, seed=self.seed, scheme=SCHEME,
                    permutations=self._template.permutations, hashfunc=self._hashfunc)
        m.update_batch(shingle_hashes(turns, self.ngram, prompt_only))
        return m.hashvalues.astype(np.uint32, copy=False)


class Deduplicator:
    """Feed rows in input order; says whether each repeats an earlier kept row."""

    name = "dedup"

    def __init__(self, config: DedupConfig):
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
            lean = LeanMinHash(seed=self.config.seed, hashvalues=signature, scheme=SCHEME)
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
