"""What the rl stage tests share: the toy reward file, toy math prompts on disk, a stage context
and the metrics rows a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.data import write_jsonl
from posttrain.stages.base import StageContext
from posttrain.toy.tasks import generate

# Reward functions the tests name by `file:function` (brevity, raises_on_long, infinite, ...).
REWARDS = str(Path(__file__).with_name("toy_rewards.py"))


def write_math_prompts(directory: Path, n: int) -> Path:
    """`n` toy math prompts (train split, seed 0) as `math.jsonl` in `directory`."""
    path = directory / "math.jsonl"
    write_jsonl(path, generate("math", n, seed=0, split="train", fmt="prompt"))
    return path


def stage_context(stage_dir: Path, seed: int = 0) -> StageContext:
    """The context the runner gives an `rl` stage writing into `stage_dir` (created here)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(name="rl", kind="rl", stage_dir=stage_dir, run_dir=stage_dir.parent, seed=seed,
                        recipe_name="test")


def metrics_rows(stage_dir: Path) -> list[dict]:
    """One dict per line of the stage's metrics.jsonl."""
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
