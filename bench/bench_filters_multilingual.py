"""The filters on many languages: toxicity, self-identification and PII, today's beside the new.

A labelled set built for this benchmark (`bench/filters_multilingual.jsonl`: 13 languages for
toxicity, 17 for self-identification, 15 for PII) holds, per language, toxic and clean
answers (the clean ones hold words that the word lists carry but that are ordinary in that
language, and words offensive only in another language: `false_friend`), claims of another
assistant's identity and non-claims (negations, mentions, questions), and answers with PII
beside look-alikes (dates, prices, versions, arithmetic, scores, page ranges). Each text is
the model turn of a two-turn chat row, run through the filter with its default settings.

"Today" is the `data_filters` package of `--baseline-ref` (default: the commit before the
multilingual filters), extracted with `git archive` and run in its own process; "new" is
this checkout. Both run the same rows; the report gives precision, recall and false
positives per language and filter, the rejections of false friends, the acceptance targets
(toxicity P and R >= 0.9; identity and PII R >= 0.9 with no more false positives than
English has today) and the filters' speed (rows per CPU-second, best of `--repeat`).

    python bench/bench_filters_multilingual.py
    python bench/bench_filters_multilingual.py --baseline-ref HEAD~5 --json results.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "bench" / "filters_multilingual.jsonl"
# The last commit before the multilingual filters: English-only lexicon, identity patterns
# for eight languages, phone regions fixed.
BASELINE_REF = "21a08ae"
FILTERS = ("toxicity", "identity", "pii")


def load_set(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: line {n}: not JSON ({e.msg})")
            missing = {"id", "language", "filter", "label", "text"} - set(row)
            if missing or row.get("filter") not in FILTERS or row.get("label") not in (0, 1):
                raise SystemExit(f"{path}: line {n}: expected id, language, filter in {FILTERS}, "
                                 f"label 0 or 1 and text; got keys {sorted(row)}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# one side (runs in its own process, with the data_filters package of `--repo`)

def score_side(repo: Path, rows: list[dict], repeat: int) -> dict:
    sys.path.insert(0, str(repo))
    from data_filters.chain import build_filters
    from data_filters.config import load_filter_config
    from data_filters.rows import Rejection, Rewrite, row_turns

    config = load_filter_config({"quality": None, "decontaminate": None, "dedup": None})
    filters = {f.name: f for f in build_filters(config)}
    items = {name: [] for name in FILTERS}
    for r in rows:
        chat = {"messages": [{"role": "user", "content": "Hello"},
                             {"role": "assistant", "content": r["text"]}]}
        items[r["filter"]].append((r, chat, row_turns(chat)))
    predictions, evidence, speed = {}, {}, {}
    for name, group in items.items():
        flt = filters[name]
        best = float("inf")
        # Loading (classifier, word lists, langdetect's profiles) is not what is timed.
        warm = [(chat, turns) for _, chat, turns in group[:1]]
        flt.batch(warm) if hasattr(flt, "batch") else flt(*warm[0])
        for _ in range(repeat):
            _clear_text_caches()
            start = time.process_time()
            if hasattr(flt, "batch"):
                decisions = flt.batch([(chat, turns) for _, chat, turns in group])
            else:
                decisions = [flt(chat, turns) for _, chat, turns in group]
            best = min(best, time.process_time() - start)
        for (r, _, _), d in zip(group, decisions):
            hit = isinstance(d, Rejection) or isinstance(d, Rewrite) and bool(d.changes)
            predictions[r["id"]] = int(hit)
            if isinstance(d, Rejection) and isinstance(d.evidence, dict):
                evidence[r["id"]] = d.evidence
        speed[name] = len(group) / best if best > 0 else float("inf")
    return {"predictions": predictions, "evidence": evidence, "rows_per_cpu_second": speed}


def _clear_text_caches() -> None:
    """Forget what the filters cached per text (word tokens, detected languages), so each
    timing run pays for every text as a first sight."""
    for module in [m for name, m in sys.modules.items() if name.startswith("data_filters")]:
        for attr in ("words", "word_set", "text_word_hashes", "detect_languages"):
            fn = getattr(module, attr, None)
            if fn is not None and hasattr(fn, "cache_clear"):
                fn.cache_clear()


def _extract_baseline(ref: str, into: Path) -> Path:
    try:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "data_filters"],
                              check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline-ref {ref}: git archive failed: {e.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_side(repo: Path, data: Path, repeat: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, __file__, "--score-only", str(repo), "--data", str(data),
           "--repeat", str(repeat), "--json", str(out)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------
# report

def _metrics(rows: list[dict], predictions: dict[str, int]) -> dict:
    tp = sum(1 for r in rows if r["label"] and predictions[r["id"]])
    fn = sum(1 for r in rows if r["label"] and not predictions[r["id"]])
    fp = sum(1 for r in rows if not r["label"] and predictions[r["id"]])
    tn = sum(1 for r in rows if not r["label"] and not predictions[r["id"]])
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "precision": tp / (tp + fp) if tp + fp else (1.0 if not fn else 0.0),
            "recall": tp / (tp + fn) if tp + fn else None,
            "false_friend_rejections": sum(1 for r in rows if r.get("false_friend") and predictions[r["id"]]),
            "false_friends": sum(1 for r in rows if r.get("false_friend"))}


def report(rows: list[dict], today: dict, new: dict) -> dict:
    by = defaultdict(list)
    for r in rows:
        by[(r["filter"], r["language"])].append(r)
    results: dict = {"per_language": {}, "speed": {}, "acceptance": {}}
    english_fp_today = {f: _metrics(by[(f, "en")], today["predictions"])["fp"] for f in FILTERS if by[(f, "en")]}
    failures = []
    for flt in FILTERS:
        langs = sorted({lang for f, lang in by if f == flt}, key=lambda x: (x != "en", x))
        print(f"\n{flt}: today | new  (P precision, R recall, FP false positives, FF false friends rejected)")
        print(f"{'lang':5} {'n':>4} | {'P':>5} {'R':>5} {'FP':>3} {'FF':>3} | {'P':>5} {'R':>5} {'FP':>3} {'FF':>3} | targets")
        for lang in langs:
            group = by[(flt, lang)]
            t, n = _metrics(group, today["predictions"]), _metrics(group, new["predictions"])
            if flt == "toxicity":
                ok = n["precision"] >= 0.9 and (n["recall"] or 0) >= 0.9
            else:
                ok = (n["recall"] is None or n["recall"] >= 0.9) and n["fp"] <= english_fp_today.get(flt, 0)
            if not ok:
                failures.append(f"{flt}/{lang}")
            ff = lambda m: f"{m['false_friend_rejections']}/{m['false_friends']}" if m["false_friends"] else "-"  # noqa: E731
            rec = lambda m: f"{m['recall']:.2f}" if m["recall"] is not None else "-"  # noqa: E731
            print(f"{lang:5} {len(group):>4} | {t['precision']:5.2f} {rec(t):>5} {t['fp']:>3} {ff(t):>3} | "
                  f"{n['precision']:5.2f} {rec(n):>5} {n['fp']:>3} {ff(n):>3} | {'met' if ok else 'NOT met'}")
            results["per_language"][f"{flt}/{lang}"] = {"today": t, "new": n, "target_met": ok}
    print("\nspeed (rows per CPU-second, one process, best of the repeats; on this set half the rows are\n"
          "rejected and most are not English, so the new filters run langdetect on most of them: the\n"
          "throughput on ordinary data is bench_filter_chain.py's):")
    for flt in FILTERS:
        a, b = today["rows_per_cpu_second"][flt], new["rows_per_cpu_second"][flt]
        print(f"  {flt:9} today {a:10,.0f}   new {b:10,.0f}   new/today {b / a:.2f}x")
        results["speed"][flt] = {"today": round(a), "new": round(b), "ratio": round(b / a, 3)}
    langs_seen = defaultdict(int)
    for ev in new["evidence"].values():
        if ev.get("language"):
            langs_seen[ev["language"]] += 1
    results["acceptance"] = {"failures": failures, "english_false_positives_today": english_fp_today,
                             "evidence_languages": dict(langs_seen)}
    print(f"\nlanguages recorded in the new rejections' evidence: {dict(sorted(langs_seen.items()))}")
    print("acceptance (toxicity P, R >= 0.9; identity, PII R >= 0.9 and FP <= English today's "
          f"{english_fp_today}): " + ("met" if not failures else f"NOT met for {', '.join(failures)}"))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="the labelled JSONL set")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git revision holding today's filters")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per filter, best kept")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--score-only", metavar="REPO", help=argparse.SUPPRESS)  # one side, internal
    args = ap.parse_args()
    rows = load_set(Path(args.data))
    if args.score_only:
        result = score_side(Path(args.score_only), rows, args.repeat)
        Path(args.json).write_text(json.dumps(result, ensure_ascii=False))
        return
    counts = defaultdict(lambda: defaultdict(int))
    for r in rows:
        counts[r["filter"]][r["language"]] += 1
    print(f"{len(rows)} labelled rows from {args.data}; baseline {args.baseline_ref}")
    for flt in FILTERS:
        print(f"  {flt}: {len(counts[flt])} languages, {sum(counts[flt].values())} rows")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = _extract_baseline(args.baseline_ref, tmp / "baseline")
        today = _run_side(base, Path(args.data), args.repeat, tmp / "today.json")
        new = _run_side(REPO, Path(args.data), args.repeat, tmp / "new.json")
    results = report(rows, today, new)
    results["rows"] = {f: dict(c) for f, c in counts.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
