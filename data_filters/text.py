"""Word tokens and word n-gram hashes shared by the filters, computed once per text.

Tokens are lower-cased, split on whitespace and punctuation with `str.translate` and
`str.split` (several times faster than a `\\w+` regex in CPython). N-gram hashes combine
per-word xxhash values with a polynomial in numpy, so they are identical in every process
and on every machine (Python's `hash` of a str is salted per process).
"""

from __future__ import annotations

import string
from functools import lru_cache

import numpy as np
import xxhash

_SEPARATORS = string.punctuation + "\u00a0\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00ab\u00bb\u3001\u3002\uff01\uff0c\uff1f\uff1a\uff1b"
_TO_SPACE = str.maketrans({ch: " " for ch in _SEPARATORS if ch != "_"})
_BASE = np.uint64(1099511628211)  # an odd 64-bit multiplier (the FNV prime)


@lru_cache(maxsize=8192)
def words(text: str) -> tuple[str, ...]:
    """Lower-cased word tokens of `text`."""
    return tuple(text.lower().translate(_TO_SPACE).split())


@lru_cache(maxsize=8192)
def word_set(text: str) -> frozenset[str]:
    return frozenset(words(text))


_HASH_CACHE: dict[str, int] = {}
_HASH_CACHE_MAX = 2_000_000  # words are Zipf-distributed: a dict hit is ~8x cheaper than hashing


def _hash_word(w: str) -> int:
    if len(_HASH_CACHE) >= _HASH_CACHE_MAX:
        _HASH_CACHE.clear()
    h = _HASH_CACHE[w] = xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass"))
    return h


def word_hashes(ws) -> np.ndarray:
    """64-bit xxhash of each word, identical in every process."""
    cache = _HASH_CACHE
    return np.array([cache[w] if w in cache else _hash_word(w) for w in ws], dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every run of `n` consecutive words (uint64 arithmetic wraps)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    out = hashes[:m].copy()
    for k in range(1, n):
        out *= _BASE
        out += hashes[k:k + m]
    return out


@lru_cache(maxsize=8192)
def text_word_hashes(text: str) -> np.ndarray:
    """`word_hashes(words(text))`, cached: decontamination and dedup read the same turns."""
    return word_hashes(words(text))
