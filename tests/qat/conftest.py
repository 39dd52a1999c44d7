"""A quick full-precision model for the QAT tests: the tiny Gemma3 after a short SFT on toy math."""

from __future__ import annotations

import pytest
from quick_training import quick_sft

from posttrain.data import write_jsonl
from posttrain.toy import tasks


@pytest.fixture(scope="session")
def full_precision_dir(tmp_path_factory, tiny_gemma3_dir):
    out = tmp_path_factory.mktemp("qat_full_precision")
    quick_sft(tiny_gemma3_dir, out, steps=30)
    return out


@pytest.fixture(scope="session")
def qat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat_data")
    write_jsonl(d / "math_chat.jsonl", tasks.generate("math", 64, seed=1, fmt="chat"))
    write_jsonl(d / "chat_chat.jsonl", tasks.generate("chat", 64, seed=1, fmt="chat"))
    write_jsonl(d / "math_eval.jsonl", tasks.generate("math", 12, seed=2, split="eval", fmt="prompt"))
    return d
