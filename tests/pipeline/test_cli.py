"""The posttrain command: exit codes, one-paragraph errors, stage reference."""

import os
import subprocess
import sys


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=None if env is None else {**os.environ, **env})


def test_validate_accepts_a_valid_recipe(write_recipe, tiny_sft):
    r = cli("validate", str(write_recipe(tiny_sft)))
    assert r.returncode == 0 and "valid" in r.stdout


def test_invalid_recipe_exits_2_without_traceback(write_recipe, tiny_sft):
    path = write_recipe(tiny_sft.replace("learning_rate", "learnin_rate"))
    for cmd in ("validate", "run"):
        r = cli(cmd, str(path))
        assert r.returncode == 2
        assert "Traceback" not in r.stderr
        assert f"{path}:" in r.stderr and "did you mean 'learning_rate'" in r.stderr


def test_debug_shows_the_traceback(write_recipe, tiny_sft):
    r = cli("--debug", "validate", str(write_recipe(tiny_sft.replace("kind: sft", "kind: nope"))))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_set_override_exits_2(write_recipe, tiny_sft):
    r = cli("validate", str(write_recipe(tiny_sft)), "--set", "stages.sft.max_steps=-1")
    assert r.returncode == 2 and "stages.sft.max_steps" in r.stderr and "(--set)" in r.stderr


def test_stage_failure_exits_1_with_the_data_location(write_recipe, tiny_sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    r = cli("run", str(write_recipe(tiny_sft.replace("mix: {toy: {task: chat, n: 64, format: chat}}", f"mix: {{path: {bad}}}"))))
    assert r.returncode == 1
    assert "bad.jsonl:1" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_bracketed_text_in_errors_and_descriptions_is_shown_as_it_is(write_recipe, tiny_sft, tmp_path):
    """The console's markup must not eat "[row 1]" from an error, nor "[i mod len]" or "[int]" from
    the stage reference."""
    bad = tmp_path / "bad.json"
    bad.write_text('[{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, 3]')
    r = cli("run", str(write_recipe(tiny_sft.replace("mix: {toy: {task: chat, n: 64, format: chat}}", f"mix: {{path: {bad}}}"))),
            env={"COLUMNS": "400"})
    assert r.returncode == 1
    assert "bad.json[row 1]: expected a JSON object per array element" in r.stdout, r.stdout
    r = cli("stages", "reward_model", env={"COLUMNS": "400"})
    assert "seeds (list[int] | None, default None)" in r.stdout and "takes seeds[i mod len]" in r.stdout


def test_missing_dataset_file_is_a_recipe_error(write_recipe, tiny_sft):
    r = cli("run", str(write_recipe(tiny_sft.replace("mix: {toy: {task: chat, n: 64, format: chat}}", "mix: {path: nowhere.jsonl}"))))
    assert r.returncode == 2 and "datasets.mix.path" in r.stderr and "not found" in r.stderr


def test_stages_lists_kinds_with_documented_fields():
    r = cli("stages")
    assert r.returncode == 0
    for kind in ("sft", "export", "evaluate"):
        assert kind in r.stdout
    assert "learning_rate" in r.stdout and "Peak learning rate" in r.stdout and "default 2e-05" in r.stdout


def test_dry_run_runs_nothing(write_recipe, tiny_sft):
    path = write_recipe(tiny_sft)
    r = cli("run", str(path), "--dry-run")
    assert r.returncode == 0 and "would run" in r.stdout
    assert not (path.parent / "run" / "sft" / "manifest.json").exists()


def test_stages_spells_out_literal_and_union_types_with_their_allowed_values():
    r = cli("stages", "sft", env={"COLUMNS": "400"})
    assert "lr_scheduler ('linear' | 'cosine' | 'constant' | 'constant_with_warmup', default 'cosine')" in r.stdout
    assert "lora (LoraSpec | None, default None)" in r.stdout
    assert "Literal" not in r.stdout and "Union" not in r.stdout
    r = cli("stages", "rl", env={"COLUMNS": "400"})
    assert "fault_policy ('zero' | 'skip' | 'fail', default 'zero')" in r.stdout and "Literal" not in r.stdout


def test_the_summary_shows_reward_faults_and_the_non_negative_kl():
    from posttrain.cli import _key_metrics

    shown = _key_metrics({"reward/mean": 0.0, "kl_start": -0.038, "kl_start_k3": 0.004, "reward/math/faults": 160,
                          "reward/brevity/faults": 0})
    assert "kl_start_k3=0.004" in shown and "kl_start=" not in shown
    assert shown.endswith("faults reward/math 160")
