"""The per-row part of the filter chain: parse, validate, run each filter, compute dedup keys.

`FilterChain.process` turns a chunk of raw JSONL lines into one `RowResult` per line. It is
what worker processes run; the global dedup pass and the writing happen in `pipeline`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from data_filters.config import FilterConfig
from data_filters.dedup import MinHasher, dedup_text, exact_key
from data_filters.quality import has_lone_surrogate
from data_filters.rows import Decision, InvalidRow, Rejection, Rewrite, Turn, image_parts, row_turns


class RowFilter(Protocol):
    """A filter: `__call__(row, turns) -> None (keep) | Rejection | Rewrite`.

    A filter may also define `batch(items) -> list[Decision]` over (row, turns) pairs when
    one call for many rows is cheaper (a classifier).
    """

    name: str

    def __call__(self, row: dict, turns: list[Turn]) -> Decision: ...


@dataclass(slots=True)
class RowResult:
    index: int  # 0-based position among the non-blank input lines
    line: int  # 1-based line number in its file
    source: str  # the input file
    raw: str  # the input line as text (JSON), for the audit trail
    rejection: Rejection | None = None
    output: str | None = None  # the kept row as a JSON line (raw when unchanged)
    changes: dict[str, int] = field(default_factory=dict)  # redactions by kind
    key: str | None = None  # exact-dedup hash
    signature: np.ndarray | None = None  # MinHash signature
    image_parts: int = 0  # image parts the filters passed through unread (kept rows)


def build_filters(config: FilterConfig) -> list[RowFilter]:
    """The per-row filters a config switches on, in the order they run."""
    from data_filters.decontaminate import DecontaminationFilter
    from data_filters.identity import IdentityFilter
    from data_filters.pii import PiiFilter
    from data_filters.quality import QualityFilter
    from data_filters.toxicity import ToxicityFilter

    filters: list[RowFilter] = []
    if c := config.active("quality"):
        filters.append(QualityFilter(c))
    if c := config.active("pii"):
        filters.append(PiiFilter(c))
    if c := config.active("toxicity"):
        filters.append(ToxicityFilter(c))
    if c := config.active("identity"):
        filters.append(IdentityFilter(c))
    if c := config.active("decontaminate"):
        filters.append(DecontaminationFilter(c))
    return filters


def parse_line(raw: bytes) -> tuple[Any, str, Rejection | None]:
    """(row, line as text, rejection if the line is not a valid row)."""
    row, text, _, rejection = _parse_line(raw)
    return row, text, rejection


def _parse_line(raw: bytes) -> tuple[Any, str, list[Turn] | None, Rejection | None]:
    """`parse_line` plus the row's turns (None when rejected), computed once."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, raw.decode("utf-8", "backslashreplace"), None, Rejection(
            "format", "invalid_utf8", {"byte_offset": e.start, "detail": e.reason})
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, text, None, Rejection("format", "invalid_json", {"detail": e.msg, "column": e.colno})
    try:
        turns = row_turns(row)
    except InvalidRow as e:
        return row, text, None, Rejection("format", e.reason, {"detail": e.detail})
    for i, t in enumerate(turns):
        if has_lone_surrogate(t.text):
            return row, text, None, Rejection("format", "invalid_utf8", {"turn": i, "detail": "lone surrogate"})
    return row, text, turns, None


class FilterChain:
    """Runs the per-row filters of a `FilterConfig` over chunks of JSONL lines."""

    def __init__(self, config: FilterConfig, minhash_permutations: np.ndarray | None = None):
        self.config = config
        self.filters = build_filters(config)
        d = config.active("dedup")
        self.dedup = d
        self.minhasher = MinHasher(d.num_perm, d.seed, d.ngram, minhash_permutations) if d and d.near else None

    def process(self, lines: list[tuple[int, int, str, bytes]]) -> list[RowResult]:
        """`lines` are (index, line number, source file, raw bytes) tuples."""
        results: list[RowResult] = []
        alive: list[tuple[int, dict, list[Turn]]] = []  # (position in results, row, turns)
        for index, lineno, source, raw in lines:
            row, text, turns, rejection = _parse_line(raw)
            res = RowResult(index, lineno, source, text.rstrip("\r\n"), rejection)
            results.append(res)
            if rejection is None:
                alive.append((len(results) - 1, row, turns))
        for flt in self.filters:
            if not alive:
                break
            items = [(row, turns) for _, row, turns in alive]
            decisions = flt.batch(items) if hasattr(flt, "batch") else [flt(r, t) for r, t in items]
            still = []
            for (pos, row, turns), decision in zip(alive, decisions):
                if isinstance(decision, Rejection):
                    results[pos].rejection = decision
                    continue
                if isinstance(decision, Rewrite) and decision.row is not None:
                    row = decision.row
                    turns = row_turns(row)
                    changes = results[pos].changes
                    for kind, n in decision.changes.items():
                        changes[kind] = changes.get(kind, 0) + n
                    results[pos].output = ""  # marks the row as rewritten
                still.append((pos, row, turns))
            alive = still
        for pos, row, turns in alive:
            res = results[pos]
            res.output = json.dumps(row, ensure_ascii=False) if res.output == "" else res.raw
            # Only a line spelling "image" (or holding a JSON escape, which could spell it)
            # can hold an image part: two substring scans instead of walking the messages.
            if "image" in res.raw or "\\u" in res.raw:
                res.image_parts = image_parts(row)
            if self.dedup and self.dedup.exact:
                res.key = exact_key(dedup_text(turns, self.dedup.prompt_only))
        if self.minhasher is not None and alive:
            # One vectorised pass for the chunk's survivors.
            signatures = self.minhasher.signatures([turns for _, _, turns in alive], self.dedup.prompt_only)
            for (pos, _, _), signature in zip(alive, signatures):
                results[pos].signature = signature  # rows of one array per chunk
        return results


def pack_results(results: list[RowResult]) -> tuple[list[tuple], np.ndarray | None]:
    """The results in a compact form for sending from a worker to the main process, which
    already holds the input lines (see `unpack_results`): no copy of each line travels back,
    and the MinHash signatures travel as one array (one small ndarray per row cost the main
    process ~16 us a row to unpickle)."""
    rows, signed = [], []
    for r in results:
        unchanged = r.output is r.raw
        rows.append((r.rejection, None if unchanged else r.output, unchanged, r.changes, r.key, r.image_parts))
        if r.signature is not None:
            signed.append(r.signature)
    return rows, (np.stack(signed) if signed else None)


def unpack_results(packed: tuple[list[tuple], np.ndarray | None],
                   lines: list[tuple[int, int, str, bytes]]) -> list[RowResult]:
    """The `RowResult`s of `pack_results(chain.process(lines))`; signatures become rows of
    the chunk's array."""
    rows, matrix = packed
    signatures = iter(matrix if matrix is not None else ())
    results = []
    for (index, lineno, source, raw), (rejection, output, unchanged, changes, key, images) in zip(lines, rows):
        # As `parse_line` decodes: valid UTF-8 decodes the same with or without the handler.
        text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
        res = RowResult(index, lineno, source, text, rejection, text if unchanged else output, changes, key,
                        image_parts=images)
        if rejection is None and matrix is not None:
            res.signature = next(signatures)
        results.append(res)
    return results
