import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe file from YAML text and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text).lstrip())
        return p

    return write


@pytest.fixture
def tiny_sft():
    """A one-stage recipe: 4 SFT steps of a tiny Gemma3 on toy chat."""
    return TINY_SFT


TINY_SFT = """
name: t
output_dir: run
seed: 0
models:
  student: {tiny: {arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}
datasets:
  mix: {toy: {task: chat, n: 64, format: chat}}
stages:
  - name: sft
    kind: sft
    model: ${models.student}
    dataset: ${datasets.mix}
    max_steps: 4
    batch_size: 8
    learning_rate: 1.0e-3
    logging_steps: 1
"""
