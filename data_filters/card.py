"""The data card: a markdown summary of a filter run, safe to publish.

Examples are shown with PII redacted and truncated; evidence that quotes matched PII is
reduced to its kind.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_filters.pii import redact_pii


def _safe_evidence(evidence) -> str:
    if isinstance(evidence, list):  # PII spans: show kinds, never the matched text
        kinds = sorted({e.get("kind", "?") for e in evidence if isinstance(e, dict)})
        return f"{len(evidence)} span(s): {', '.join(kinds)}"
    text = json.dumps(evidence, ensure_ascii=False)
    return redact_pii(text)[:200]


def _snippet(raw: str, limit: int = 240) -> str:
    text = redact_pii(raw)
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", " ")


def write_data_card(report, config, path: Path, sample_every: int = 500) -> None:
    pct = (lambda n: f"{100 * n / report.input_rows:.2f}%") if report.input_rows else (lambda n: "-")
    lines = [
        "# Data card: filtering",
        "",
        f"- input rows: {report.input_rows}",
        f"- kept: {report.kept_rows} ({pct(report.kept_rows)}), of which redacted: {report.redacted_rows}",
        f"- rejected: {report.rejected_rows} ({pct(report.rejected_rows)})",
        f"- time: {report.seconds:.1f} s",
        "",
        "Every input row is in exactly one of `kept.jsonl` and `rejected.jsonl`; the latter "
        "holds each rejected row with its filter, reason and evidence.",
        "",
        "## Rejections by filter and reason",
        "",
        "| filter | reason | rows | share of input |",
        "|---|---|---:|---:|",
    ]
    for flt, reasons in sorted(report.rejected_by.items()):
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {flt} | {reason} | {n} | {pct(n)} |")
    if report.sampled_languages:
        total = sum(report.sampled_languages.values())
        lines += ["", "## Languages", "",
                  f"Detected (langdetect) on a sample of {total} input row(s), every "
                  f"{sample_every}th:", "", "| language | sampled rows | share |", "|---|---:|---:|"]
        for lang, n in sorted(report.sampled_languages.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"| {lang} | {n} | {100 * n / total:.1f}% |")
    if report.rejected_by_language:
        lines += ["", "## Rejections by language of the rejected turn", "",
                  "| filter | language | rows |", "|---|---|---:|"]
        for flt, langs in sorted(report.rejected_by_language.items()):
            for lang, n in sorted(langs.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"| {flt} | {lang} | {n} |")
    if report.redactions:
        lines += ["", "## Redactions in kept rows", "", "| kind | spans |", "|---|---:|"]
        for kind, n in sorted(report.redactions.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {n} |")
    if report.examples:
        lines += ["", "## Examples (PII redacted, truncated)", ""]
        for key in sorted(report.examples):
            lines += [f"### {key}", "", "| evidence | row |", "|---|---|"]
            for ex in report.examples[key]:
                lines.append(f"| {_snippet(_safe_evidence(ex['evidence']), 200)} | {_snippet(ex['row'])} |")
            lines.append("")
    enabled = [name for name in ("quality", "pii", "toxicity", "identity", "decontaminate", "dedup")
               if config.active(name)]
    lines += ["", "## Configuration", "", f"Filters enabled: {', '.join(enabled) or 'none'}.", "",
              "```json", config.model_dump_json(indent=2), "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
