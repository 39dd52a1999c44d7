"""Decontamination: drop training rows that share a word n-gram with an evaluation set.

As in GPT-3's and Gemma's reports, overlap is tested on lower-cased word n-grams (13 by
default). Every string in an evaluation example is indexed (prompt, answer, choices...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from data_filters.config import DecontaminateConfig
from data_filters.rows import Decision, Rejection, Turn
import numpy as np

from data_filters.text import (concatenated, ngram_hashes, text_word_hashes, windowed_ngram_hashes,
                               word_hashes, words)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_eval_examples(path: Path) -> Iterator[Any]:
    """Rows of a JSONL file, or the items of a JSON list (or of a dict's first list)."""
    if not path.is_file():
        raise FileNotFoundError(f"decontaminate.eval_sets: {path} does not exist; expected a "
                                "JSONL or JSON file of evaluation examples")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a list of examples") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        yield from data if isinstance(data, list) else [data]
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e}); expected one "
                                 "example per line") from None


class EvalNgramIndex:
    """Hashes of every word n-gram of the named evaluation sets, mapped to the set's name."""

    def __init__(self, eval_sets: list[str], n: int = 13):
        self.n = n
        self.names: list[str] = []
        self._index: dict[int, int] = {}  # n-gram hash -> eval set id
        for spec in eval_sets:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).stem, spec
            set_id = len(self.names)
            self.names.append(name)
            for example in read_eval_examples(Path(path)):
                for text in _strings(example):
                    for h in ngram_hashes(word_hashes(words(text)), n).tolist():
                        self._index.setdefault(h, set_id)
        self._keys = frozenset(self._index)
        # A bitmap of the n-gram hashes' low bits: one numpy gather rules out almost every
        # n-gram of a chunk; the few left are looked up in the dict (exact).
        size = 1 << max(16, min(26, (16 * len(self._index)).bit_length()))
        self._mask = np.uint64(size - 1)
        self._bitmap = np.zeros(size, dtype=bool)
        if self._index:
            keys = np.fromiter(self._index, dtype=np.uint64, count=len(self._index))
            self._bitmap[keys & self._mask] = True

    def __len__(self) -> int:
        return len(self._index)

    def find(self, text: str) -> tuple[str, str] | None:
        """(eval set name, shared n-gram) for the first overlap in `text`, or None."""
        ws = words(text)
        if len(ws) < self.n:
            return None
        grams = ngram_hashes(text_word_hashes(text), self.n).tolist()
        if self._keys.isdisjoint(grams):
            return None
        for i, h in enumerate(grams):
            set_id = self._index.get(h)
            if set_id is not None:
                return self.names[set_id], " ".join(ws[i:i + self.n])
        return None


    def find_many(self, texts: list[str]) -> list[tuple[str, str] | None]:
        """`[self.find(t) for t in texts]`, computed for all texts in one numpy pass."""
        found: list[tuple[str, str] | None] = [None] * len(texts)
        if not texts or not self._index:
            return found
        flat, owner = concatenated([text_word_hashes(t) for t in texts])
        starts, grams = windowed_ngram_hashes(flat, owner, self.n)
        maybe = np.flatnonzero(self._bitmap[grams & self._mask])
        for k, h in zip(maybe.tolist(), grams[maybe].tolist()):
            set_id = self._index.get(h)
            if set_id is None:
                continue
            p = int(starts[k])
            t = int(owner[p])
            if found[t] is None:  # the first overlap of the text, as `find` reports
                i = p - int(np.searchsorted(owner, t))
                found[t] = self.names[set_id], " ".join(words(texts[t])[i:i + self.n])
        return found


class DecontaminationFilter:
    name = "decontaminate"

    def __init__(self, config: DecontaminateConfig):
        self.config = config
        self.index = EvalNgramIndex(config.eval_sets, config.ngram)

    def batch(self, items: list[tuple[dict, list[Turn]]]) -> list[Decision]:
        decisions: list[Decision] = [None] * len(items)
        if not len(self.index):
            return decisions
        texts = [t.text for _, turns in items for t in turns]
        hits = iter(self.index.find_many(texts))
        for n, (_, turns) in enumerate(items):
            row_hits = [next(hits) for _ in turns]
            for i, hit in enumerate(row_hits):
                if hit:  # the first turn with an overlap
                    decisions[n] = Rejection(self.name, "eval_overlap",
                                             {"eval_set": hit[0], "ngram": hit[1], "turn": i})
                    break
        return decisions

    def __call__(self, row: dict, turns: list[Turn]) -> Decision:
        return self.batch([(row, turns)])[0]
