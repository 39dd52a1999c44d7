"""The filter stage inside a recipe: planted dirty rows end where they should, nothing is lost."""

import json
from collections import defaultdict
from pathlib import Path

from posttrain.pipeline.runner import run_recipe

RECIPE = """
name: f
output_dir: run
datasets:
  dirty: {toy_dirty: {n_clean: 200, dirty_per_kind: 4}}
stages:
  - name: filter
    kind: filter
    dataset: ${datasets.dirty}
    identity: {name: Posttrain Tiny, developer: the posttrain project}
    pii: {mode: redact}
"""


def test_planted_rows_are_caught_and_counted_in_the_manifest(write_recipe):
    path = write_recipe(RECIPE)
    m = run_recipe(path)["filter"]
    run_dir = path.parent / "run"
    planted = json.loads((run_dir / "_inputs" / "datasets" / "dirty.planted.json").read_text())
    kept = [json.loads(l) for l in Path(m["outputs"]["dataset"]).read_text().splitlines()]
    rejected = [json.loads(l) for l in Path(m["outputs"]["rejected"]).read_text().splitlines()]
    metrics = m["metrics"]
    n_input = sum(1 for _ in (run_dir / "_inputs" / "datasets" / "dirty.jsonl").open())
    assert metrics["input_rows"] == n_input == len(kept) + len(rejected)
    assert metrics["kept_rows"] == len(kept) and metrics["rejected_rows"] == len(rejected)

    kind_of = lambda row: row["id"].split("-")[0]  # noqa: E731
    rejected_kinds = defaultdict(list)
    for r in rejected:
        rejected_kinds[kind_of(r["row"])].append(r["filter"])
    assert rejected_kinds["toxic"] == ["toxicity"] * planted["toxic"] == ["toxicity"] * metrics["rejected/toxicity"]
    assert rejected_kinds["misidentification"] == ["identity"] * planted["misidentification"] == ["identity"] * metrics["rejected/identity"]
    # personal information is redacted in place, not dropped
    pii_kept = [r for r in kept if kind_of(r) == "pii"]
    assert len(pii_kept) == planted["pii"] == metrics["redacted_rows"]
    assert all("@example.com" not in json.dumps(r) and "<EMAIL>" in json.dumps(r) for r in pii_kept)
    # exactly one member of every planted duplicate pair survives
    for kind, partner in (("near_duplicate", "near_original"), ("exact_duplicate", "clean")):
        for i in range(planted[kind]):
            ids = [r["id"] for r in kept]
            pair = {f"{kind}-{i}", f"{partner}-{i}"}
            assert len(pair & set(ids)) == 1, pair
    # clean rows are only ever rejected as duplicates, with the duplicate's index as evidence
    assert set(rejected_kinds["clean"]) <= {"dedup"}
    assert all(r["evidence"] for r in rejected)
    assert (run_dir / "filter" / "data_card.md").read_text().count("toxicity") >= 1
