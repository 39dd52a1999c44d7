"""Shared fixtures: a locally trained tokenizer and tiny models of real architectures."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path;
# tiny_recipes.py (recipe text the tests share) lives beside this file.
sys.path.insert(0, str(Path(__file__).parent))

from tiny_recipes import recipe_header  # noqa: E402


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory):
    from posttrain.toy.tokenizer import build_toy_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    build_toy_tokenizer(d, seed=0)
    return d


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tokenizer_dir):
    from posttrain.modeling import load_tokenizer

    return load_tokenizer(toy_tokenizer_dir)


def _tiny(tmp_path_factory, tokenizer, name, **spec):
    from posttrain.toy.models import TinyModelSpec, build_tiny_model

    d = tmp_path_factory.mktemp(name)
    build_tiny_model(TinyModelSpec(**spec), tokenizer, d)
    return d


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory, toy_tokenizer):
    """Randomly initialised Gemma3ForCausalLM (hidden 128, 2 layers, head_dim 32)."""
    return _tiny(tmp_path_factory, toy_tokenizer, "tiny_gemma3", arch="gemma3")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, toy_tokenizer):
    return _tiny(tmp_path_factory, toy_tokenizer, "tiny_llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, toy_tokenizer):
    return _tiny(tmp_path_factory, toy_tokenizer, "tiny_qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, toy_tokenizer):
    """Gemma3 sequence classifier with one output (a reward model)."""
    return _tiny(tmp_path_factory, toy_tokenizer, "tiny_rm", arch="gemma3", head="sequence_classification")


@pytest.fixture(scope="session")
def launch_ranks():
    """Run `python ARGS...` as `ranks` real processes (torchrun, gloo on the CPU) or, for one rank,
    as a plain process outside any launcher; asserts it exits 0 and returns the CompletedProcess."""
    import subprocess
    import sys

    def launch(args: list[str], ranks: int, cwd, timeout: int = 300):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # a launch from inside a launched process starts its own world
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                    if ranks > 1 else [sys.executable])
        done = subprocess.run(launcher + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    return launch


# --- recipes written by tests ----------------------------------------------------------------------


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


TINY_SFT = recipe_header("t", datasets={"mix": "{toy: {task: chat, n: 64, format: chat}}"}) + """  - name: sft
    kind: sft
    model: ${models.student}
    dataset: ${datasets.mix}
    max_steps: 4
    batch_size: 8
    learning_rate: 1.0e-3
    logging_steps: 1
"""
