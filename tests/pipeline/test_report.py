"""The run report: written at the end of `posttrain run`, self-contained, with accuracy after every
stage, curves, the data card and lineage; a failed stage shows its failure."""

from __future__ import annotations

import base64
import re
import textwrap
from pathlib import Path

import pytest
from tiny_recipes import evaluate_stage, recipe_header, rl_on_math, sft_stage, stage

from posttrain.cli import main

HELD_OUT = {"math": "${datasets.math_eval}", "instructions": "${datasets.ifeval}"}
RECIPE = recipe_header("reported", datasets={
    "dirty": "{toy_dirty: {n_clean: 60, dirty_per_kind: 2}}",
    "math_prompts": "{toy: {task: math, n: 16, format: prompt}}",
    "math_eval": "{toy: {task: math, n: 4, split: eval, format: prompt}}",
    "ifeval": "{toy: {task: instructions, n: 4, split: eval, format: prompt}}",
}) + "".join([
    stage("filter", "filter", dataset="${datasets.dirty}"),
    sft_stage("${models.student}", "${stages.filter.dataset}", max_steps=3, batch_size=4, logging_steps=1),
    evaluate_stage("${stages.sft.model}", HELD_OUT, name="eval_sft"),
    rl_on_math("${stages.sft.model}", "${datasets.math_prompts}", max_steps=2, prompts_per_step=2, num_generations=2,
               max_new_tokens=4),
    evaluate_stage("${stages.rl.model}", HELD_OUT, name="eval_rl"),
])


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reported")
    (d / "recipe.yaml").write_text(textwrap.dedent(RECIPE).lstrip())
    assert main(["run", str(d / "recipe.yaml")]) == 0
    return d / "run"


def test_run_writes_a_self_contained_report_with_accuracy_after_every_stage(run_dir, capsys):
    page = (run_dir / "report.html").read_text()
    # self-contained: no external fetch of any kind (scripts, styles, images, fonts)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    pngs = images(page)
    assert len(pngs) >= 4 and all(p.startswith(b"\x89PNG") for p in pngs)  # timings, accuracy, sft and rl curves
    held = page.split("Held-out accuracy after every stage", 1)[1].split("<h2>", 1)[0]
    for stage in ("eval_sft", "eval_rl"):
        assert f"<td>{stage}</td>" in held
    assert held.count("n=4") >= 4 and "[" in held  # each accuracy with its interval and sample count
    assert "stage sft" in held and "stage rl" in held  # which model each evaluation measured
    assert "ifeval/prompt_strict" in page and "safety/toxic_rate" in page
    assert "Data filtering" in page and "near_duplicate" in page  # the filter's data card
    assert "sft: loss" in page or "sft (sft" in page
    assert "recipe.resolved.yaml" in page
    # the stages table: lineage (what each stage read)
    rl_row = next(line for line in page.splitlines() if line.startswith("<tr><td>rl</td>"))
    assert "stage sft" in rl_row and "datasets/math_prompts" in rl_row


def test_report_command_on_a_run_with_a_failed_stage(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "hi"}\n')
    recipe = (run_dir.parent / "recipe.yaml").read_text().replace(
        "  ifeval: {toy:", f"  bare: {{path: {bare}}}\n  ifeval: {{toy:").replace(
        'datasets: {math: "${datasets.math_eval}", instructions: "${datasets.ifeval}"}\n    rollout: {backend: transformers}\n'
        '    sampling: {temperature: 0.0, max_new_tokens: 6}\n', 'datasets: {bare: "${datasets.bare}"}\n', 1)
    (run_dir.parent / "failing.yaml").write_text(recipe)
    assert main(["run", str(run_dir.parent / "failing.yaml"), "--only", "eval_sft"]) == 1
    assert "report:" in capsys.readouterr().out
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert "1 failed" in page and 'class=failed>failed' in page
    assert "eval_sft failed:" in page and "cannot choose a reward" in page
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def _stage(run: Path, name: str, kind: str, status: str | None, metrics_rows=()):
    import json

    d = run / name
    d.mkdir(parents=True)
    if status is not None:
        (d / "manifest.json").write_text(json.dumps({"name": name, "kind": kind, "status": status, "metrics": {},
                                                     "outputs": {}, "started": 1.0, "seconds": 1.0}))
    if metrics_rows:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows))


def test_a_failed_runs_header_counts_every_stage_of_the_recipe(tmp_path):
    from posttrain.pipeline.report import load_run, render

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text(
        "name: r\nstages:\n  - {name: sft, kind: sft}\n  - {name: rl, kind: rl}\n  - {name: eval, kind: evaluate}\n")
    _stage(run, "sft", "sft", "complete")
    _stage(run, "rl", "rl", "failed")
    page = render(load_run(run))
    assert "3 stages: 1 complete, <span class=failed>1 failed</span>, 1 not run" in page


def test_the_runner_writes_every_stage_into_the_resolved_recipe_when_one_fails(tmp_path):
    import yaml

    from posttrain.pipeline.runner import run_recipe
    from posttrain.stages import StageError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: f
        output_dir: run
        models:
          student: {{tiny: {{arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}}}
        datasets:
          bad: {{path: {bad}}}
        stages:
          - {{name: sft, kind: sft, model: "${{models.student}}", dataset: "${{datasets.bad}}", max_steps: 1}}
          - {{name: export, kind: export, model: "${{stages.sft.model}}"}}
        """))
    with pytest.raises(StageError):
        run_recipe(path)
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert [s["name"] for s in resolved["stages"]] == ["sft", "export"]
    assert "2 stages: <span class=failed>1 failed</span>, 1 not run" in (tmp_path / "run" / "report.html").read_text()


CURVES_ROWS = [{"step": s, "loss": 1.0 / s, "reward/mean": 0.1 * s, "kl_anchor": 0.01 * s, "entropy": 2.0 - 0.1 * s,
                "reward/math/mean": 0.05 * s, **({"rollout/drift": 0.002} if s == 1 else {})} for s in range(1, 9)]


def test_curves_wrap_into_rows_and_legends_cover_no_curve():
    from posttrain.pipeline.report import PANEL_COLUMNS, curves_figure

    fig = curves_figure("rl", CURVES_ROWS)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4  # loss, reward, KL, entropy: the one-point drift is no panel
    rows = {round(ax.get_position().y0, 3) for ax in visible}
    assert len(rows) == 2 and max(sum(1 for ax in visible if round(ax.get_position().y0, 3) == y) for y in rows) <= PANEL_COLUMNS
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in visible:
        legend = ax.get_legend().get_window_extent(renderer)
        plot = ax.get_window_extent(renderer)
        assert legend.y1 <= plot.y0, f"{ax.get_title()}: the legend overlaps the plotting area"


def test_a_metric_logged_once_is_reported_as_a_number_not_drawn(tmp_path):
    from posttrain.pipeline.report import load_run, render

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("name: r\nstages:\n  - {name: rl, kind: rl}\n")
    _stage(run, "rl", "rl", "complete", CURVES_ROWS)
    page = render(load_run(run))
    assert "Logged once: rollout/drift = 0.002 (step 1)" in page


def test_the_kl_panel_draws_the_k3_estimate_instead_of_a_k1_that_can_be_negative():
    from posttrain.pipeline.report import curve_panels

    rows = [{"step": s, "kl_start": -0.01 * s, "kl_start_k3": 0.002 * s, "kl_anchor": 0.01} for s in range(1, 5)]
    panels, _ = curve_panels(rows)
    assert panels["KL"] == ["kl_anchor", "kl_start_k3"]


def _write(path: Path, rows) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if isinstance(rows, list) else json.dumps(rows))


@pytest.fixture
def chained_run(tmp_path):
    """The files a filter -> sft -> rm (WARM, 2 members) -> warp (J-BOND runs, reward mix) chain writes,
    with an evaluation after sft and after warp: the report reads nothing else."""
    run = tmp_path / "run"
    stages = [("filter", "filter"), ("sft", "sft"), ("eval_sft", "evaluate"), ("rm", "reward_model"),
              ("warp", "warp"), ("eval_warp", "evaluate")]
    (run).mkdir()
    (run / "recipe.resolved.yaml").write_text("name: chained\nstages:\n" + "".join(
        f"  - {{name: {n}, kind: {k}}}\n" for n, k in stages))
    prefs_eval = run / "_inputs" / "datasets" / "prefs_eval.jsonl"
    _write(prefs_eval, [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 50)
    acc = lambda v, lo, hi: {"value": v, "lo": lo, "hi": hi}  # noqa: E731
    evals = {"eval_sft": {"math": acc(0.70, 0.6, 0.78), "code": acc(0.40, 0.26, 0.55)},
             "eval_warp": {"math": acc(0.90, 0.83, 0.95), "code": acc(0.55, 0.40, 0.69)}}
    configs = {
        "filter": {"dataset": str(run / "_inputs" / "datasets" / "dirty.jsonl")},
        "sft": {"model": str(run / "_inputs" / "models" / "student"), "dataset": str(run / "filter" / "dataset")},
        "eval_sft": {"model": str(run / "sft" / "model")},
        "rm": {"model": str(run / "sft" / "model"), "eval_dataset": str(prefs_eval), "label_flip_rate": 0.25},
        "warp": {"model": str(run / "sft" / "model"), "algorithm": "jbond", "rewards": [
            {"name": "warm", "fn": "reward_model", "weight": 0.2, "normalize": True,
             "kwargs": {"checkpoints": str(run / "rm" / "model")}},
            {"name": "math", "weight": 1.0}, {"name": "code", "weight": 1.0}]},
        "eval_warp": {"model": str(run / "warp" / "iteration_2" / "liti" / "model")},
    }
    metrics = {"rm": {"member_1/accuracy": 0.70, "member_2/accuracy": 0.66, "average/accuracy": 0.72,
                      "ensemble/accuracy": 0.71, "members/accuracy_mean": 0.68}}
    for name, _ in evals.items():
        metrics[name] = {f"{s}/accuracy": e["value"] for s, e in evals[name].items()}
        metrics[name].update({f"{s}/accuracy_ci_low": e["lo"] for s, e in evals[name].items()})
        metrics[name].update({f"{s}/accuracy_ci_high": e["hi"] for s, e in evals[name].items()})
        metrics[name].update({f"{s}/accuracy_n": 40 for s in evals[name]})
    outputs = {"filter": {"dataset": "x"}, "sft": {"model": "x"}, "rm": {"model": "x", "members": "x"},
               "warp": {"model": "x", "front": "x"}}
    for i, (name, kind) in enumerate(stages):
        _write(run / name / "manifest.json", {"name": name, "kind": kind, "status": "complete", "started": 100.0 + i,
                                              "seconds": 10.0 * (i + 1), "config": configs[name],
                                              "metrics": metrics.get(name, {}), "outputs": outputs.get(name, {})})
    _write(run / "filter" / "filter_report.json", {"input_rows": 100, "kept_rows": 90, "redacted_rows": 2,
                                                    "rejected_rows": 10, "rejected_by": {"dedup": {"near_duplicate": 10}}})
    for it in (1, 2):
        for m in (1, 2):
            rows = [{"step": 0, "eval/reward": 0.5}]
            rows += [{"step": s, "reward/warm/mean": 0.1, "reward/math/mean": 0.5 + 0.01 * s,
                      "reward/code/mean": float("nan") if s == 1 else 0.3, "reward/math/faults": 0,
                      "reward/code/faults": 1 if (it, m, s) == (2, 2, 2) else 0, "reward/warm/faults": 0,
                      "kl_start": 0.1 * s, "loss": 1.0} for s in (1, 2)]
            rows.append({"step": 2, "eval/reward": 0.6 + 0.01 * m})
            _write(run / "warp" / f"iteration_{it}" / f"run_{m}" / "metrics.jsonl", rows)
    _write(run / "warp" / "front" / "front.jsonl",
           [{"point": f"front/eta_{e:g}", "eta": e, "reward": 0.5 + 0.1 * e, "kl": 0.3 * e} for e in (0.0, 0.5, 1.0)]
           + [{"point": "iteration_1/run_1", "reward": 0.6, "kl": 0.2}, {"point": "iteration_1/merge", "reward": 0.62,
                                                                          "kl": 0.18}])
    return run


def test_the_report_tells_the_chains_story(chained_run):
    """The chain as an inline SVG (every stage, arrows for what each read, evaluations with their
    intervals under the stage they scored), one accuracy chart, WARM's members beside their average,
    the reward mix with fault totals over every warp run, the J-BOND and WARP reward-against-KL
    figures, the data card and timings; all inside the one file."""
    from posttrain.pipeline.report import load_run, render, reward_mix_rows, rl_runs, warm_figures

    page = render(load_run(chained_run))
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    svg = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    for name in ("filter", "sft", "rm", "warp"):
        assert f'class="stage" data-stage="{name}"' in svg
    for name in ("eval_sft", "eval_warp"):
        assert f'class="evaluation" data-stage="{name}"' in svg
    assert svg.count("marker-end") >= 5  # filter->sft, sft->rm, sft->warp, rm->warp, and the two evaluations
    assert "math 0.90 [0.83, 0.95]" in svg and "in: dirty" in svg and "out: model, front" in svg
    # story order: chain, accuracy, data, reward models, RL, then details
    heads = ["The chain as it ran", "Held-out accuracy after every stage", "Data filtering", "Reward models",
             "Reinforcement learning", "Recipe"]
    assert [page.index(h) for h in heads] == sorted(page.index(h) for h in heads)
    held = page.split("Held-out accuracy after every stage", 1)[1].split("<h2>", 1)[0]
    assert held.count("<img") == 1 and "0.9 [0.83, 0.95]" in held  # one chart, the table with intervals
    figures = warm_figures(load_run(chained_run)["stages"][3]["manifest"])
    assert {(m, n) for _, m, _, n in figures} == {("member_1", 50), ("member_2", 50), ("average", 50), ("ensemble", 50)}
    warm = page.split("<h2>Reward models</h2>", 1)[1].split("<h2>", 1)[0]
    assert "25% had their labels flipped" in warm and warm.count("<img") == 1 and "average" in warm
    warp = next(s for s in load_run(chained_run)["stages"] if s["manifest"]["name"] == "warp")
    assert [label for label, _ in rl_runs(warp)] == ["it1/run_1", "it1/run_2", "it2/run_1", "it2/run_2"]
    mix = {r["reward"]: r for r in reward_mix_rows(warp)}
    assert mix["code"]["faults"] == 1 and mix["code"]["steps"] == 4 and mix["warm"]["normalize"]
    assert mix["math"]["weight"] == 1.0 and mix["warm"]["weight"] == 0.2
    rl = page.split("Reinforcement learning", 1)[1].split("<h2>", 1)[0]
    assert "algorithm jbond, 4 runs" in rl and "<td class=failed>1</td>" in rl and rl.count("<img") == 1
    images_in_page = images(page)
    assert all(p.startswith(b"\x89PNG") for p in images_in_page) and len(images_in_page) >= 4  # timing, accuracy, WARM, RL


def _screenshot_tool():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_renders_in_a_headless_browser_with_every_section_and_no_fetch(chained_run, tmp_path):
    from posttrain.pipeline.report import write_report

    tool = _screenshot_tool()
    if tool.find_browser() is None:
        pytest.skip("no headless browser installed (Playwright's Chromium, chromium, chrome, firefox or wkhtmltoimage)")
    seen = tool.screenshot(write_report(chained_run), tmp_path / "report.png", width=1200)
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    if seen["sections"] is not None:  # Playwright: the page as laid out, and what it asked the network for
        assert seen["external_requests"] == []
        assert len(seen["sections"]) >= 6 and all(visible for _, visible in seen["sections"])


def test_the_screenshot_command_says_when_no_browser_is_installed(chained_run, tmp_path, monkeypatch, capsys):
    from posttrain.pipeline.report import write_report

    tool = _screenshot_tool()
    monkeypatch.setattr(tool, "find_browser", lambda: None)
    assert tool.main([str(write_report(chained_run)), "--out", str(tmp_path / "x.png")]) == tool.NO_BROWSER
    assert "no headless browser found" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_the_screenshot_check_counts_a_page_that_fetches_from_the_network(tmp_path):
    """The no-fetch check can fail: a page with one external image is caught (and the fetch blocked)."""
    tool = _screenshot_tool()
    browser = tool.find_browser()
    if browser is None or not browser.startswith(tool.PLAYWRIGHT):
        pytest.skip("needs Playwright driving a Chromium (the executables alone do not report requests)")
    page = tmp_path / "report.html"
    page.write_text("<html><body><h2>one</h2><img src='http://example.invalid/x.png'><h2 style='display:none'>two</h2>"
                    "</body></html>")
    seen = tool.screenshot(page, tmp_path / "shot.png")
    assert seen["external_requests"] == ["http://example.invalid/x.png"]
    assert [visible for _, visible in seen["sections"]] == [True, False]
