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
