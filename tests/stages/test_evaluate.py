"""The evaluate stage: answers held-out prompts and scores them with the reward their columns name."""

import json
from pathlib import Path

import pytest

from posttrain.pipeline.runner import run_recipe

EVAL = """
  - name: eval
    kind: evaluate
    model: ${stages.sft.model}
    datasets:
      math: ${datasets.math_eval}
    rollout: {backend: transformers}
    sampling: {temperature: 0.0, max_new_tokens: 8}
"""


def test_accuracy_is_reported_per_set_with_every_generation_kept(write_recipe, tiny_sft):
    text = tiny_sft.replace("datasets:\n", "datasets:\n  math_eval: {toy: {task: math, n: 6, split: eval, format: prompt}}\n") + EVAL
    m = run_recipe(write_recipe(text))["eval"]
    assert 0.0 <= m["metrics"]["math/accuracy"] <= 1.0
    rows = [json.loads(l) for l in Path(m["outputs"]["report"]).read_text().splitlines()]
    assert len(rows) == 6 and all(r["set"] == "math" and r["reward"] in (0.0, 1.0) for r in rows)
    # the accuracy is what the kept rewards say
    assert m["metrics"]["math/accuracy"] == pytest.approx(sum(r["reward"] for r in rows) / 6, abs=1e-4)


def test_rows_without_a_reward_column_are_refused_with_the_file(write_recipe, tiny_sft, tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "hi"}\n')
    text = tiny_sft.replace("datasets:\n", f"datasets:\n  math_eval: {{path: {bare}}}\n") + EVAL
    with pytest.raises(Exception, match="bare.jsonl: cannot choose a reward"):
        run_recipe(write_recipe(text))
