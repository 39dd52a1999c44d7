"""Fixtures shared by the composite (vision) tests."""

from __future__ import annotations

import pytest

from posttrain.toy.models import TinyModelSpec, build_tiny_model


@pytest.fixture(scope="module")
def composite_dir(tmp_path_factory, toy_tokenizer):
    """A tiny composite Gemma 3 (language model, vision tower, projector, processor) built from
    config, once per test module. Modules that need other sizes define their own."""
    d = tmp_path_factory.mktemp("composite")
    build_tiny_model(TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                   vision={}), toy_tokenizer, d)
    return d
