"""A quick full-precision model for the QAT tests: the tiny Gemma3 after a short SFT on toy math."""

from __future__ import annotations

import pytest
from quick_training import quick_sft, write_toy_sets


@pytest.fixture(scope="session")
def full_precision_dir(tmp_path_factory, tiny_gemma3_dir):
    out = tmp_path_factory.mktemp("qat_full_precision")
    quick_sft(tiny_gemma3_dir, out, steps=30)
    return out


@pytest.fixture(scope="session")
def qat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat_data")
    write_toy_sets(d, {"math_chat": ("math", 64, 1, "train", "chat"), "chat_chat": ("chat", 64, 1, "train", "chat"),
                       "math_eval": ("math", 12, 2, "eval", "prompt")})
    return d
