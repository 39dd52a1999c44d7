"""The run report: one self-contained HTML file (plots embedded as PNG) describing a run directory.

It reads only what the run wrote (`recipe.resolved.yaml`, each stage's `manifest.json`,
`metrics.jsonl`, the filter's report and data card, `evaluation.json`, a WARP front), so it
works for any earlier run and for runs with a failed stage. It tells the run's story in order:
the chain as it ran (an inline SVG of the stages, what each read and produced, with timings),
held-out accuracy after every stage (one chart and a table, 95% intervals), the filter's data
card, reward models (WARM members beside their average), RL (the reward mix with fault counts,
and reward against KL: the J-BOND/RLOO runs and the WARP front), then training curves, stage
summaries and the resolved recipe. Nothing is fetched: no script, style, font or image from elsewhere.

    posttrain report RUN_DIR [--out FILE]      # default RUN_DIR/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

REPORT_NAME = "report.html"
# Training curves worth a plot, by what the metric's name contains (first match names the panel).
CURVES = (("loss", "loss"), ("reward", "reward"), ("kl", "KL"), ("entropy", "entropy"), ("drift", "drift"))


# --- reading the run ----------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(run_dir: str | Path) -> dict:
    """The recipe and, in recipe order, each stage's manifest (or its attempt when it never finished)."""
    import yaml

    run = Path(run_dir).resolve()  # stages record absolute paths: lineage matches them against this
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run directory")
    recipe_file = run / "recipe.resolved.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.exists() else {}
    names = [s.get("name") for s in (recipe or {}).get("stages", []) if isinstance(s, dict)]
    others = [p.parent.name for p in run.glob("*/manifest.json") if p.parent.name not in names]
    if others:  # the last run covered part of the recipe (--only): order every stage by when it started
        names = sorted(names + others, key=lambda n: (_read_json(run / n / "manifest.json") or {}).get("started") or 0)
    stages = []
    for name in names:
        d = run / name
        manifest = _read_json(d / "manifest.json")
        if manifest is None:
            attempt = _read_json(d / "attempt.json")
            kind = next((s.get("kind") for s in recipe.get("stages", []) if s.get("name") == name), "?")
            manifest = {"name": name, "kind": kind, "status": "interrupted" if attempt else "not run",
                        "started": (attempt or {}).get("started"), "metrics": {}, "outputs": {}}
        manifest.setdefault("name", name)
        stages.append({"dir": d, "manifest": manifest, "metrics": _read_jsonl(d / "metrics.jsonl")})
    if not stages:
        raise FileNotFoundError(f"{run}: no stages found (no recipe.resolved.yaml and no */manifest.json)")
    return {"dir": run, "recipe": recipe or {}, "stages": stages}


def lineage(manifest: dict, run_dir: Path) -> list[str]:
    """What a stage read: other stages' outputs (by stage name) and recipe inputs, from its config."""
    found: list[str] = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith(str(run_dir)):
            rel = Path(v).relative_to(run_dir).parts
            if not rel:
                return
            label = f"{rel[1]}/{Path(*rel[2:]).stem}" if rel[0] == "_inputs" and len(rel) > 2 else rel[0]
            if rel[0] != "_inputs":
                label = f"stage {rel[0]}"
            if label not in found:
                found.append(label)

    walk(manifest.get("config", {}))
    return found


# --- plots --------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is written from servers and CI
    import matplotlib.pyplot as plt

    return plt


PANEL_COLUMNS = 3  # panels per row: five side by side were too narrow to read


def curve_panels(rows: list[dict]) -> tuple[dict[str, list[str]], dict[str, tuple[Any, float]]]:
    """({panel title: metric keys with at least two points}, {key: (step, value)} of the metrics
    logged once): one point on a step axis draws no curve, so it is reported as a number instead
    (a rollout drift check that ran once, an evaluation at the end)."""
    panels: dict[str, list[str]] = {}
    single: dict[str, tuple[Any, float]] = {}
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "time", "epoch")})
    for key in keys:
        low = key.lower()
        if low.endswith(("_ci_low", "_ci_high", "_n", "std", "faults", "skipped")) or low.startswith(("time", "seconds")):
            continue  # spreads and counters: in the manifest, not worth a line
        title = next((t for needle, t in CURVES if needle in low), None)
        if title is None:
            continue
        if title == "KL" and f"{key}_k3" in keys:
            continue  # the k1 estimate of the same KL: its batches can be negative; the k3 curve is drawn
        pts = _points(rows, key)
        if len(pts) >= 2:
            panels.setdefault(title, []).append(key)
        elif pts:
            single[key] = pts[0]
    return {title: panels[title] for _, title in CURVES if title in panels}, single


def _points(rows: list[dict], key: str) -> list[tuple[Any, float]]:
    return [(r.get("step", i), r[key]) for i, r in enumerate(rows)
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def curves_figure(stage: str, rows: list[dict]):
    """The figure of a stage's curves: one panel per family (loss, reward, KL, entropy, drift), at
    most PANEL_COLUMNS to a row, each legend below its panel so that it covers no curve."""
    panels, _ = curve_panels(rows)
    if not panels:
        return None
    plt = _pyplot()
    ncols = min(PANEL_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, ks) in zip(flat, panels.items()):
        shown = ks[:6]  # a legend beyond six lines is unreadable
        for k in shown:
            pts = _points(rows, k)
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(f"{stage}: {title}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # show the values themselves, not an offset
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def curves_plot(stage: str, rows: list[dict]) -> str | None:
    """The stage's curves as an embedded PNG (see curves_figure)."""
    fig = curves_figure(stage, rows)
    return None if fig is None else _png(fig)


def accuracy_plot(table: dict[str, dict[str, dict]], stage_order: list[str],
                  labels: list[str] | None = None) -> str | None:
    """Held-out accuracy per set after every evaluated stage, with 95% intervals as error bars, in
    one chart (`labels`: the x tick of each evaluation, e.g. the stage whose model it scored)."""
    sets = sorted({s for row in table.values() for s in row})
    if not sets:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(stage_order)), 3.4))
    xs = list(range(len(stage_order)))
    spread = 0.08  # sets side by side at each stage, so that equal figures' intervals stay apart
    for i, s in enumerate(sets):
        pts = [(x + spread * (i - (len(sets) - 1) / 2), table[st][s]) for x, st in zip(xs, stage_order)
               if s in table.get(st, {})]
        if not pts:
            continue
        x, e = zip(*pts)
        v = [p["value"] for p in e]
        err = [[max(0.0, p["value"] - p["low"]) if _finite(p["low"]) else 0 for p in e],
               [max(0.0, p["high"] - p["value"]) if _finite(p["high"]) else 0 for p in e]]
        ax.errorbar(x, v, yerr=err, marker="o", capsize=3, label=s)
    ax.set_xticks(xs, labels or stage_order, rotation=20, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy (95% interval)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def timing_plot(stages: list[dict]) -> str | None:
    rows = [(s["manifest"]["name"], float(s["manifest"].get("seconds") or 0.0), s["manifest"].get("status"))
            for s in stages if s["manifest"].get("seconds") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(rows) + 0.8))
    colours = ["#c0392b" if st == "failed" else "#2e86c1" for _, _, st in rows]
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color=colours[::-1])
    ax.set_xlabel("seconds", fontsize=8)
    ax.tick_params(labelsize=8)
    return _png(fig)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --- figures from manifests ---------------------------------------------------------------------

def held_out_table(stages: list[dict]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """{stage: {set: {value, low, high, n}}} of the `evaluate` stages' accuracies, in run order."""
    table: dict[str, dict[str, dict]] = {}
    order = []
    for s in stages:
        m = s["manifest"]
        if m.get("kind") != "evaluate" or m.get("status") != "complete":
            continue
        metrics = m.get("metrics", {})
        row = {}
        for key, value in metrics.items():
            if key.endswith("/accuracy") and key.count("/") == 1:
                name = key.rsplit("/", 1)[0]
                row[name] = {"value": value, "low": metrics.get(f"{key}_ci_low", float("nan")),
                             "high": metrics.get(f"{key}_ci_high", float("nan")), "n": metrics.get(f"{key}_n")}
        if row:
            table[m["name"]] = row
            order.append(m["name"])
    return table, order


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "–"
    return html.escape(str(v))


def _estimate(e: dict) -> str:
    interval = f" [{_fmt(e['low'])}, {_fmt(e['high'])}]" if _finite(e.get("low")) else ""
    n = f" <span class=n>n={e['n']}</span>" if e.get("n") is not None else ""
    return f"{_fmt(e['value'])}{interval}{n}"


# --- the story's sections: reward models, rewards, reward against KL ----------------------------

def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion p measured on n items (the evaluate stage's own choice)."""
    if n <= 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rows_in(path: str | None) -> int | None:
    """Rows of a JSON-lines file a stage read (None when it is not one, or gone)."""
    if not path or not str(path).endswith(".jsonl"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def warm_figures(manifest: dict) -> list[tuple[str, str, float, int | None]]:
    """(held-out set, model, pairwise accuracy, pairs) of a reward_model stage: every member, the
    weight average (WARM) and the prediction ensemble, on eval_dataset and each eval_datasets set."""
    metrics, config = manifest.get("metrics") or {}, manifest.get("config") or {}
    sets = {"held-out": _rows_in(config.get("eval_dataset"))}
    sets.update({name: _rows_in(path) for name, path in (config.get("eval_datasets") or {}).items()})
    out = []
    for set_name, n in sets.items():
        prefix = "" if set_name == "held-out" else f"{set_name}/"
        found = [(k[len(prefix):].split("/")[0], v) for k, v in metrics.items()
                 if k.startswith(prefix) and k.endswith("/accuracy") and k.count("/") == prefix.count("/") + 1
                 and isinstance(v, (int, float))]
        for model, value in found:
            if model.startswith("member_") or model in ("average", "ensemble"):
                out.append((set_name, model, float(value), n))
    return out


def warm_plot(figures: list[tuple[str, str, float, int | None]]) -> str | None:
    """Each member's pairwise accuracy beside the weight average's (and the ensemble's), with 95%
    intervals, per held-out set; a dashed line marks the members' mean."""
    if not figures:
        return None
    plt = _pyplot()
    sets = list(dict.fromkeys(f[0] for f in figures))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.0), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        rows = [f for f in figures if f[0] == set_name]
        names = [f[1].replace("_", " ") for f in rows]
        values = [f[2] for f in rows]
        colours = ["#7fb3d5" if f[1].startswith("member_") else "#1e8449" if f[1] == "average" else "#b9770e"
                   for f in rows]
        intervals = [wilson_interval(f[2], f[3]) if f[3] else (f[2], f[2]) for f in rows]
        err = [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]
        ax.bar(names, values, color=colours, yerr=err, capsize=3)
        members = [f[2] for f in rows if f[1].startswith("member_")]
        if members:
            ax.axhline(sum(members) / len(members), color="#555", linestyle="--", linewidth=1, label="members' mean")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_ylim(max(0.0, min(values) - 0.15), min(1.0, max(values) + 0.1))
        ax.set_title(f"pairwise accuracy, {set_name} pairs" + (f" (n={rows[0][3]})" if rows[0][3] else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def rl_runs(stage: dict) -> list[tuple[str, list[dict]]]:
    """(label, metrics rows) of each RL run of a stage: the rl stage itself, or every run of every
    warp iteration (iteration_<i>/run_<m>)."""
    if stage["manifest"].get("kind") == "warp":
        runs = sorted(stage["dir"].glob("iteration_*/run_*/metrics.jsonl"),
                      key=lambda p: (int(p.parent.parent.name.split("_")[1]), int(p.parent.name.split("_")[1])))
        return [(f"{p.parent.parent.name.replace('iteration_', 'it')}/{p.parent.name}", _read_jsonl(p)) for p in runs]
    return [(stage["manifest"]["name"], stage["metrics"])] if stage["metrics"] else []


def reward_mix_rows(stage: dict) -> list[dict]:
    """Per reward of an rl or warp stage: its spec (function, weight, normalised) and, over every
    logged step of every run, the mean of its per-step means (steps it applied to) and its faults."""
    specs = (stage["manifest"].get("config") or {}).get("rewards") or []
    runs = rl_runs(stage)
    out = []
    for spec in specs:
        label = spec.get("name") or spec.get("fn")
        means = [r[f"reward/{label}/mean"] for _, rows in runs for r in rows
                 if _finite(r.get(f"reward/{label}/mean"))]
        faults = sum(r.get(f"reward/{label}/faults", 0) or 0 for _, rows in runs for r in rows)
        out.append({"reward": label, "function": spec.get("fn") or label, "weight": spec.get("weight", 1.0),
                    "normalize": bool(spec.get("normalize")), "fallback": bool(spec.get("fallback")), "mean": sum(means) / len(means) if means else float("nan"),
                    "steps": len(means), "faults": int(faults)})
    return out


def reward_kl_plot(stage: dict) -> str | None:
    """Reward against KL. Left: each RL run's held-out reward against its KL to the run's start
    (before training, every eval_every steps, after), for J-BOND or RLOO alike. Right, for warp: the
    LITI front between the start model and the last merge, and every run, merge and LITI point,
    each as (KL to the start model, held-out reward)."""
    curves = []
    for label, rows in rl_runs(stage):
        kl_at, points = {0: 0.0}, []
        for r in rows:
            if _finite(r.get("kl_start")):
                kl_at[r.get("step", 0)] = r["kl_start"]
        for r in rows:
            if _finite(r.get("eval/reward")):
                step = r.get("step", 0)
                points.append((kl_at.get(step, kl_at[max(k for k in kl_at if k <= step)]), r["eval/reward"]))
        if len(points) >= 2:
            curves.append((label, points))
    front_rows = _read_jsonl(stage["dir"] / "front" / "front.jsonl")
    if not curves and not front_rows:
        return None
    plt = _pyplot()
    panels = 1 + bool(front_rows)
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    algorithm = (stage["manifest"].get("config") or {}).get("algorithm", "rloo")
    name = {"jbond": "J-BOND", "bond": "BOND"}.get(algorithm, "RLOO")
    for label, points in curves:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.ticklabel_format(axis="y", useOffset=False)  # rewards as they are, not as an offset
    ax.set_title(f"{name} runs: held-out reward against KL to the run's start", fontsize=9)
    ax.set_xlabel("KL(pi || pi_start), nats per completion", fontsize=8)
    ax.set_ylabel("held-out reward (greedy)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=6, ncol=2)
    if front_rows:
        ax = axes[0][1]
        front = sorted((r for r in front_rows if r.get("point", "").startswith("front/")), key=lambda r: r.get("eta", 0))
        if front:
            ax.plot([r["kl"] for r in front], [r["reward"] for r in front], "-o", color="black", label="LITI front")
            for r in front:
                ax.annotate(f"eta {r.get('eta', 0):g}", (r["kl"], r["reward"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        for kind, marker in (("run", "x"), ("merge", "*"), ("liti", "s")):
            pts = [r for r in front_rows if r.get("point", "").split("/")[-1].split("_")[0] == kind]
            if pts:
                ax.scatter([r["kl"] for r in pts], [r["reward"] for r in pts], marker=marker, s=45, label=kind)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title("WARP: the LITI front, merges (SLERP) and runs", fontsize=9)
        ax.set_xlabel("KL(pi || pi_sft) on held-out prompts", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _proportion(value: float, n: int | None) -> dict:
    low, high = wilson_interval(value, n) if n else (float("nan"), float("nan"))
    return {"value": value, "low": low, "high": high, "n": n}


def _reward_models_section(stages: list[dict]) -> str:
    parts = []
    for s in stages:
        m = s["manifest"]
        if m.get("kind") != "reward_model":
            continue
        figures = warm_figures(m)
        if not figures:
            continue
        config = m.get("config") or {}
        flip = config.get("label_flip_rate")
        members = len({f[1] for f in figures if f[1].startswith("member_")})
        parts.append(f"<h3>{html.escape(m['name'])}: {members} members and their weight average (WARM)</h3>"
                     "<p>Trained on preference pairs"
                     + (f" of which {flip:.0%} had their labels flipped" if isinstance(flip, (int, float)) and flip else "")
                     + "; pairwise accuracy on held-out pairs, 95% Wilson intervals. `average` is the one model"
                     " the next stages use; `ensemble` averages the members' scores instead (for comparison).</p>")
        plot = warm_plot(figures)
        if plot:
            parts.append(_img(plot, f"{m['name']}: members beside their average"))
        rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{_estimate(_proportion(v, n))}</td></tr>"
                       for a, b, v, n in figures)
        parts.append(f"<table><tr><th>pairs</th><th>model</th><th>accuracy [95%] n</th></tr>{rows}</table>")
    return ("<h2>Reward models</h2>" + "".join(parts)) if parts else ""


def _rl_section(stages: list[dict]) -> str:
    parts = []
    for s in stages:
        m = s["manifest"]
        if m.get("kind") not in ("rl", "warp"):
            continue
        config = m.get("config") or {}
        algorithm = config.get("algorithm", "rloo")
        runs = rl_runs(s)
        parts.append(f"<h3>{html.escape(m['name'])} ({html.escape(str(m.get('kind')))}, algorithm "
                     f"{html.escape(str(algorithm))}, {len(runs)} run{'s' if len(runs) != 1 else ''})</h3>")
        mix = reward_mix_rows(s)
        if mix:
            rows = "".join(f"<tr><td>{html.escape(str(r['reward']))}</td><td>{html.escape(str(r['function']))}</td>"
                           f"<td>{_fmt(float(r['weight']))}</td><td>{'yes' if r['normalize'] else 'no'}</td>"
                           f"<td>{'where no other applies' if r['fallback'] else 'wherever it applies'}</td>"
                           f"<td>{_fmt(r['mean'])}</td><td>{r['steps']}</td>"
                           f"<td{' class=failed' if r['faults'] else ''}>{r['faults']}</td></tr>" for r in mix)
            parts.append("<p>The reward mix: the combined reward is the weighted sum of the rewards that apply to a "
                         "sample (a verifier applies to its own task's prompts; a fallback reward only where no other "
                         "does). Mean of its raw scores over the logged steps of each step's mean, over every run; "
                         "faults are totals.</p><table><tr><th>reward</th><th>function</th>"
                         f"<th>weight</th><th>normalised</th><th>scores</th><th>mean</th><th>steps applied</th><th>faults</th></tr>{rows}</table>")
        plot = reward_kl_plot(s)
        if plot:
            parts.append(_img(plot, f"{m['name']}: reward against KL"))
    return ("<h2>Reinforcement learning: rewards, and reward against KL</h2>" + "".join(parts)) if parts else ""


# --- HTML ---------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em} td,th{border:1px solid #ddd;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f4f6f8} .complete{color:#1e8449} .failed{color:#c0392b;font-weight:bold} .skipped{color:#2874a6}
.interrupted,.notrun{color:#b9770e} pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em;max-height:28em}
.n{color:#888;font-size:.85em} img{max-width:100%} .chain{overflow-x:auto;border:1px solid #eee;padding:.3em} .chain svg{max-width:100%;height:auto} .error{background:#fdecea;border-left:4px solid #c0392b;padding:.5em}
"""


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies under it (runs/quickstart): a report
    is a file people pass around, and the absolute path says more about the machine than the run."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def render(run: dict) -> str:
    """The report's HTML, in the order of the run's story: the chain as it ran, accuracy after every
    stage, the data, the reward models, the RL, then the details (curves, summaries, recipe)."""
    run_dir: Path = run["dir"]
    recipe = run["recipe"]
    stages = run["stages"]
    title = recipe.get("name") or run_dir.name
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>posttrain report: {html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>posttrain report: {html.escape(title)}</h1>",
             f"<p>Run directory <code>{html.escape(_shown_path(run_dir))}</code>; report written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}. {status_counts(stages)}.</p>"]
    parts.append(_chain_section(stages, run_dir))
    parts.append(_held_out_section(stages, run_dir))
    for s in stages:
        if s["manifest"].get("kind") == "filter":
            parts.append(_filter_section(s))
    parts.append(_reward_models_section(stages))
    parts.append(_rl_section(stages))
    parts.append(_curves_section(stages))
    parts.append(_summaries_section(stages))
    parts.append("<h2>Recipe</h2><details><summary>recipe.resolved.yaml</summary><pre>"
                 + html.escape((run_dir / "recipe.resolved.yaml").read_text() if (run_dir / "recipe.resolved.yaml").exists()
                               else "(not written)") + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _chain_section(stages: list[dict], run_dir: Path) -> str:
    from posttrain.pipeline.report_chain import chain_svg

    parts = ["<h2>The chain as it ran</h2><p>Each box is a stage in run order: its kind and wall time, the recipe "
             "inputs it read (in) and what it produced (out); an arrow is a stage reading another's output. "
             "Below a stage, the evaluations of its model with their held-out accuracies and 95% intervals.</p>",
             f"<div class=chain>{chain_svg(stages, run_dir, lambda m: lineage(m, run_dir))}</div>",
             "<h3>Stages and timings</h3><table><tr><th>stage</th><th>kind</th><th>status</th><th>started</th>"
             "<th>wall time</th><th>read</th><th>outputs</th></tr>"]
    for s in stages:
        m = s["manifest"]
        status = m.get("status", "?")
        started = time.strftime("%H:%M:%S", time.localtime(m["started"])) if m.get("started") else "–"
        seconds = f"{m['seconds']:.1f} s" if m.get("seconds") is not None else "–"
        outs = ", ".join(html.escape(k) for k in (m.get("outputs") or {}))
        parts.append(f"<tr><td>{html.escape(m['name'])}</td><td>{html.escape(str(m.get('kind')))}</td>"
                     f"<td class={status.replace(' ', '')}>{html.escape(status)}</td><td>{started}</td><td>{seconds}</td>"
                     f"<td>{html.escape(', '.join(lineage(m, run_dir))) or '–'}</td><td>{outs or '–'}</td></tr>")
    parts.append("</table>")
    for s in stages:
        m = s["manifest"]
        if m.get("status") == "failed":
            parts.append(f"<div class=error><b>{html.escape(m['name'])} failed:</b> {html.escape(str(m.get('error', '')))}"
                         f"<details><summary>traceback</summary><pre>{html.escape(str(m.get('traceback', ''))[-6000:])}"
                         "</pre></details></div>")
    timing = timing_plot(stages)
    if timing:
        parts.append(_img(timing, "wall time per stage"))
    return "\n".join(parts)


def _held_out_section(stages: list[dict], run_dir: Path) -> str:
    table, order = held_out_table(stages)
    parts = ["<h2>Held-out accuracy after every stage</h2>"]
    if not table:
        return parts[0] + "<p>No completed evaluate stage in this run.</p>"
    sets = sorted({k for row in table.values() for k in row})
    parts.append("<table><tr><th>after</th><th>model</th>" + "".join(f"<th>{html.escape(x)}</th>" for x in sets) + "</tr>")
    by_name = {s["manifest"]["name"]: s for s in stages}
    labels = []
    for name in order:
        model = by_name[name]["manifest"].get("config", {}).get("model", "")
        origin = lineage({"config": {"model": model}}, run_dir)
        labels.append(origin[0].removeprefix("stage ") if origin else name)
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(', '.join(origin) or str(model))}</td>"
                     + "".join(f"<td>{_estimate(table[name][x]) if x in table[name] else '–'}</td>" for x in sets)
                     + "</tr>")
    parts.append("</table>")
    plot = accuracy_plot(table, order, labels=[f"after {x}" for x in labels])
    if plot:
        parts.append(_img(plot, "held-out accuracy after every stage"))
    parts += [_evaluation_details(by_name[name]) for name in order]
    return "\n".join(parts)


def _curves_section(stages: list[dict]) -> str:
    curve_parts = []
    for s in stages:
        if s["metrics"]:
            img = curves_plot(s["manifest"]["name"], s["metrics"])
            _, single = curve_panels(s["metrics"])
            once = ("<p>Logged once: " + "; ".join(f"{html.escape(k)} = {_fmt(v)} (step {html.escape(str(step))})"
                                                    for k, (step, v) in single.items()) + "</p>") if single else ""
            if img or once:
                curve_parts.append(f"<h3>{html.escape(s['manifest']['name'])} ({html.escape(str(s['manifest'].get('kind')))}, "
                                   f"{len(s['metrics'])} logged steps)</h3>"
                                   + (_img(img, s['manifest']['name'] + ' curves') if img else "") + once)
    return ("<h2>Training curves</h2>" + "".join(curve_parts)) if curve_parts else ""


def _summaries_section(stages: list[dict]) -> str:
    other = [s for s in stages if s["manifest"].get("kind") not in ("evaluate", "filter") and s["manifest"].get("metrics")]
    if not other:
        return ""
    parts = ["<h2>Stage summaries</h2><p>Each stage's summary figures as recorded in its manifest "
             "(accuracies of reward models, before/after evaluations of training stages).</p>"]
    for s in other:
        m = s["manifest"]
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in m["metrics"].items()
                       if isinstance(v, (int, float, str)))
        parts.append(f"<details{' open' if any('accuracy' in k for k in m['metrics']) else ''}><summary>"
                     f"{html.escape(m['name'])} ({html.escape(str(m.get('kind')))})</summary><table>{rows}</table></details>")
    return "".join(parts)


def status_counts(stages: list[dict]) -> str:
    """'5 stages: 2 complete, 1 failed, 2 not run' over every stage of the recipe."""
    counts: dict[str, int] = {}
    for s in stages:
        status = s["manifest"].get("status", "?")
        counts[status] = counts.get(status, 0) + 1
    shown = ", ".join((f"<span class=failed>{n} {html.escape(st)}</span>" if st == "failed" else f"{n} {html.escape(st)}")
                      for st, n in counts.items())
    return f"{len(stages)} stage{'s' if len(stages) != 1 else ''}: {shown}"


def _evaluation_details(stage: dict) -> str:
    ev = _read_json(stage["dir"] / "evaluation.json")
    if not ev:
        return ""
    rows = []
    for set_name, info in ev.get("sets", {}).items():
        for key, e in info.get("figures", {}).items():
            rows.append(f"<tr><td>{html.escape(set_name)}</td><td>{html.escape(key)}</td><td>{_estimate(e)}</td></tr>")
        for key, e in (info.get("side_by_side") or {}).items():
            if isinstance(e, dict):
                rows.append(f"<tr><td>{html.escape(set_name)}</td><td>side by side: {html.escape(key)}</td><td>{_estimate(e)}</td></tr>")
    return (f"<details><summary>all figures of {html.escape(stage['manifest']['name'])} (task metrics, safety, length)"
            f"</summary><table><tr><th>set</th><th>figure</th><th>value [95% interval] n</th></tr>{''.join(rows)}</table></details>")


def _filter_section(stage: dict) -> str:
    d = stage["dir"]
    rep = _read_json(d / "filter_report.json") or {}
    out = [f"<h2>Data filtering: {html.escape(stage['manifest']['name'])}</h2>"]
    if rep:
        out.append(f"<p>{rep.get('input_rows', '?')} input rows; kept {rep.get('kept_rows', '?')} "
                   f"(redacted {rep.get('redacted_rows', 0)}); rejected {rep.get('rejected_rows', '?')}.</p>")
        rows = "".join(f"<tr><td>{html.escape(f)}</td><td>{html.escape(r)}</td><td>{n}</td></tr>"
                       for f, reasons in (rep.get("rejected_by") or {}).items() for r, n in reasons.items())
        if rows:
            out.append(f"<table><tr><th>filter</th><th>reason</th><th>rows</th></tr>{rows}</table>")
    card = d / "data_card.md"
    if card.exists():
        out.append(f"<details><summary>data card</summary><pre>{html.escape(card.read_text()[:20000])}</pre></details>")
    return "".join(out)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run directory (default `RUN_DIR/report.html`); returns its path."""
    run = load_run(run_dir)
    path = Path(out) if out else Path(run_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(run), encoding="utf-8")
    tmp.replace(path)
    return path
