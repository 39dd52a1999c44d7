"""Completion markers: a directory is finished when its `manifest.json` says so.

One scheme for everything that must not be taken for complete while half-written: a recipe's
stages (the runner), warp's inner rl runs, merges and LITI points, and reward_model's members.
The manifest is written last and atomically (a temporary file, then a rename), so a directory
killed at any point before holds no manifest, or one whose `status` is not `complete`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from posttrain.data import write_json

MANIFEST = "manifest.json"
COMPLETE = "complete"


def read_manifest(directory: str | Path) -> dict | None:
    """The directory's manifest, whatever its status; None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Write the directory's manifest atomically; call it last, once everything it vouches for is on disk."""
    write_json(Path(directory) / MANIFEST, manifest)


def completed(directory: str | Path) -> dict | None:
    """The directory's manifest when it says complete, else None."""
    manifest = read_manifest(directory)
    return manifest if manifest is not None and manifest.get("status") == COMPLETE else None


def mark_complete(directory: str | Path, **fields: Any) -> dict:
    """Declare the directory complete: a manifest with status complete, the end time and `fields`."""
    manifest = {"status": COMPLETE, "ended": time.time(), **fields}
    write_manifest(directory, manifest)
    return manifest
