"""Trackers: `report_to` names are checked at validation time; tensorboard, wandb and trackio
really write (wandb offline, trackio to a local directory)."""

import json
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from posttrain.stages.base import StageContext
from posttrain.trackers import ReportTo, TrackerError, Trackers, check_report_to, check_tracker


class _Config(BaseModel):
    report_to: ReportTo = []


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_event_files_that_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    with Trackers(["tensorboard"], logging_dir=tmp_path, project="p", run_name="r") as trackers:
        trackers.log(0, {"loss": 1.5, "note": "text is left out", "steps": 3})
        trackers.log(1, {"loss": 0.75})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(0, 1.5), (1, 0.75)]
    assert scalars["steps"] == [(0, 3.0)] and "note" not in scalars


def test_stage_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    ctx = StageContext(name="rl", kind="rl", stage_dir=tmp_path, run_dir=tmp_path, seed=0, recipe_name="t")
    with ctx.metrics(["tensorboard"]) as metrics:
        metrics.log(1, reward=0.5, phase="train")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward"] == 0.5 and rows[0]["phase"] == "train"
    assert _scalars(tmp_path / "tensorboard")["reward"] == [(1, 0.5)]


def test_unknown_tracker_is_an_error_with_a_suggestion():
    with pytest.raises(TrackerError, match=r"unknown tracker 'tensorbord'; did you mean 'tensorboard'.*wandb, trackio"):
        check_tracker("tensorbord")
    with pytest.raises(ValidationError) as e:
        _Config(report_to=["mlflow"])
    assert e.value.errors()[0]["loc"] == ("report_to", 0) and "unknown tracker 'mlflow'" in str(e.value)


def test_tracker_whose_package_is_missing_names_the_extra(monkeypatch):
    # A None entry in sys.modules is Python's own way to make a module unimportable.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValidationError, match=r"tracker 'wandb' is not installed: pip install 'posttrain\[trackers\]'"):
        _Config(report_to=["wandb"])
    for module in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(TrackerError, match=r"tracker 'tensorboard' is not installed: pip install 'posttrain\[trackers\]'"):
        Trackers(["tensorboard"], logging_dir=".", project="p", run_name="r")
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(TrackerError, match=r"pip install 'posttrain\[trackio\]'"):
        check_tracker("trackio")


def test_report_to_accepts_one_name_and_drops_repeats():
    pytest.importorskip("tensorboard")
    assert _Config(report_to="tensorboard").report_to == ["tensorboard"]
    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert _Config().report_to == [] and check_report_to(None) == []


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's choice; the test must not reach a server
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Trackers(["wandb"], logging_dir=tmp_path, project="p", run_name="r") as trackers:
        trackers.log(0, {"loss": 1.0})
        trackers.log(1, {"loss": 0.5})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.stat().st_size > 0 for f in runs[0].glob("run-*.wandb"))


def test_trackio_logs_to_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    utils = pytest.importorskip("trackio.utils")
    project = f"posttrain-test-{tmp_path.name}"
    with Trackers(["trackio"], logging_dir=tmp_path, project=project, run_name="r") as trackers:
        trackers.log(0, {"loss": 1.0})
    written = [f for f in Path(utils.TRACKIO_DIR).rglob(f"{project}*") if f.is_file() and f.stat().st_size > 0]
    assert written
    for f in written:  # in the user's cache when trackio was imported before this test
        f.unlink()
