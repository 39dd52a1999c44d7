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
# The same mapping for ASCII text as a bytes table that also lower-cases: `bytes.translate`
# is a table lookup per byte, `str.translate` a dict lookup per character (~4 us per turn).
_ASCII_TABLE = bytes(
    32 if chr(b) in _SEPARATORS and chr(b) != "_" else b + 32 if 65 <= b <= 90 else b
    for b in range(256))
_BASE = np.uint64(1099511628211)  # an odd 64-bit multiplier (the FNV prime)


# The ASCII characters that are neither word characters, white space nor separators: the
# only ones that can end a regex word (\b) inside one of `words`' tokens.
_ODD_ASCII = bytes([*range(0x00, 0x09), *range(0x0e, 0x1c), 0x7f])


def has_odd_ascii(text: str) -> bool:
    """Whether ASCII `text` holds one of `_ODD_ASCII`: deleting them with bytes.translate
    is a C loop, ~5x faster than a regex search or `str.isprintable`."""
    return len(text.encode("ascii").translate(None, _ODD_ASCII)) != len(text)


_NOT_PRINTABLE_ASCII = bytes([*range(0x00, 0x20), 0x7f])


def is_printable_ascii(text: str) -> bool:
    """`text.isprintable()` for ASCII `text`, by the same bytes.translate deletion as
    `has_odd_ascii` (`str.isprintable` looks every character up in the Unicode tables)."""
    return len(text.encode("ascii").translate(None, _NOT_PRINTABLE_ASCII)) == len(text)


@lru_cache(maxsize=8192)
def words(text: str) -> tuple[str, ...]:
    """Lower-cased word tokens of `text`."""
    if text.isascii():
        # str.split after decoding: it splits on \x1c-\x1f too, bytes.split does not.
        return tuple(text.encode("ascii").translate(_ASCII_TABLE).decode("ascii").split())
    return tuple(text.lower().translate(_TO_SPACE).split())


@lru_cache(maxsize=8192)
def word_set(text: str) -> frozenset[str]:
    return frozenset(words(text))


_HASH_CACHE: dict[str, int] = {}
_HASH_CACHE_MAX = 2_000_000  # words are Zipf-distributed: a dict hit is ~8x cheaper than hashing


def _hash_word(w: str) -> int:
    h = _HASH_CACHE[w] = xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass"))
    return h


def word_hashes(ws) -> np.ndarray:
    """64-bit xxhash of each word, identical in every process."""
    try:  # all words seen before (the usual case): one C-level pass
        return np.fromiter(map(_HASH_CACHE.__getitem__, ws), dtype=np.uint64, count=len(ws))
    except KeyError:
        pass
    if len(_HASH_CACHE) + len(ws) > _HASH_CACHE_MAX:
        _HASH_CACHE.clear()
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


def concatenated(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The arrays end to end, and the index of the array each position came from."""
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint64)
    return flat, np.repeat(np.arange(len(arrays)), lengths)


def windowed_ngram_hashes(flat: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`ngram_hashes` of many sequences at once: (start positions, hashes) of the n-grams of
    `flat` that lie inside one sequence (`owner[p]` names the sequence of position p).

    One numpy pass per chunk of rows instead of one per text: the per-call overhead of
    numpy, not the arithmetic, dominated with ~100-word texts.
    """
    grams = ngram_hashes(flat, n)
    starts = np.flatnonzero(owner[:len(grams)] == owner[n - 1:]) if len(grams) else np.empty(0, np.int64)
    return starts, grams[starts]
