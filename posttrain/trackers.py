"""Experiment trackers (tensorboard, wandb, trackio) for the training stages' step metrics.

Two things live here:

- `ReportTo`, the type of a stage config's `report_to` field: a list of tracker names, checked
  when the recipe is loaded, so a misspelt tracker or one whose package is not installed fails
  validation (naming the tracker and the extra that installs it) rather than a long run.
- `Trackers`, which opens the requested trackers through accelerate's tracker integrations
  (`accelerate.tracking`) and logs numeric step values to all of them.

wandb and trackio honour their own environment (`WANDB_MODE=offline`, `TRACKIO_DIR`, ...); this
module never overrides it.
"""

from __future__ import annotations

import difflib
import importlib.util
import numbers
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

# name -> (modules any one of which makes it usable, the extra that installs it)
_TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    # accelerate's TensorBoardTracker writes through torch.utils.tensorboard (which needs the
    # `tensorboard` package) and falls back to tensorboardX.
    "tensorboard": (("tensorboard", "tensorboardX"), "trackers"),
    "wandb": (("wandb",), "trackers"),
    # trackio has its own extra: its releases cap pillow<13, which the GPU build of vLLM rules out.
    "trackio": (("trackio",), "trackio"),
}
TRACKER_NAMES: tuple[str, ...] = tuple(_TRACKERS)


class TrackerError(ValueError):
    """An unknown tracker name, or a tracker whose package is not installed."""


def check_tracker(name: str) -> str:
    """Return `name` if it is a known tracker whose package can be imported; else raise TrackerError."""
    if name not in _TRACKERS:
        close = difflib.get_close_matches(name, TRACKER_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TrackerError(f"unknown tracker {name!r}{hint} (expected one of: {', '.join(TRACKER_NAMES)})")
    modules, extra = _TRACKERS[name]
    # find_spec, not import: validating a recipe should not pay for importing wandb.
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise TrackerError(f"tracker {name!r} is not installed: pip install 'posttrain[{extra}]' "
                           f"(or `make venv EXTRAS=...,{extra}`)")
    return name


def _as_list(value: Any) -> Any:
    # `report_to: tensorboard` means the one-element list.
    return [value] if isinstance(value, str) else value


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


TrackerName = Annotated[str, AfterValidator(check_tracker)]
# The type of a stage config's `report_to` field (pydantic): a list of tracker names, or one name.
ReportTo = Annotated[list[TrackerName], BeforeValidator(_as_list), AfterValidator(_unique)]


def check_report_to(names: list[str] | str | None) -> list[str]:
    """The same checks as `ReportTo`, outside pydantic: the validated, de-duplicated names."""
    return _unique([check_tracker(n) for n in (_as_list(names) or [])])


class Trackers:
    """The requested trackers, opened through accelerate's integrations; `log` and `close`.

    `logging_dir` holds files of trackers that write locally (tensorboard writes into
    `logging_dir/tensorboard`, wandb its offline runs into `logging_dir/wandb`); `project`
    groups runs (the recipe name), `run_name` names this one (the stage name).
    Open them on the main process only: the caller decides (see StageContext.metrics).
    """

    def __init__(self, report_to: list[str] | str | None, *, logging_dir: str | Path, project: str, run_name: str):
        from accelerate import PartialState, tracking

        self.names = check_report_to(report_to)
        self._open: list[Any] = []
        logging_dir = Path(logging_dir)
        # accelerate's trackers log through its multi-process logger, which needs the process state.
        # Creating it is idempotent: it joins whatever Accelerator/launch state exists, else records
        # a single process (the training loops create the same state for themselves).
        PartialState()
        try:
            for name in self.names:
                if name == "tensorboard":
                    tracker = tracking.TensorBoardTracker(run_name="tensorboard", logging_dir=str(logging_dir))
                elif name == "wandb":
                    logging_dir.mkdir(parents=True, exist_ok=True)
                    tracker = tracking.WandBTracker(run_name=project, name=run_name, dir=str(logging_dir))
                else:
                    tracker = tracking.TrackioTracker(run_name=project, name=run_name)
                tracker.start()
                self._open.append(tracker)
        except Exception:
            self.close()
            raise

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Log the numeric values of `values` at `step` (booleans as 0/1); text and other values are left out."""
        # Plain int/float: numpy and torch scalars are not accepted by every tracker.
        numeric = {k: (int(v) if isinstance(v, numbers.Integral) else float(v)) for k, v in values.items()
                   if isinstance(v, numbers.Real)}
        if not numeric:
            return
        for tracker in self._open:
            tracker.log(numeric, step=step)

    def close(self) -> None:
        """Finish every open tracker (flushes tensorboard's event file, ends wandb/trackio runs)."""
        open_, self._open = self._open, []
        errors = []
        for tracker in open_:
            try:
                tracker.finish()
            except Exception as e:  # noqa: BLE001 - finish the others, then report
                errors.append(f"{tracker.name}: {e}")
        if errors:
            raise RuntimeError("closing trackers failed: " + "; ".join(errors))

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
