import json
import sys
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path;
# the shared helpers module lives beside this file.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="in.jsonl"):
        path = tmp_path / name
        with open(path, "wb") as f:
            for row in rows:
                f.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
        return path
    return write
