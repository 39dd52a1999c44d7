"""Completions arrive as plain strings or, in TRL's conversational format, as message lists."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of the last assistant turn of a completion (or the string itself)."""
    if isinstance(completion, list):
        for m in reversed(completion):
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant":
                return str(m.get("content", ""))
        return ""
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)
