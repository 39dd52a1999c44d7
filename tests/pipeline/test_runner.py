"""The runner: manifests written last, skip when unchanged, re-run downstream, survive kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.pipeline.recipe import load_recipe
from posttrain.pipeline.runner import Runner, run_recipe

EXPORT = """
  - name: export
    kind: export
    model: ${stages.sft.model}
    require_end_of_turn: false
    max_new_tokens: 4
"""


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_sft_then_export_writes_complete_manifests_and_an_it_checkpoint(write_recipe, tiny_sft):
    path = write_recipe(tiny_sft + EXPORT)
    manifests = run_recipe(path)
    run_dir = path.parent / "run"
    sft = manifest(run_dir, "sft")
    assert sft["status"] == "complete" and sft["kind"] == "sft" and sft["hash"]
    assert sft["config"]["max_steps"] == 4 and sft["metrics"]["rows"] == 64
    lines = (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "loss" in json.loads(lines[0])
    out = Path(manifests["export"]["outputs"]["model"])
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    tok = json.loads((out / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(out)
    assert t.convert_tokens_to_ids("<end_of_turn>") in gen["eos_token_id"]
    assert "generation" in (t.chat_template or tok.get("chat_template", ""))
    card = (out / "README.md").read_text()
    assert "sft" in card and "Stage lineage" in card and "rows" in card
    assert (run_dir / "recipe.resolved.yaml").exists()
    assert "${" not in (run_dir / "recipe.resolved.yaml").read_text()


def test_rerun_skips_complete_stages_and_reruns_from_the_first_change(write_recipe, tiny_sft):
    path = write_recipe(tiny_sft + EXPORT)
    first = run_recipe(path)
    again = run_recipe(path)
    assert again["sft"]["started"] == first["sft"]["started"]
    assert again["export"]["started"] == first["export"]["started"]
    # The summary of a re-run shows a skipped stage with the time it took when it ran.
    outcomes = {o.name: o for o in Runner(load_recipe(path)).run()}
    assert outcomes["sft"].status == "skipped"
    assert outcomes["sft"].seconds == first["sft"]["seconds"] > 0
    changed = run_recipe(path, ["stages.export.max_new_tokens=5"])
    assert changed["sft"]["started"] == first["sft"]["started"]
    assert changed["export"]["started"] != first["export"]["started"]
    upstream = run_recipe(path, ["stages.export.max_new_tokens=5", "stages.sft.learning_rate=0.002"])
    assert upstream["sft"]["started"] != first["sft"]["started"]
    assert upstream["export"]["started"] != changed["export"]["started"]  # downstream re-runs too


def test_same_inputs_give_the_same_weights(write_recipe, tiny_sft):
    from safetensors.torch import load_file

    a = write_recipe(tiny_sft, "a.yaml")
    b = write_recipe(tiny_sft.replace("output_dir: run", "output_dir: run_b"), "b.yaml")
    wa = load_file(Path(run_recipe(a)["sft"]["outputs"]["model"]) / "model.safetensors")
    wb = load_file(Path(run_recipe(b)["sft"]["outputs"]["model"]) / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)


SLOW_PLUGIN = """
import time
from posttrain.stages import register_stage, StageConfig, StageResult

class SlowConfig(StageConfig):
    seconds: float = 0.0

@register_stage("slow_write_test", SlowConfig, outputs=("file",))
def run(cfg, ctx):
    p = ctx.stage_dir / "out.txt"
    p.write_text("partial")
    time.sleep(cfg.seconds)
    p.write_text("done")
    return StageResult(outputs={"file": str(p)})
"""


def test_a_stage_killed_midway_is_not_complete_and_is_redone(write_recipe, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    path = write_recipe("name: k\noutput_dir: run\nplugins: [slow.py]\nstages:\n"
                        "  - {name: s, kind: slow_write_test, seconds: 60}\n")
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "run" / "s" / "out.txt"
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert out.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "s" / "manifest.json").exists()
    done = run_recipe(path, ["stages.s.seconds=0"])
    assert done["s"]["status"] == "complete"
    assert out.read_text() == "done"


def test_only_and_from(write_recipe, tiny_sft):
    path = write_recipe(tiny_sft + EXPORT)
    with pytest.raises(Exception, match="has not completed"):
        run_recipe(path, only="export")
    first = run_recipe(path)
    again = run_recipe(path, from_stage="export")
    assert again["sft"]["started"] == first["sft"]["started"]
    assert again["export"]["started"] != first["export"]["started"]


def test_failed_stage_writes_a_failed_manifest(write_recipe, tiny_sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    path = write_recipe(tiny_sft.replace("mix: {toy: {task: chat, n: 64, format: chat}}", f"mix: {{path: {bad}}}"))
    with pytest.raises(Exception, match=r"bad.jsonl:2: messages\[0\].role"):
        run_recipe(path)
    m = manifest(path.parent / "run", "sft")
    assert m["status"] == "failed" and "wizard" in m["error"]


def test_toy_data_cached_by_another_generator_version_is_made_again(tmp_path, write_recipe, tiny_sft, monkeypatch):
    from posttrain.pipeline.recipe import load_recipe
    from posttrain.pipeline.runner import Inputs
    from posttrain.toy import tasks

    recipe = load_recipe(write_recipe(tiny_sft))
    first = Inputs(recipe, lambda _: None)
    name = next(iter(recipe.datasets))
    path = first.dataset(name)
    with open(path, "a") as f:
        f.write('{"stale": true}\n')  # what an older generator made, as far as this test knows
    assert "stale" in open(Inputs(recipe, lambda _: None).dataset(name)).read()  # same version: kept

    monkeypatch.setattr(tasks, "GENERATOR_VERSION", tasks.GENERATOR_VERSION + 1)
    again = Inputs(recipe, lambda _: None)
    assert "stale" not in open(again.dataset(name)).read()
    assert again.fingerprint(f"datasets.{name}") != first.fingerprint(f"datasets.{name}")


STEPPER_PLUGIN = """
import json, os, time
from pathlib import Path
from posttrain.stages import register_stage, StageConfig, StageResult

class C(StageConfig):
    max_steps: int = 6
    checkpoint_every: int = 2
    faults_per_step: int = 0

@register_stage('stepper_test', C, outputs=('file',))
def run(cfg, ctx):
    # A training loop in miniature: one metrics row per step, a checkpoint every few steps, resume
    # from the newest one; STEPPER_HANG_AT makes it wait at a step (to be interrupted there).
    ckpts = sorted(int(p.name[5:]) for p in (ctx.stage_dir / 'checkpoints').glob('step_*'))
    start = ckpts[-1] if ckpts else 0
    hang_at = int(os.environ.get('STEPPER_HANG_AT', '0'))
    record = {}
    with ctx.metrics() as metrics:
        for step in range(start, cfg.max_steps):
            record = {'reward/r/faults': cfg.faults_per_step + step}
            metrics.log(step + 1, **record)
            if (step + 1) % cfg.checkpoint_every == 0:
                d = ctx.stage_dir / 'checkpoints' / f'step_{step + 1}'
                d.mkdir(parents=True)
                (d / 'state.json').write_text(json.dumps({'step': step + 1}))
            if step + 1 == hang_at:
                (ctx.stage_dir / 'waiting').write_text('')
                time.sleep(120)
    p = ctx.stage_dir / 'out.txt'
    p.write_text('done')
    return StageResult(outputs={'file': str(p)}, metrics=record)
"""
STEPPER_RECIPE = "name: k\noutput_dir: run\nplugins: [stepper.py]\nstages:\n  - {name: s, kind: stepper_test}\n"


def _cli_run(path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(path), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_the_manifest_keeps_total_fault_counts_not_the_last_steps(write_recipe, tmp_path):
    (tmp_path / "stepper.py").write_text(STEPPER_PLUGIN)
    path = write_recipe(STEPPER_RECIPE.replace("kind: stepper_test}", "kind: stepper_test, faults_per_step: 1}"))
    done = run_recipe(path)
    assert done["s"]["metrics"]["reward/r/faults"] == sum(1 + step for step in range(6))  # 21, not 6


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_where_writes_its_report_and_resumes_there(write_recipe, tmp_path, sig, code):
    (tmp_path / "stepper.py").write_text(STEPPER_PLUGIN)
    path = write_recipe(STEPPER_RECIPE)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "STEPPER_HANG_AT": "5", "COLUMNS": "200"})
    deadline = time.time() + 120
    while not (run_dir / "s" / "waiting").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in out + err
    message = [line for line in (out + err).splitlines() if line.startswith("posttrain: SIG")]
    assert len(message) == 1, out + err
    assert "stage 's'" in message[0] and "at step 5 of 6" in message[0] and "resumes from step 4" in message[0]
    assert (run_dir / "report.html").exists() and (run_dir / "recipe.resolved.yaml").exists()
    assert not (run_dir / "s" / "manifest.json").exists()  # an interrupted stage is not complete

    dry = _cli_run(path, "--dry-run")
    assert "would resume from step 4" in dry.stdout, dry.stdout
    again = _cli_run(path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming stage 's' from step 4" in again.stdout
    assert [json.loads(line)["step"] for line in (run_dir / "s" / "metrics.jsonl").read_text().splitlines()][-2:] == [5, 6]
    assert manifest(run_dir, "s")["resumed_from_step"] == 4


def test_dry_run_says_what_happens_to_each_stage(write_recipe, tmp_path):
    (tmp_path / "stepper.py").write_text(STEPPER_PLUGIN)
    path = write_recipe(STEPPER_RECIPE + "  - {name: t, kind: stepper_test, max_steps: 2}\n")
    run_recipe(path, only="s")
    dry = _cli_run(path, "--dry-run")
    rows = {line.split()[1]: line for line in dry.stdout.splitlines() if line.strip().startswith("│ ")
            and line.split()[1] in ("s", "t")}
    assert "skip (complete)" in rows["s"] and "would run" in rows["t"], dry.stdout


def test_level_and_hard_fraction_at_their_defaults_leave_a_toy_datasets_fingerprint_as_it_was(tmp_path, write_recipe,
                                                                                             tiny_sft):
    """Options added after data was cached change nothing for recipes that do not set them; set,
    they make other data (another fingerprint, so the stages reading it rerun)."""
    import json

    from posttrain.pipeline.recipe import load_recipe
    from posttrain.pipeline.runner import Inputs

    recipe = load_recipe(write_recipe(tiny_sft))
    name = next(iter(recipe.datasets))
    plain = Inputs(recipe, lambda _: None)
    marker = json.loads(Path(plain.dataset(name)).with_suffix(".spec.json").read_text())
    assert "level" not in marker and "hard_fraction" not in marker
    recipe.datasets[name].toy.hard_fraction = 0.5
    mixed = Inputs(recipe, lambda _: None)
    mixed.dataset(name)
    assert mixed.fingerprint(f"datasets.{name}") != plain.fingerprint(f"datasets.{name}")
