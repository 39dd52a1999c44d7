"""Format and quality checks: invalid rows, empty model turns, extreme repetition, length."""

from __future__ import annotations

import zlib
from collections import Counter

from data_filters.config import QualityConfig
from data_filters.rows import MODEL_ROLE, Decision, Rejection, Turn


def compression_ratio(text: str) -> float:
    """zlib-compressed size over raw size: about 0.3-0.5 for prose, a few percent for loops."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(zlib.compress(raw, 6)) / max(1, len(raw))


def duplicate_line_fraction(text: str) -> tuple[float, str]:
    """Share of non-empty lines that repeat an earlier line, and the most repeated line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 6:
        return 0.0, ""
    counts = Counter(lines)
    line, top = counts.most_common(1)[0]
    return (len(lines) - len(counts)) / len(lines), line


def has_lone_surrogate(text: str) -> bool:
    # JSON "\ud800" escapes decode to lone surrogates, which cannot be written as UTF-8.
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class QualityFilter:
    name = "quality"

    def __init__(self, config: QualityConfig):
        self.config = config

    def __call__(self, row: dict, turns: list[Turn]) -> Decision:
        c = self.config
        if c.max_turns is not None and len(turns) > c.max_turns:
            return Rejection(self.name, "too_many_turns", {"turns": len(turns), "max": c.max_turns})
        has_model = False
        total = 0
        for i, t in enumerate(turns):
            total += len(t.text)
            if t.role == MODEL_ROLE:
                has_model = True
                if c.reject_empty_model_turns and not t.text.strip():
                    return Rejection(self.name, "empty_model_turn", {"turn": i})
        if c.require_model_turn and "messages" in row and not has_model:
            return Rejection(self.name, "no_model_turn", {"roles": [t.role for t in turns]})
        if c.max_chars is not None and total > c.max_chars:
            return Rejection(self.name, "too_long", {"chars": total, "max": c.max_chars})
        for i, t in enumerate(turns):
            if len(t.text) < c.repetition_min_chars:
                continue
            if c.min_compression_ratio is not None:
                ratio = compression_ratio(t.text)
                if ratio < c.min_compression_ratio:
                    return Rejection(self.name, "repetition", {
                        "turn": i, "compression_ratio": round(ratio, 4), "sample": t.text[:80]})
            if c.max_duplicate_line_fraction is not None:
                frac, line = duplicate_line_fraction(t.text)
                if frac > c.max_duplicate_line_fraction:
                    return Rejection(self.name, "duplicate_lines", {
                        "turn": i, "fraction": round(frac, 3), "line": line[:80]})
        return None
