"""What the reward_model stage's tests share: a one-stage recipe on a tiny Gemma3 and toy math
preference pairs, and a checkpoint's weights as a reward model."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from posttrain.stages.reward_model import load_reward_model

TINY = {"arch": "gemma3", "hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 128}


def write_recipe(root: Path, stage: dict, name: str, pairs: int, held_out: int, models: dict | None = None) -> Path:
    """root/recipe.yaml: models.base (TINY, plus `models`), datasets.prefs (`pairs` toy math
    preference rows) and datasets.held_out (`held_out` rows of the eval split), and `stage`."""
    recipe = {"name": name, "output_dir": "run", "seed": 0,
              "models": {"base": {"tiny": TINY}, **(models or {})},
              "datasets": {"prefs": {"toy": {"task": "math", "n": pairs, "format": "preference"}},
                           "held_out": {"toy": {"task": "math", "n": held_out, "split": "eval",
                                                "format": "preference"}}},
              "stages": [stage]}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_reward_model(str(model_dir), pad_token_id=0).state_dict()


def train_two_members_from(start: Path, rows: list[dict], tmp_path: Path, name: str, max_steps: int = 3,
                           **options) -> dict:
    """The stage from a user's start checkpoint on a JSONL of `rows` (also the held-out pairs):
    two short members, with further stage `options`. Returns the stage's manifest."""
    import json

    from posttrain.pipeline.runner import run_recipe

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {"name": name, "output_dir": "run", "seed": 0, "models": {"start": {"path": str(start)}},
              "stages": [{"name": "rm", "kind": "reward_model", "model": "${models.start}", "dataset": str(data),
                          "eval_dataset": str(data), "members": 2, "seeds": [1, 2], "probe_steps": 2,
                          "max_steps": max_steps, "batch_size": 4, "learning_rate": 1.0e-3, "checkpoint_every": 0,
                          **options}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_recipe(path)["rm"]
