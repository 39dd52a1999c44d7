"""The chain as it ran, drawn as inline SVG for the run report: one box per stage in run order,
what it read (recipe inputs inside the box, other stages' outputs as arrows) and produced, its
status and wall time; each evaluate stage hangs below the stage whose model it scored, with its
held-out accuracies.

Inline SVG rather than a plot image: the boxes carry text a reader can select and search, the file
stays self-contained (no script, no font or image fetched), and a browser lays it out at any width.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

COLUMN = 158  # px per stage column
BOX_W, BOX_H = 148, 96
EVAL_H = 64
TOP = 78  # room above the boxes for arcs between stages that are not neighbours
STATUS_COLOURS = {"complete": "#1e8449", "failed": "#c0392b", "interrupted": "#b9770e", "not run": "#999999"}


def _source_stage(label: str) -> str | None:
    return label.removeprefix("stage ") if label.startswith("stage ") else None


def chain_layout(stages: list[dict], lineage_of) -> tuple[list[dict], dict[str, list[dict]]]:
    """(the columns: every stage but the evaluate stages, in run order; {column stage: the evaluate
    stages scoring its model}). An evaluate stage whose model came from no column is a column itself."""
    columns = [s for s in stages if s["manifest"].get("kind") != "evaluate"]
    names = {s["manifest"]["name"] for s in columns}
    below: dict[str, list[dict]] = {}
    for s in stages:
        if s["manifest"].get("kind") != "evaluate":
            continue
        sources = [_source_stage(x) for x in lineage_of(s["manifest"])]
        scored = next((x for x in sources if x in names), None)
        if scored is None:
            columns.append(s)
            names.add(s["manifest"]["name"])
        else:
            below.setdefault(scored, []).append(s)
    order = {s["manifest"]["name"]: i for i, s in enumerate(stages)}
    columns.sort(key=lambda s: order[s["manifest"]["name"]])
    return columns, below


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "…"


def _text(x: float, y: float, text: str, size: int = 11, weight: str = "normal", colour: str = "#222") -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" font-weight="{weight}" fill="{colour}">'
            f"{html.escape(text)}</text>")


def _box_lines(manifest: dict, inputs: list[str]) -> list[tuple[str, int, str]]:
    seconds = manifest.get("seconds")
    timing = f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else manifest.get("status", "?")
    lines = [(_clip(manifest["name"], 20), 12, "bold"), (_clip(f"{manifest.get('kind')} · {timing}", 24), 10, "normal")]
    if inputs:
        lines.append((_clip("in: " + ", ".join(x.split("/", 1)[-1] for x in inputs), 26), 9, "normal"))
    outs = list((manifest.get("outputs") or {}))
    lines.append((_clip("out: " + (", ".join(outs) or "–"), 26), 9, "normal"))
    return lines


def _accuracy_lines(manifest: dict) -> list[str]:
    metrics = manifest.get("metrics") or {}
    out = []
    for key, value in metrics.items():
        if key.endswith("/accuracy") and key.count("/") == 1 and isinstance(value, (int, float)):
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            interval = (f" [{low:.2f}, {high:.2f}]" if isinstance(low, (int, float)) and isinstance(high, (int, float))
                        and math.isfinite(low) and math.isfinite(high) else "")
            out.append(f"{key.rsplit('/', 1)[0]} {value:.2f}{interval}")
    return out


def chain_svg(stages: list[dict], run_dir: Path, lineage_of) -> str:
    """The SVG element of the chain (see the module docstring); `lineage_of(manifest)` lists what a
    stage read ("stage NAME" for another stage's output, "datasets/NAME" or "models/NAME")."""
    columns, below = chain_layout(stages, lineage_of)
    if not columns:
        return ""
    x_of = {s["manifest"]["name"]: 8 + i * COLUMN for i, s in enumerate(columns)}
    rows_below = max((len(v) for v in below.values()), default=0)
    height = TOP + BOX_H + rows_below * (EVAL_H + 22) + 16
    width = 16 + len(columns) * COLUMN
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="the chain of stages as it ran" font-family="system-ui,sans-serif">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    edges, boxes = [], []
    arcs_out: dict[str, int] = {}  # arcs leaving / reaching each box so far: each gets its own spot
    arcs_in: dict[str, int] = {}
    for s in columns:
        m = s["manifest"]
        name, x = m["name"], x_of[m["name"]]
        read = lineage_of(m)
        inputs = [r for r in read if _source_stage(r) is None]
        colour = STATUS_COLOURS.get(m.get("status", ""), "#999999")
        boxes.append(f'<g class="stage" data-stage="{html.escape(name)}"><rect x="{x}" y="{TOP}" width="{BOX_W}" '
                     f'height="{BOX_H}" rx="8" fill="#fbfcfd" stroke="{colour}" stroke-width="2"/>')
        y = TOP + 18
        for text, size, weight in _box_lines(m, inputs):
            boxes.append(_text(x + 8, y, text, size, weight))
            y += size + 8
        boxes.append("</g>")
        for source in dict.fromkeys(_source_stage(r) for r in read):
            if source is None or source not in x_of or source == name:
                continue
            x1, x2 = x_of[source], x
            if abs(x2 - x1) == COLUMN:  # neighbours: a straight arrow between the boxes
                left, right = (x1 + BOX_W, x2) if x2 > x1 else (x1, x2 + BOX_W)
                edges.append(f'<path d="M{left},{TOP + BOX_H / 2} L{right},{TOP + BOX_H / 2}" stroke="#555" '
                             'fill="none" marker-end="url(#arrow)"/>')
            else:  # further apart: an arc above the boxes, higher the further it goes
                lift = min(TOP - 6, 16 + 10 * abs(x2 - x1) / COLUMN)
                j, k = arcs_out.get(source, 0), arcs_in.get(name, 0)
                arcs_out[source], arcs_in[name] = j + 1, k + 1
                a, b = x1 + BOX_W / 2 + 10 * j, x2 + 24 + 12 * k
                edges.append(f'<path d="M{a},{TOP} C{a},{TOP - lift} {b},{TOP - lift} {b},{TOP}" stroke="#555" '
                             'fill="none" marker-end="url(#arrow)"/>')
        for j, e in enumerate(below.get(name, [])):
            em = e["manifest"]
            top = TOP + BOX_H + 22 + j * (EVAL_H + 22)
            edges.append(f'<path d="M{x + BOX_W / 2},{top - 22} L{x + BOX_W / 2},{top}" stroke="#555" fill="none" '
                         'marker-end="url(#arrow)"/>')
            colour = STATUS_COLOURS.get(em.get("status", ""), "#999999")
            boxes.append(f'<g class="evaluation" data-stage="{html.escape(em["name"])}"><rect x="{x}" y="{top}" '
                         f'width="{BOX_W}" height="{EVAL_H}" rx="6" fill="#f4f8fb" stroke="{colour}" '
                         'stroke-dasharray="4 2"/>')
            boxes.append(_text(x + 8, top + 15, _clip(em["name"], 22), 11, "bold"))
            for k, line in enumerate(_accuracy_lines(em)[:3]):
                boxes.append(_text(x + 6, top + 30 + 12 * k, _clip(line, 34), 8))
            boxes.append("</g>")
    parts += edges + boxes + ["</svg>"]
    return "".join(parts)
