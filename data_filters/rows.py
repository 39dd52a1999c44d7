"""The row shapes filters understand, and the decision a filter returns for a row.

Four shapes are accepted (extra keys are kept untouched):

- chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": str | text parts}, ...]}
- completion:  {"prompt": str | messages, "completion": str | messages}
- preference:  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
- prompt only: {"prompt": str | messages}   (RL and distillation prompts)

A message's content is a string or a list of parts: text parts, `[{"type": "text", "text": str}]`,
and image parts (`{"type": "image", ...}`, for composite models). Filters read the text parts;
image parts pass through untouched (`image_parts` counts them); any other part makes the row
invalid.

A filter sees a row as a list of `Turn`s (role, text, where it lives in the row), so the same
filter code serves every shape, and a redaction can write text back in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

ROLES = ("system", "user", "assistant")
MODEL_ROLE = "assistant"


class Turn(NamedTuple):
    role: str  # system, user or assistant (assistant = a model turn)
    text: str
    path: tuple  # keys from the row down to the string, e.g. ("messages", 2, "content")


# Builds a Turn without NamedTuple's Python-level __new__ (a few percent of the whole chain).
_new_turn = tuple.__new__


@dataclass(frozen=True, slots=True)
class Rejection:
    """A filter's verdict that a row must not be kept, with what proves it."""

    filter: str
    reason: str
    evidence: Any = None  # JSON-serialisable: a matched span, a score, a duplicate's index


@dataclass(slots=True)
class Rewrite:
    """A filter's verdict that a row is kept in a changed form (for example redacted)."""

    row: dict
    changes: dict[str, int] = field(default_factory=dict)  # e.g. {"email": 2}


# What a filter returns: None (keep as is), a Rejection, or a Rewrite.
Decision = Rejection | Rewrite | None


class InvalidRow(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _message_turns(messages: Any, key: str, out: list[Turn], default_role: str | None) -> None:
    if not isinstance(messages, list):
        raise InvalidRow("wrong_type", f"`{key}` must be a string or a list of messages")
    if not messages:
        raise InvalidRow("missing_field", f"`{key}` is an empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRow("wrong_type", f"`{key}[{i}]` must be an object with role and content")
        if "role" not in msg or "content" not in msg:
            raise InvalidRow("missing_field", f"`{key}[{i}]` needs both `role` and `content`")
        role = msg["role"]
        if role not in ROLES:
            raise InvalidRow("wrong_role", f"`{key}[{i}].role` is {role!r}; expected one of {ROLES}")
        if default_role == MODEL_ROLE and role != MODEL_ROLE:
            raise InvalidRow("wrong_role", f"`{key}[{i}].role` is {role!r}; completions are assistant turns")
        content = msg["content"]
        if isinstance(content, str):
            out.append(_new_turn(Turn, (role, content, (key, i, "content"))))
        elif isinstance(content, list) and content:
            # Content parts (`[{"type": "text", "text": ...}]`, the chat templates' shape): each
            # text part is a turn of its own, so a redaction writes back into that part. Blank
            # parts beside text are left out (nothing to filter, and they are not an empty
            # answer); a message of blank parts only stays one blank turn, for the empty check.
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image":
                    continue  # kept in the row as it is; the filters judge the text beside it
                if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidRow("non_string_content",
                                     f"`{key}[{i}].content[{j}]` is a {kind!r} part; only text parts are read")
                parts.append(_new_turn(Turn, (role, part["text"], (key, i, "content", j, "text"))))
            if not parts:  # only images: nothing to read, and not an empty message
                continue
            out.extend([t for t in parts if t.text.strip()] or parts[:1])
        else:
            raise InvalidRow("non_string_content", f"`{key}[{i}].content` is {type(content).__name__}"
                             f"{' (empty)' if isinstance(content, list) else ''}, expected a string or text parts")


def _field_turns(row: dict, key: str, role: str, out: list[Turn]) -> None:
    value = row[key]
    if isinstance(value, str):
        out.append(Turn(role, value, (key,)))
    elif value is None:
        raise InvalidRow("missing_field", f"`{key}` is null")
    elif isinstance(value, list):
        _message_turns(value, key, out, role if role == MODEL_ROLE else None)
    else:
        raise InvalidRow("non_string_content",
                         f"`{key}` is {type(value).__name__}, expected a string or a list of messages")


def row_turns(row: Any) -> list[Turn]:
    """The turns of a row in reading order; raises `InvalidRow` for a malformed row."""
    if not isinstance(row, dict):
        raise InvalidRow("wrong_type", f"a row must be a JSON object, got {type(row).__name__}")
    turns: list[Turn] = []
    if "messages" in row:
        _message_turns(row["messages"], "messages", turns, None)
    elif "prompt" in row:
        _field_turns(row, "prompt", "user", turns)
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                _field_turns(row, key, MODEL_ROLE, turns)
        if "chosen" in row and "rejected" not in row or "rejected" in row and "chosen" not in row:
            raise InvalidRow("missing_field", "a preference row needs both `chosen` and `rejected`")
    else:
        raise InvalidRow("missing_field",
                         "a row needs `messages`, or `prompt` (with `completion`, or `chosen` and `rejected`)")
    return turns


def image_parts(row: dict) -> int:
    """How many image parts a row's messages hold (the filters pass them through unread)."""
    count = 0
    for key in ("messages", "prompt", "completion", "chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, list):
            for msg in value:
                content = msg.get("content") if isinstance(msg, dict) else None
                if isinstance(content, list):
                    count += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image")
    return count


def model_turns(turns: list[Turn]) -> list[Turn]:
    return [t for t in turns if t.role == MODEL_ROLE]


def prompt_turns(turns: list[Turn]) -> list[Turn]:
    """The turns before the first model turn (for a completion row: the prompt)."""
    out = []
    for t in turns:
        if t.role == MODEL_ROLE:
            break
        out.append(t)
    return out


def rewrite_texts(row: dict, turns: list[Turn], fn: Callable[[Turn], str]) -> dict | None:
    """A copy of `row` with each turn's text replaced by `fn(turn)`; None if nothing changed.

    Only the containers on the path to a changed string are copied.
    """
    new_row = None
    for turn in turns:
        new_text = fn(turn)
        if new_text == turn.text:
            continue
        if new_row is None:
            new_row = dict(row)
        path = turn.path
        if len(path) == 1:
            new_row[path[0]] = new_text
            continue
        key, i, field_name, *part = path  # part: (j, "text") inside a list of content parts
        if new_row[key] is row[key]:
            new_row[key] = list(row[key])
        if new_row[key][i] is row[key][i]:
            new_row[key][i] = dict(row[key][i])
        msg = new_row[key][i]
        if not part:
            msg[field_name] = new_text
            continue
        j, text_key = part
        if msg[field_name] is row[key][i][field_name]:
            msg[field_name] = list(msg[field_name])
        msg[field_name][j] = {**msg[field_name][j], text_key: new_text}
    return new_row
