"""One completion marker for stages, warp's inner runs and reward_model's members: a manifest
written last and atomically, complete only when its status says so."""

from __future__ import annotations

import json

import posttrain.manifests as manifests
import posttrain.pipeline.runner as runner
from posttrain.manifests import MANIFEST, completed, mark_complete, read_manifest, write_manifest


def test_mark_complete_writes_the_manifest_whole_and_completed_reads_it_back(tmp_path):
    written = mark_complete(tmp_path / "run_1", kind="rl", seed=7, outputs={"model": "m"})
    assert [p.name for p in (tmp_path / "run_1").iterdir()] == [MANIFEST]  # no temporary file left behind
    assert completed(tmp_path / "run_1") == written
    assert written["status"] == "complete" and written["seed"] == 7 and written["ended"] > 0


def test_only_a_whole_manifest_that_says_complete_marks_a_directory_complete(tmp_path):
    assert completed(tmp_path) is None and read_manifest(tmp_path) is None  # nothing written yet
    write_manifest(tmp_path, {"status": "failed", "error": "boom"})
    assert completed(tmp_path) is None and read_manifest(tmp_path)["error"] == "boom"
    (tmp_path / MANIFEST).write_text('{"status": "compl')  # cut short by a kill mid-write
    assert completed(tmp_path) is None and read_manifest(tmp_path) is None
    (tmp_path / MANIFEST).write_text('["complete"]')
    assert completed(tmp_path) is None


def test_a_marker_written_by_earlier_warp_versions_still_counts_as_complete(tmp_path):
    # warp's own marker was already a manifest.json with status complete and its fields beside it.
    run_dir = tmp_path / "iteration_1" / "run_1"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"status": "complete", "ended": 1.0, "kind": "rl", "seed": 3}))
    assert completed(run_dir)["seed"] == 3


def test_the_runner_reads_and_writes_stage_manifests_with_the_same_primitive():
    assert runner.read_manifest is manifests.read_manifest and runner.write_manifest is manifests.write_manifest
    assert runner.MANIFEST == MANIFEST
