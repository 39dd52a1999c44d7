"""The libraries at the bottom stand alone: rewards/ and data_filters/ import nothing of posttrain,
posttrain/losses/ imports only torch, the standard library and its siblings; the reward-model
reward works in a process where posttrain cannot be imported, given a pair encoder."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved to their package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found.append((node.lineno, f"{base}.{node.module or ''}".strip(".") if node.level else node.module))
    return found


@pytest.mark.parametrize("library", ["rewards", "data_filters"])
def test_a_standalone_library_imports_nothing_of_posttrain(library):
    offending = [f"{path.relative_to(ROOT)}:{line}: {module}" for path in sorted((ROOT / library).rglob("*.py"))
                 for line, module in _imports(path) if module == "posttrain" or module.startswith("posttrain.")]
    assert not offending, offending


def test_the_losses_import_only_torch_the_standard_library_and_each_other():
    offending = []
    for path in sorted((ROOT / "posttrain" / "losses").rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            allowed = (top in sys.stdlib_module_names or top in ("__future__", "torch")
                       or module == "posttrain.losses" or module.startswith("posttrain.losses."))
            if not allowed:
                offending.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offending, offending


# Run in a fresh interpreter where any import of posttrain fails, as for a user of rewards/ alone.
STANDALONE = r'''
import importlib.abc, json, sys

class NoPosttrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "posttrain" or name.startswith("posttrain."):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoPosttrain())
from rewards import load_reward
from rewards.reward_model import RewardModelScorer, use_pair_encoder

checkpoint = sys.argv[1]
try:
    RewardModelScorer([checkpoint])
    no_encoder = None
except ValueError as e:
    no_encoder = str(e)

def chat_template_encoder(tokenizer):
    def encode(prompt, completion, max_length):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]
    return encode

given = RewardModelScorer([checkpoint], encode_pair=chat_template_encoder).score(["Hi"], ["Hello"])
use_pair_encoder(chat_template_encoder)  # the default of every scorer from here on, the recipe reward's too
reward = load_reward("reward_model")
scores = reward(["What is 2+2?", "Hi"], ["4", "Hello"], checkpoints=[checkpoint])
print(json.dumps({"no_encoder": no_encoder, "scores": scores, "given": given,
                  "posttrain_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "posttrain")}))
'''


def test_the_reward_model_reward_scores_where_posttrain_cannot_be_imported(tiny_reward_model_dir, tmp_path):
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    done = subprocess.run([sys.executable, str(script), str(tiny_reward_model_dir)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["posttrain_loaded"] == []
    assert "use_pair_encoder" in result["no_encoder"]  # told how to give one, not a crash inside tokenisation
    assert len(result["scores"]) == 2 and all(isinstance(s, float) for s in result["scores"])
    assert result["given"] == pytest.approx(result["scores"][1:])  # the same encoder, given or installed
