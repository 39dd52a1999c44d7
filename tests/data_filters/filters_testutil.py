"""Helpers for the data_filters tests (a uniquely named module: conftest names collide)."""

import json


def chat(user, assistant, **extra):
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}], **extra}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
