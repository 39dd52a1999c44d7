"""What a stage is: a typed config, a run function, declared outputs; and the context it runs in.

A stage kind registers itself with `@register_stage(kind, ConfigClass, outputs=(...))`. Its run
function receives the validated config (references already resolved to concrete values, such
as model directories and dataset files) and a `StageContext`, writes everything into
`ctx.stage_dir`, and returns a `StageResult` naming its outputs. The runner writes the
manifest afterwards; a stage never marks itself complete.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # Options a stage kind gained after run directories were made with it, as key paths ("eval_steps",
    # "toxicity.multilingual", "rewards[].tolerate_all_faults") and their defaults as the resolved
    # config writes them. The runner hashes the resolved config to tell whether a finished stage is
    # up to date and whether a killed one may resume; left out of that hash while at their default,
    # they keep the hash of a run directory made before, which is then still recognised (skipped,
    # or resumed from its checkpoint) instead of trained again. Set, they count like any option.
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {}

    @classmethod
    def hash_form(cls, resolved: dict) -> dict:
        """The resolved config (every field written out) in the form the runner hashes: without the
        later options at their default (above). A stage whose options were regrouped also writes
        them here as they were, so run directories made before still match."""
        out = copy.deepcopy(resolved)
        hashed_only_when_set = dict(cls._HASHED_ONLY_WHEN_SET)
        for name, info in cls.model_fields.items():
            # Options that a shared settings class gained later, declared once on that class.
            later = getattr(info.annotation, "HASHED_ONLY_WHEN_SET", None)
            if isinstance(later, dict):
                hashed_only_when_set.update({f"{name}.{path}": default for path, default in later.items()})
        for path, default in hashed_only_when_set.items():
            _drop_if_default(out, path.split("."), default)
        return out


def _drop_if_default(node: Any, keys: list[str], default: Any) -> None:
    """Remove the key path `keys` from `node` where it holds `default`; `name[]` walks every item
    of a list."""
    key, rest = keys[0], keys[1:]
    items = key.endswith("[]")
    key = key.removesuffix("[]")
    if not isinstance(node, dict) or key not in node:
        return
    if not rest:
        if node[key] == default:
            del node[key]
        return
    children = node[key] if items and isinstance(node[key], list) else [node[key]]
    for child in children:
        _drop_if_default(child, rest, default)


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on (bad data, failed round trip...)."""


@dataclass
class StageResult:
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageKind:
    kind: str
    config_cls: type[StageConfig]
    run: Callable[[Any, "StageContext"], StageResult]
    outputs: tuple[str, ...]
    summary: str
    distributed: bool = False  # runs on every process of a multi-process launch (see posttrain.pipeline.processes)
    # Outputs that mean something only when a config key is set: {output: (key, why)}.
    output_requires: dict[str, tuple[str, str]] | None = None


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: str, config_cls: type[StageConfig], outputs: tuple[str, ...], distributed: bool = False,
                   output_requires: dict[str, tuple[str, str]] | None = None):
    """Register a stage kind; `outputs` are the keys other stages may reference as ${stages.NAME.KEY}.

    `output_requires`: {output: (config key, why)} for an output that another stage may only
    reference when the key is set in this stage (the recipe is refused at load otherwise).

    `distributed`: under a multi-process launch, every process runs the stage (which must then
    coordinate itself, as TRL trainers do, and write files only where `ctx.is_main`); otherwise
    only rank 0 runs it while the others wait.
    """

    def decorate(fn):
        doc = (fn.__doc__ or config_cls.__doc__ or "").strip().splitlines()
        STAGE_KINDS[kind] = StageKind(kind, config_cls, fn, tuple(outputs), doc[0] if doc else "", distributed,
                                      output_requires)
        return fn

    return decorate


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`, and logs the numeric values to
    the trackers in `report_to` (see posttrain.trackers; their files go next to metrics.jsonl)."""

    def __init__(self, path: Path, report_to: list[str] | None = None, *, project: str = "posttrain",
                 run_name: str | None = None):
        from posttrain.trackers import Trackers

        self.path = path
        self.report_to = list(report_to or [])
        self._trackers = Trackers(self.report_to, logging_dir=path.parent, project=project,
                                  run_name=run_name or path.parent.name) if self.report_to else None
        self._fh = open(path, "a", encoding="utf-8")

    def log(self, step: int, **values: Any) -> None:
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(row, default=float) + "\n")
        self._fh.flush()
        if self._trackers is not None:
            self._trackers.log(step, values)

    def close(self) -> None:
        self._fh.close()
        if self._trackers is not None:
            self._trackers.close()


class _NullMetrics:
    """What ctx.metrics() gives the non-main ranks of a distributed stage."""

    def log(self, step: int, **values: Any) -> None:
        pass


@dataclass
class StageContext:
    name: str
    kind: str
    stage_dir: Path
    run_dir: Path
    seed: int
    recipe_name: str
    lineage: list[dict] = field(default_factory=list)  # manifests of the stages run before this one
    progress_factory: Callable[..., Any] | None = None
    recipe_dir: Path | None = None  # relative paths in the recipe (reward files...) are relative to it
    is_main: bool = True  # False on the other ranks of a distributed stage: they write no files

    @contextmanager
    def metrics(self, report_to: list[str] | None = None) -> Iterator[MetricsLogger]:
        if not self.is_main:
            yield _NullMetrics()
            return
        logger = MetricsLogger(self.stage_dir / "metrics.jsonl", report_to, project=self.recipe_name, run_name=self.name)
        try:
            yield logger
        finally:
            logger.close()

    @contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Callable[[int], None]]:
        """A live progress bar for long work; yields `advance(n)`."""
        if self.progress_factory is None:
            yield lambda n=1: None
            return
        with self.progress_factory(total, f"{self.name}: {description}") as advance:
            yield advance
