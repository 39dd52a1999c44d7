"""A quick teacher for the distillation tests: the tiny Gemma3 after a short SFT on toy math."""

from __future__ import annotations

import pytest
from quick_training import quick_sft


@pytest.fixture(scope="session")
def math_teacher_dir(tmp_path_factory, tiny_gemma3_dir):
    out = tmp_path_factory.mktemp("math_teacher")
    quick_sft(tiny_gemma3_dir, out, steps=25)
    return out
