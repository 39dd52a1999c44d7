"""Reading and writing row files (JSONL, Parquet, Arrow) with errors that name file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) pairs, streaming; location is `file:line` for JSONL, `file[row i]` otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json") and p.is_file():
        with open(p, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{p}:{lineno}: not a valid JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
                yield f"{p}:{lineno}", row
        return
    if suffix == ".parquet" or suffix == ".arrow" or p.is_dir():
        import datasets

        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        elif suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(p))
        else:
            ds = datasets.Dataset.from_file(str(p))
        for i, row in enumerate(ds):
            yield f"{p}[row {i}]", dict(row)
        return
    raise DataError(f"{p}: unsupported data file; expected .jsonl, .parquet, .arrow or a saved datasets directory")


def read_rows(path: str | Path) -> list[dict]:
    return [row for _, row in iter_rows(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temporary file, then rename): a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    return n


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def require_columns(row: dict, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataError(f"{where}: row is missing {', '.join(repr(c) for c in missing)}; has {sorted(row)}")
