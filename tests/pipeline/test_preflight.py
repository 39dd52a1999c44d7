"""`posttrain validate` (and `run`, before the first stage trains) checks what a recipe names:
reward files, functions, registry names, factory arguments, the columns rewards and stages read,
and dataset configs; each error names the recipe file, line and key path with the stage's name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from posttrain.pipeline.recipe import RecipeError, load_recipe

RECIPE = """
name: t
output_dir: run
models:
  student: {tiny: {arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}
datasets:
  chat: {toy: {task: chat, n: 8, format: chat}}
  prompts: {path: prompts.jsonl}
stages:
  - name: warmup
    kind: sft
    model: ${models.student}
    dataset: ${datasets.chat}
  - name: rl
    kind: rl
    model: ${stages.warmup.model}
    dataset: ${datasets.prompts}
    rewards:
      - REWARD
"""
REWARD_LINE = 18

PLUGIN = '''
from rewards import register_reward

@register_reward("plugin_len")
def wrong_len(prompts, completions, **_):
    return [1.0]

def needs_reference(prompts, completions, reference, **_):
    return [float(c == r) for c, r in zip(completions, reference)]

def overlong(max_len, scale=1.0):
    def reward(prompts, completions, **_):
        return [-scale * max(0, len(c) - max_len) for c in completions]
    return reward
'''


@pytest.fixture
def recipe_with(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")

    def write(reward: str, recipe: str = RECIPE):
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe.replace("REWARD", reward).lstrip())
        return path

    return write


def error_of(path) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return str(e.value)


def test_a_missing_reward_file_is_an_error_at_its_line(recipe_with):
    path = recipe_with('{fn: "nowhere.py:score"}')
    msg = error_of(path)
    assert f"{path}:{REWARD_LINE}: stages.rl.rewards[0].fn:" in msg and "does not exist" in msg


def test_a_missing_function_names_the_users_file(recipe_with, tmp_path):
    msg = error_of(recipe_with('{fn: "my_plugin.py:wrong_lenght"}'))
    assert str(tmp_path / "my_plugin.py") in msg and "reward_file_" not in msg
    assert "did you mean 'wrong_len'" in msg


def test_an_unknown_registry_name_suggests_the_closest(recipe_with):
    path = recipe_with("{name: maths}")
    msg = error_of(path)
    assert f"{path}:{REWARD_LINE}: stages.rl.rewards[0].name: unknown reward 'maths'; did you mean 'math'?" in msg


def test_factory_arguments_the_factory_does_not_take_are_errors(recipe_with):
    msg = error_of(recipe_with('{fn: "my_plugin.py:overlong", factory: {max_length: 8}}'))
    assert "stages.rl.rewards[0].factory" in msg and "max_length" in msg and "it takes: max_len, scale" in msg
    load_recipe(recipe_with('{fn: "my_plugin.py:overlong", factory: {max_len: 8}}'))  # the right ones pass


def test_a_column_the_reward_requires_must_be_in_local_data(recipe_with):
    msg = error_of(recipe_with('{fn: "my_plugin.py:needs_reference"}'))
    assert "stages.rl.rewards[0]" in msg and "reads the column 'reference'" in msg and "answer, prompt" in msg
    load_recipe(recipe_with('{fn: "my_plugin.py:needs_reference", columns: {reference: answer}}'))


def test_the_math_reward_needs_an_answer_column(recipe_with, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1?", "solution": "2"}) + "\n")
    msg = error_of(recipe_with("{name: math}"))
    assert "reward 'math' reads the column 'answer'" in msg and "solution" in msg


def test_a_stage_reading_a_column_the_data_lacks_is_an_error(recipe_with):
    recipe = RECIPE.replace("dataset: ${datasets.chat}", "dataset: ${datasets.prompts}")
    path = recipe_with("{name: math}", recipe)
    msg = error_of(path)
    assert f"{path}:12: stages.warmup.dataset: the sft stage reads 'messages' or 'prompt'+'completion'" in msg


def test_a_registered_name_from_a_plugin_file_loads(recipe_with):
    recipe = RECIPE.replace("datasets:", "plugins: [my_plugin.py]\ndatasets:", 1)
    load_recipe(recipe_with("{name: plugin_len}", recipe))


def test_a_local_hub_style_folder_with_a_wrong_config_hints_at_data_dir(recipe_with, tmp_path):
    import pandas as pd

    (tmp_path / "gsm8k" / "main").mkdir(parents=True)
    pd.DataFrame({"question": ["1+1?"], "answer": ["two #### 2"]}).to_parquet(tmp_path / "gsm8k" / "main" / "train.parquet")
    recipe = RECIPE.replace("prompts: {path: prompts.jsonl}",
                            "prompts: {path: gsm8k, config: main, split: train, columns: {prompt: question, answer: answer}}")
    path = recipe_with("{name: math}", recipe)
    msg = error_of(path)
    assert f"{path}:7: datasets.prompts.config:" in msg and "it has: default" in msg and "data_dir: main" in msg
    fixed = recipe.replace("config: main", "data_dir: main")
    load_recipe(recipe_with("{name: math}", fixed))


def test_validate_exits_2_on_a_reward_mistake(recipe_with):
    path = recipe_with("{name: maths}")
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "did you mean 'math'" in r.stderr and "Traceback" not in r.stderr


def test_run_checks_columns_of_data_known_only_once_loaded_before_any_stage_trains(recipe_with, tmp_path):
    import pandas as pd

    # A folder read through `datasets`: its columns are known only once loaded, at `run`.
    (tmp_path / "gsm8k").mkdir()
    pd.DataFrame({"prompt": ["1+1?"], "solution": ["2"]}).to_parquet(tmp_path / "gsm8k" / "train.parquet")
    path = recipe_with("{name: math}", RECIPE.replace("prompts: {path: prompts.jsonl}", "prompts: {path: gsm8k}"))
    load_recipe(path)  # validate cannot know them
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{path}:{REWARD_LINE}: stages.rl.rewards[0]: reward 'math' reads the column 'answer'" in r.stderr
    assert not (tmp_path / "run" / "warmup").exists()  # nothing trained


def test_a_column_that_first_appears_late_in_a_file_is_found(recipe_with, tmp_path):
    rows = [{"prompt": f"q{i}", "instruction_id_list": []} for i in range(300)] + [{"prompt": "1+1?", "answer": "2"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_recipe(recipe_with("{name: math}"))


def test_an_unreadable_row_is_left_to_the_stage_that_reads_it(recipe_with, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1?"}) + "\nnot json\n")
    load_recipe(recipe_with("{name: math}"))  # the stage reports the row (or skips it with on_invalid_row: skip)
