import json

import pytest


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="in.jsonl"):
        path = tmp_path / name
        with open(path, "wb") as f:
            for row in rows:
                f.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
        return path
    return write
