"""PII detection: data_filters.pii against presidio-analyzer's pattern recognizers.

Both run side by side in one process on presidio-research's synthetic dataset (1,500 texts
with labelled spans, MIT licence), for the entity types both detect. Presidio runs its
pattern recognizers directly (no spaCy NER model): EmailRecognizer, PhoneRecognizer,
CreditCardRecognizer, UsSsnRecognizer, IbanRecognizer, IpRecognizer, every result counted
whatever its score (the analyzer's default threshold is 0).

A prediction is correct when it overlaps a labelled span of the same type; recall is the
share of labelled spans overlapped by a prediction of their type.

    pip install -e '.[bench]'
    python bench/bench_pii.py                       # looks for ../shared/data/ beside the repo
    python bench/bench_pii.py --data path/to/presidio_synth_dataset_v2.json
    PRESIDIO_SYNTH_DATASET=path/to/file.json python bench/bench_pii.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_filters import pii  # noqa: E402

TYPES = {  # dataset label -> our kind
    "EMAIL_ADDRESS": pii.EMAIL,
    "PHONE_NUMBER": pii.PHONE,
    "CREDIT_CARD": pii.CREDIT_CARD,
    "US_SSN": pii.US_SSN,
    "IBAN_CODE": pii.IBAN,
    "IP_ADDRESS": pii.IP_ADDRESS,
}
KINDS = tuple(TYPES.values())


def locate_dataset(arg: str | None) -> Path:
    candidates = [arg, os.environ.get("PRESIDIO_SYNTH_DATASET"),
                  REPO.parent / "shared" / "data" / "presidio_synth_dataset_v2.json"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    sys.exit("presidio_synth_dataset_v2.json not found: pass --data PATH or set "
             "PRESIDIO_SYNTH_DATASET (expected ../shared/data/ beside the repository)")


def presidio_detector():
    # tldextract (used by presidio's e-mail validator) would try to download the public
    # suffix list; point it at its bundled snapshot so the benchmark runs offline.
    import tldextract
    import tldextract.tldextract as tx
    tx.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer, EmailRecognizer, IbanRecognizer, IpRecognizer,
        PhoneRecognizer, UsSsnRecognizer)

    recognizers = [EmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(),
                   UsSsnRecognizer(), IbanRecognizer(), IpRecognizer()]
    entities = list(TYPES)

    def detect(text: str) -> list[tuple[str, int, int]]:
        out = []
        for rec in recognizers:
            for r in rec.analyze(text, entities, None):
                out.append((TYPES[r.entity_type], r.start, r.end))
        return out

    detect("warm up a@b.com 4111 1111 1111 1111")
    return detect


def ours_detector():
    def detect(text: str) -> list[tuple[str, int, int]]:
        return [(s.kind, s.start, s.end) for s in pii.find_pii(text, KINDS)]
    return detect


def score(samples, predictions):
    tp_pred, n_pred, tp_gold, n_gold = (defaultdict(int) for _ in range(4))
    for sample, preds in zip(samples, predictions):
        gold = [(TYPES[s["entity_type"]], s["start_position"], s["end_position"])
                for s in sample["spans"] if s["entity_type"] in TYPES]
        for kind, s, e in preds:
            n_pred[kind] += 1
            if any(k == kind and s < ge and gs < e for k, gs, ge in gold):
                tp_pred[kind] += 1
        for kind, gs, ge in gold:
            n_gold[kind] += 1
            if any(k == kind and s < ge and gs < e for k, s, e in preds):
                tp_gold[kind] += 1
    table = {}
    for kind in KINDS:
        p = tp_pred[kind] / n_pred[kind] if n_pred[kind] else 1.0
        r = tp_gold[kind] / n_gold[kind] if n_gold[kind] else 1.0
        table[kind] = {"precision": p, "recall": r, "predicted": n_pred[kind],
                       "labelled": n_gold[kind]}
    return table


def timed(detect, texts, repeats):
    best = float("inf")
    preds = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = [detect(t) for t in texts]
        best = min(best, time.perf_counter() - t0)
    return preds, len(texts) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="path to presidio_synth_dataset_v2.json")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs, best kept")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    samples = json.loads(locate_dataset(args.data).read_text())
    texts = [s["full_text"] for s in samples]
    results = {}
    for name, make in (("data_filters", ours_detector), ("presidio", presidio_detector)):
        preds, speed = timed(make(), texts, args.repeats)
        results[name] = {"texts_per_second": speed, "types": score(samples, preds)}

    print(f"{len(texts)} texts; overlap match per type\n")
    print(f"{'type':<12} {'labelled':>8} | {'ours P':>7} {'ours R':>7} | {'presidio P':>10} {'presidio R':>10}")
    ok = True
    for kind in KINDS:
        o, p = results["data_filters"]["types"][kind], results["presidio"]["types"][kind]
        flag = "" if o["precision"] >= p["precision"] and o["recall"] >= p["recall"] else "  <- below presidio"
        ok &= not flag
        print(f"{kind:<12} {o['labelled']:>8} | {o['precision']:>7.3f} {o['recall']:>7.3f} | "
              f"{p['precision']:>10.3f} {p['recall']:>10.3f}{flag}")
    ours_speed = results["data_filters"]["texts_per_second"]
    theirs = results["presidio"]["texts_per_second"]
    ratio = ours_speed / theirs
    results["speed_ratio"] = ratio
    print(f"\nspeed: data_filters {ours_speed:,.0f} texts/s, presidio {theirs:,.0f} texts/s, "
          f"ratio {ratio:.1f}x (target >= 20x)")
    print("quality target (P and R >= presidio on every type):", "met" if ok else "NOT met")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
