"""Recipe validation: every error names file, line and key path, and says what was expected."""

import sys

import pytest
from tiny_recipes import recipe_header, sft_stage, stage

from posttrain.pipeline.recipe import RecipeError, load_recipe


def error_of(write_recipe, text, overrides=()):
    path = write_recipe(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    return str(e.value), path


def test_valid_recipe_loads_with_typed_stage_configs(write_recipe, tiny_sft):
    r = load_recipe(write_recipe(tiny_sft))
    assert [s.name for s in r.stages] == ["sft"]
    assert r.stages[0].config.max_steps == 4
    assert r.output_dir.name == "run" and r.output_dir.is_absolute()


def test_malformed_yaml_names_the_line(write_recipe):
    msg, path = error_of(write_recipe, "name: x\nstages: [\n  - a: 1\n")
    assert str(path) in msg and "malformed YAML" in msg


def test_unknown_key_suggests_the_closest_name_with_line(write_recipe, tiny_sft):
    msg, path = error_of(write_recipe, tiny_sft.replace("max_steps: 4", "max_step: 4"))
    assert f"{path}:13" in msg
    assert "stages.sft.max_step" in msg and "did you mean 'max_steps'" in msg


def test_wrong_type_names_key_path_and_value(write_recipe, tiny_sft):
    msg, path = error_of(write_recipe, tiny_sft.replace("max_steps: 4", "max_steps: lots"))
    assert f"{path}:13" in msg and "stages.sft.max_steps" in msg and "'lots'" in msg


def test_unknown_stage_kind_lists_kinds(write_recipe, tiny_sft):
    msg, _ = error_of(write_recipe, tiny_sft.replace("kind: sft", "kind: sfft"))
    assert "unknown stage kind 'sfft'" in msg and "did you mean 'sft'" in msg and "export" in msg


def test_dangling_and_forward_references_are_errors(write_recipe, tiny_sft):
    msg, path = error_of(write_recipe, tiny_sft.replace("${models.student}", "${models.studnet}"))
    assert "unknown model 'studnet'" in msg and "did you mean 'student'" in msg and f"{path}:11" in msg
    later = tiny_sft + "  - name: export\n    kind: export\n    model: ${stages.sft.model}\n"
    later = later.replace("model: ${models.student}", "model: ${stages.export.model}")
    msg, _ = error_of(write_recipe, later)
    assert "runs later" in msg
    msg, _ = error_of(write_recipe, tiny_sft + "  - name: e\n    kind: export\n    model: ${stages.sft.weights}\n")
    assert "has no output 'weights'" in msg


def test_missing_required_key(write_recipe, tiny_sft):
    msg, _ = error_of(write_recipe, tiny_sft.replace("    dataset: ${datasets.mix}\n", ""))
    assert "missing required key 'stages.sft.dataset'" in msg


def test_duplicate_stage_names(write_recipe, tiny_sft):
    msg, _ = error_of(write_recipe, tiny_sft + tiny_sft.split("stages:\n")[1])
    assert "used twice" in msg


def test_models_need_exactly_one_source(write_recipe, tiny_sft):
    msg, _ = error_of(write_recipe, tiny_sft.replace("student: {tiny:", "student: {path: x, tiny:"))
    assert "exactly one of 'path' or 'tiny'" in msg


def test_overrides_apply_and_are_validated(write_recipe, tiny_sft):
    path = write_recipe(tiny_sft)
    r = load_recipe(path, ["stages.sft.max_steps=9", "seed=5", "models.student.tiny.num_layers=3"])
    assert r.stages[0].config.max_steps == 9 and r.seed == 5 and r.models["student"].tiny.num_layers == 3
    with pytest.raises(RecipeError, match="--set.*did you mean 'max_steps'"):
        load_recipe(path, ["stages.sft.max_stepz=9"])
    with pytest.raises(RecipeError, match="no stage named 'sfx'.*did you mean 'sft'"):
        load_recipe(path, ["stages.sfx.max_steps=9"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["stages.sft.max_steps"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_plugins_register_stage_kinds(write_recipe, tmp_path):
    (tmp_path / "my_stage.py").write_text(
        "from posttrain.stages import register_stage, StageConfig, StageResult\n"
        "class C(StageConfig):\n    text: str\n"
        "@register_stage('write_text_test', C, outputs=('file',))\n"
        "def run(cfg, ctx):\n    p = ctx.stage_dir / 'out.txt'\n    p.write_text(cfg.text)\n"
        "    return StageResult(outputs={'file': str(p)})\n")
    r = load_recipe(write_recipe("name: p\noutput_dir: o\nplugins: [my_stage.py]\nstages:\n"
                                 "  - {name: w, kind: write_text_test, text: hi}\n"))
    assert r.stages[0].kind == "write_text_test"
    with pytest.raises(RecipeError, match="cannot import 'missing.py'"):
        load_recipe(write_recipe("name: p\noutput_dir: o\nplugins: [missing.py]\nstages: []\n", "b.yaml"))


def test_report_to_names_are_checked_when_the_recipe_loads(write_recipe, tmp_path, monkeypatch):
    # A plugin stage kind with the `report_to` type every training stage uses (posttrain.trackers).
    (tmp_path / "tracked_stage.py").write_text(
        "from posttrain.stages import register_stage, StageConfig, StageResult\n"
        "from posttrain.trackers import ReportTo\n"
        "class C(StageConfig):\n    report_to: ReportTo = []\n"
        "@register_stage('report_to_test', C, outputs=())\n"
        "def run(cfg, ctx):\n    return StageResult(outputs={})\n")
    text = "name: p\noutput_dir: o\nplugins: [tracked_stage.py]\nstages:\n  - name: t\n    kind: report_to_test\n"
    msg, path = error_of(write_recipe, text + "    report_to: [tensorbord]\n")
    assert f"{path}:7" in msg and "stages.t.report_to[0]" in msg
    assert "unknown tracker 'tensorbord'; did you mean 'tensorboard'" in msg
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own way to make a module unimportable
    msg, _ = error_of(write_recipe, text + "    report_to: [wandb]\n")
    assert "tracker 'wandb' is not installed: pip install 'posttrain[trackers]'" in msg


RL_TWO_REWARDS = recipe_header("t", datasets={"chat": "{toy: {task: chat, n: 8, format: chat}}",
                                               "prompts": "{toy: {task: mix, n: 64, format: prompt}}"}) + "".join([
    sft_stage("${models.student}", "${datasets.chat}", name="warmup"),
    stage("rl", "rl", model="${stages.warmup.model}", dataset="${datasets.prompts}",
          rewards=[{"name": "math", "weight": 1.0}, {"name": "instructions", "weight": 0.5}]),
])


@pytest.mark.parametrize("key", ["stages.rl.rewards[1].weight", "stages[1].rewards[1].weight", "stages.1.rewards.1.weight"])
def test_set_addresses_list_items_by_index(write_recipe, key):
    r = load_recipe(write_recipe(RL_TWO_REWARDS), [f"{key}=2"])
    assert [s.weight for s in r.stage("rl").config.rewards] == [1.0, 2.0]


def test_set_with_an_index_out_of_range_is_a_recipe_error(write_recipe):
    msg, _ = error_of(write_recipe, RL_TWO_REWARDS, ["stages.rl.rewards[5].weight=2"])
    assert "stages.rl.rewards has 2 items; index 5 is out of range" in msg


def test_set_with_an_invalid_value_at_an_index_names_the_stage_and_item(write_recipe):
    msg, path = error_of(write_recipe, RL_TWO_REWARDS, ["stages.rl.rewards[0].weight=heavy"])
    assert f"{path} (--set): stages.rl.rewards[0].weight" in msg and "'heavy'" in msg


def test_set_on_a_mapping_with_an_index_is_a_recipe_error(write_recipe):
    msg, _ = error_of(write_recipe, RL_TWO_REWARDS, ["models[0].path=x"])
    assert "models is a mapping, not a list" in msg


def test_errors_inside_a_stage_name_the_stage(write_recipe):
    bad = RL_TWO_REWARDS.replace("weight: 0.5", "wieght: 0.5")
    msg, path = error_of(write_recipe, bad)
    line = bad.splitlines().index("      - {name: instructions, wieght: 0.5}") + 1
    assert f"{path}:{line}" in msg and "unknown key 'stages.rl.rewards[1].wieght'" in msg


def test_a_recipe_wide_rollout_is_inherited_by_every_stage_that_generates(write_recipe):
    text = RL_TWO_REWARDS.replace("datasets:", "rollout: {backend: transformers, max_batch_size: 8}\ndatasets:", 1) + (
        "    rollout: {max_batch_size: 4}\n"
        "  - name: eval\n    kind: evaluate\n    model: ${stages.rl.model}\n    datasets: {p: '${datasets.prompts}'}\n")
    r = load_recipe(write_recipe(text))
    rl, ev = r.stage("rl").config.rollout, r.stage("eval").config.rollout
    assert (rl.backend, rl.max_batch_size) == ("transformers", 4)  # the stage's own key wins
    assert (ev.backend, ev.max_batch_size) == ("transformers", 8)  # evaluate inherits too


def test_a_mistake_in_the_recipe_wide_rollout_is_reported_at_its_line(write_recipe):
    text = RL_TWO_REWARDS.replace("datasets:", "rollout: {backend: transformer}\ndatasets:", 1)
    msg, path = error_of(write_recipe, text)
    line = text.splitlines().index("rollout: {backend: transformer}") + 1
    assert f"{path}:{line}: rollout.backend" in msg and "'transformer'" in msg
