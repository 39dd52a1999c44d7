"""Runs a recipe's stages in order: run directory, manifests, skip and resume, seeds.

Layout of a run directory (`output_dir`):

    recipe.resolved.yaml        the recipe after overrides, with every reference resolved
    _inputs/tokenizer/          the toy tokenizer (when tiny models are used)
    _inputs/models/<name>/      tiny models built from the recipe
    _inputs/datasets/<name>.jsonl   toy datasets generated from the recipe
    <stage>/manifest.json       written last and atomically; the only proof a stage is complete
    <stage>/attempt.json        hash of the attempt in progress (lets a killed stage resume)
    <stage>/...                 the stage's outputs (model/, metrics.jsonl, ...)

A stage is skipped when its manifest says complete and its hash (kind, resolved config,
fingerprints of its inputs) is unchanged. Once one stage runs, every later stage runs too.

SIGINT and SIGTERM stop the stage that is running as a `RunInterrupted`: it gets no manifest
(it is not complete), its attempt and checkpoints stay for the next run to resume from, and the
resolved recipe and report are written before `run` returns with the stage `interrupted`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from posttrain.data import is_saved_dataset, write_json, write_jsonl
from posttrain.pipeline.processes import (ControlChannel, StageFailedInChild, is_main, run_in_clean_process,
                                          run_stage_by_kind, seed_everything, world_size)
from posttrain.pipeline.recipe import Recipe, RecipeError, load_recipe, substitute_references
from posttrain.manifests import MANIFEST, read_manifest, write_manifest
from posttrain.stages import STAGE_KINDS, StageContext, StageError

ATTEMPT = "attempt.json"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_path(path: Path) -> str:
    """Content identity of a file or directory: sizes and mtimes (cheap), full hash for small files."""
    if not path.exists():
        return "missing"
    if path.is_file():
        st = path.stat()
        if st.st_size <= 8 << 20:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return f"{st.st_size}:{st.st_mtime_ns}"
    items = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            items.append((str(f.relative_to(path)), st.st_size, st.st_mtime_ns))
    return _sha(items)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: a KeyboardInterrupt (so stages unwind as on Ctrl-C, and no
    `except Exception` in a stage swallows it) that remembers which signal it was."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass
class StageProgress:
    """How far an unfinished stage got: its last logged step, and the step a re-run resumes from."""

    last_step: int | None
    resume_step: int | None  # its newest complete checkpoint; None: a re-run starts the stage over
    max_steps: int | None


def stage_progress(stage_dir: Path, config: dict | None = None) -> StageProgress:
    last = None
    try:
        for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                last = json.loads(line).get("step", last)
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    resume = None
    root = stage_dir / "checkpoints"  # posttrain.training's layout: checkpoints/step_N, complete once state.json is
    if root.is_dir():
        steps = [int(p.name[5:]) for p in root.iterdir()
                 if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "state.json").exists()]
        resume = max(steps) if steps else None
    total = (config or {}).get("max_steps")
    return StageProgress(last, resume, total if isinstance(total, int) else None)


def fault_totals(metrics_path: Path) -> dict[str, int]:
    """Every `.../faults` count of a stage's metrics.jsonl summed over its logged steps: a stage's
    summary keeps the run's total faults per reward, not its last step's."""
    totals: dict[str, int] = {}
    try:
        lines = metrics_path.read_text().splitlines()
    except FileNotFoundError:
        return totals
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in row.items():
            if k.endswith("/faults") and isinstance(v, (int, float)):
                totals[k] = totals.get(k, 0) + int(v)
    return totals


@dataclass
class StageOutcome:
    name: str
    kind: str
    status: str  # complete | skipped | failed | interrupted | not run (dry run: would run, would resume from step N)
    seconds: float
    metrics: dict
    outputs: dict
    error: str | None = None


class Inputs:
    """Materialises the recipe's models and datasets into the run directory, once."""

    def __init__(self, recipe: Recipe, console_log: Callable[[str], None]):
        self.recipe = recipe
        self.root = recipe.output_dir / "_inputs"
        self.log = console_log
        self.base = recipe.source.parent if recipe.source else Path.cwd()
        self._fingerprints: dict[str, str] = {}

    def _local(self, path_text: str, where: str, must_exist: bool) -> str:
        p = Path(path_text).expanduser()
        candidates = [p] if p.is_absolute() else [self.base / p, Path.cwd() / p]
        for c in candidates:
            if c.exists():
                return str(c.resolve())
        if must_exist:
            raise RecipeError(f"{where}: {path_text!r} not found (looked in {', '.join(str(c) for c in candidates)})")
        return path_text  # a hub id

    def tokenizer_dir(self) -> Path:
        d = self.root / "tokenizer"
        spec = {"seed": self.recipe.seed}
        if not self._complete(d, spec):
            from posttrain.toy.tokenizer import build_toy_tokenizer

            self.log("building the toy tokenizer")
            self._build(d, spec, lambda tmp: build_toy_tokenizer(tmp, seed=self.recipe.seed))
        return d

    def model(self, name: str) -> str:
        entry = self.recipe.models[name]
        if entry.path is not None:
            # An explicit filesystem path must exist; anything else that is not found locally is a hub id.
            explicit = entry.path.startswith((".", "/", "~"))
            out = self._local(entry.path, f"models.{name}.path", must_exist=explicit)
            self._fingerprints[f"models.{name}"] = fingerprint_path(Path(out)) if Path(out).exists() else out
            return out
        d = self.root / "models" / name
        spec = entry.tiny.model_dump()
        tok_dir = self.tokenizer_dir()
        if not self._complete(d, spec):
            from posttrain.modeling import load_tokenizer
            from posttrain.toy.models import build_tiny_model

            self.log(f"building tiny model {name!r} ({entry.tiny.arch}, hidden {entry.tiny.hidden_size}, {entry.tiny.num_layers} layers)")
            tok = load_tokenizer(tok_dir)
            self._build(d, spec, lambda tmp: build_tiny_model(entry.tiny, tok, tmp))
        self._fingerprints[f"models.{name}"] = _sha(spec) + fingerprint_path(tok_dir)
        return str(d)

    def dataset(self, name: str) -> str:
        entry = self.recipe.datasets[name]
        # A directory of data files (a clone of a hub dataset's repository, say) is read through
        # `datasets` too; a saved dataset directory and single files are read in place.
        local = None if entry.path is None else self._local(entry.path, f"datasets.{name}.path", must_exist=True)
        if entry.loads_through_datasets or (local is not None and Path(local).is_dir() and not is_saved_dataset(Path(local))):
            from posttrain.data import materialize_dataset

            source = entry.hub or local
            identity = entry.revision or "" if entry.hub else fingerprint_path(Path(source))
            out = self.root / "datasets" / f"{name}.jsonl"
            self._fingerprints[f"datasets.{name}"] = materialize_dataset(
                source, entry.load_options(), out, f"datasets.{name}", identity)
            return str(out)
        if local is not None:
            self._fingerprints[f"datasets.{name}"] = fingerprint_path(Path(local))
            return local
        from posttrain.toy import tasks

        f = self.root / "datasets" / f"{name}.jsonl"
        level = (entry.toy or entry.toy_dirty).level
        hard_fraction = (entry.toy or entry.toy_dirty).hard_fraction
        if entry.toy is not None and entry.toy.task.startswith("vision_"):
            from posttrain.toy.vision import generate_vision

            spec = entry.toy.model_dump()
            seed = spec["seed"] if spec["seed"] is not None else self.recipe.seed
            make = lambda: (generate_vision(spec["task"].removeprefix("vision_"), spec["n"],  # noqa: E731
                                            self.root / "datasets" / f"{name}_images", seed=seed, split=spec["split"],
                                            fmt=spec["format"]), None)
        elif entry.toy is not None:
            spec = entry.toy.model_dump()
            seed = spec["seed"] if spec["seed"] is not None else self.recipe.seed
            make = lambda: (tasks.generate(spec["task"], spec["n"], seed=seed, split=spec["split"],  # noqa: E731
                                           fmt=spec["format"], mix=spec["mix"], flip_rate=spec["flip_rate"],
                                           ignore_instruction_rate=spec["ignore_instruction_rate"],
                                           level=level, hard_fraction=hard_fraction), None)
        else:
            spec = entry.toy_dirty.model_dump()
            seed = spec["seed"] if spec["seed"] is not None else self.recipe.seed
            make = lambda: tasks.generate_dirty(spec["n_clean"], seed=seed, dirty_per_kind=spec["dirty_per_kind"],  # noqa: E731
                                                level=level, hard_fraction=hard_fraction)
        # `level` and `hard_fraction` came after data was cached and fingerprinted: at their defaults
        # they are left out of the spec, so the data of a recipe that sets neither keeps its marker
        # and fingerprint.
        spec = {k: v for k, v in spec.items()
                if not (k == "level" and v == "basic") and not (k == "hard_fraction" and v == 0.0)}
        # The generator's version travels in the marker (and the fingerprint), so data cached by an
        # older generator is made again, and the stages trained on it rerun, after an upgrade.
        spec = {**spec, "seed": seed, "generator_version": tasks.GENERATOR_VERSION}
        marker = f.with_suffix(".spec.json")
        if not (f.exists() and marker.exists() and json.loads(marker.read_text()) == spec):
            rows, planted = make()
            write_jsonl(f, rows)
            write_json(marker, spec)
            if planted is not None:
                write_json(f.with_suffix(".planted.json"), planted)
        self._fingerprints[f"datasets.{name}"] = _sha(spec)
        return str(f)

    def fingerprint(self, ref: str) -> str:
        return self._fingerprints[ref]

    @staticmethod
    def _complete(d: Path, spec: dict) -> bool:
        try:
            return json.loads((d / ".spec.json").read_text()) == spec
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    @staticmethod
    def _build(d: Path, spec: dict, build: Callable[[Path], Any]) -> None:
        tmp = d.with_name(d.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        write_json(tmp / ".spec.json", spec)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)


class Runner:
    def __init__(self, recipe: Recipe, console=None, debug: bool = False):
        self.recipe = recipe
        self.debug = debug
        self.console = console
        self.inputs = Inputs(recipe, self._log)
        self.manifests: dict[str, dict] = {}
        self._channel: ControlChannel | None = None  # multi-process launches only
        self.report_path: Path | None = None  # written at the end of run()
        self.interrupted: RunInterrupted | None = None  # set when SIGINT/SIGTERM stopped a stage

    def _say(self, msg: str) -> None:
        """A line the user should read (not dimmed like the log)."""
        if self.console is not None:
            from rich.markup import escape

            self.console.print(escape(msg))

    def _log(self, msg: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"[dim]{escape(msg)}[/dim]")

    # -- references ---------------------------------------------------------------------------
    def _resolve(self, ref: str) -> str:
        parts = ref.split(".")
        if parts[0] == "models":
            return self.inputs.model(parts[1])
        if parts[0] == "datasets":
            return self.inputs.dataset(parts[1])
        manifest = self.manifests.get(parts[1])
        if manifest is None or manifest.get("status") != "complete":
            raise RecipeError(f"${{{ref}}}: stage {parts[1]!r} has not completed in this run directory; run it first")
        return manifest["outputs"][parts[2]]

    def _input_fingerprint(self, ref: str) -> str:
        parts = ref.split(".")
        if parts[0] == "stages":
            return self.manifests[parts[1]]["hash"]
        return self.inputs.fingerprint(ref)

    def resolve_stage(self, entry) -> tuple[Any, str, dict]:
        """(config with references resolved, stage hash, resolved config dict)."""
        from posttrain.pipeline.recipe import iter_references

        raw_cfg = entry.config.model_dump(mode="json", exclude_unset=False)
        resolved = substitute_references(raw_cfg, self._resolve)
        refs = sorted({r for _, r in iter_references(raw_cfg)})
        fingerprints = {r: self._input_fingerprint(r) for r in refs}
        cfg = STAGE_KINDS[entry.kind].config_cls.model_validate(resolved)
        hash_form = STAGE_KINDS[entry.kind].config_cls.hash_form(resolved)
        digest = _sha({"kind": entry.kind, "config": hash_form, "inputs": fingerprints, "seed": self.recipe.seed})
        return cfg, digest, resolved

    def _load_datasets(self, stages) -> None:
        """Load and map every dataset these stages read, before the first of them trains: a mapping
        mistake or an unreachable hub set in the last stage's data fails in seconds, not after the
        stages before it have trained for hours. Each is written once and reused when its stage runs."""
        from posttrain.pipeline.preflight import file_columns
        from posttrain.pipeline.recipe import check_loaded_columns, iter_references

        loaded: dict[str, str] = {}
        for entry in stages:
            for _, ref in iter_references(entry.config.model_dump(mode="json", exclude_unset=False)):
                kind, name = ref.split(".")[:2]
                if kind == "datasets":
                    loaded[name] = self.inputs.dataset(name)

        def columns_of(ref: str) -> set | None:
            name = ref.strip()[len("${datasets."):-1] if ref.strip().startswith("${datasets.") else None
            path = Path(loaded[name]) if name in loaded else None
            return file_columns(path) if path is not None and path.is_file() else None

        # The columns rewards and stages read, now that every dataset's columns are known (a hub set
        # or a folder read through `datasets` has none before it is loaded).
        check_loaded_columns(self.recipe, columns_of)

    # -- running ------------------------------------------------------------------------------
    def run(self, from_stage: str | None = None, only: str | None = None, dry_run: bool = False,
            progress_factory=None, on_stage_start=None) -> list[StageOutcome]:
        """Run the recipe's stages that need it. Under a multi-process launch (torchrun, accelerate
        launch) rank 0 does this and returns the outcomes; the other ranks run the distributed
        stages rank 0 hands them and return an empty list (see posttrain.pipeline.processes)."""
        if world_size() == 1:
            with _signals_interrupt():
                return self._run(from_stage, only, dry_run, progress_factory, on_stage_start)
        self._channel = ControlChannel()
        if not is_main():
            self._follow()
            self._channel.close()
            return []
        try:
            return self._run(from_stage, only, dry_run, progress_factory, on_stage_start)
        finally:
            self._channel.send({"op": "done"})
            self._channel.close()

    def _follow(self) -> None:
        """The other ranks: run each distributed stage rank 0 announces, until it says done."""
        while True:
            message = self._channel.receive()
            if message["op"] == "done":
                return
            try:
                run_stage_by_kind(message["kind"], message["config"], message["ctx"], is_main=False)
            except Exception as e:  # noqa: BLE001 - rank 0 records the stage's outcome
                print(f"posttrain rank {os.environ.get('RANK')}: stage {message['ctx']['name']!r} failed here: "
                      f"{type(e).__name__}: {e}", flush=True)

    def _run(self, from_stage, only, dry_run, progress_factory, on_stage_start) -> list[StageOutcome]:
        recipe = self.recipe
        names = [s.name for s in recipe.stages]
        for flag, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in names:
                recipe.stage(value)  # raises with a suggestion
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        for s in recipe.stages:
            m = read_manifest(recipe.output_dir / s.name)
            if m is not None:
                self.manifests[s.name] = m
        self._load_datasets([s for s in recipe.stages if only is None or s.name == only])
        outcomes: list[StageOutcome] = []
        force = False
        resolved_all: dict[str, dict] = {}
        for entry in recipe.stages:
            if only is not None and entry.name != only:
                m = self.manifests.get(entry.name)
                outcomes.append(StageOutcome(entry.name, entry.kind, "skipped" if m and m.get("status") == "complete" else "not run",
                                             float((m or {}).get("seconds", 0.0)), (m or {}).get("metrics", {}),
                                             (m or {}).get("outputs", {})))
                continue
            if from_stage is not None and entry.name == from_stage:
                force = True
            cfg, digest, resolved = self.resolve_stage(entry)
            resolved_all[entry.name] = {"kind": entry.kind, **resolved}
            stage_dir = recipe.output_dir / entry.name
            previous = self.manifests.get(entry.name)
            up_to_date = previous is not None and previous.get("status") == "complete" and previous.get("hash") == digest
            if up_to_date and not force and only is None:
                # A skipped stage reports the time it took when it ran.
                outcomes.append(StageOutcome(entry.name, entry.kind, "skip (complete)" if dry_run else "skipped",
                                             float(previous.get("seconds", 0.0)), previous.get("metrics", {}),
                                             previous.get("outputs", {})))
                continue
            if dry_run:
                resume = self._resumable_step(stage_dir, digest)
                outcomes.append(StageOutcome(entry.name, entry.kind,
                                             "would run" if resume is None else f"would resume from step {resume}",
                                             0.0, {}, {}))
                force = True
                self.manifests[entry.name] = {"status": "complete", "hash": digest, "outputs": {
                    k: str(stage_dir / k) for k in STAGE_KINDS[entry.kind].outputs}}
                continue
            force = True  # everything downstream of a stage that runs, runs
            if on_stage_start:
                on_stage_start(entry)
            outcome = self._run_stage(entry, cfg, digest, resolved, stage_dir, progress_factory)
            outcomes.append(outcome)
            if outcome.status != "complete":
                break
        if not dry_run:
            # Also after an interruption: what ran is reported, and the recipe it ran is on disk.
            with _signals_deferred():
                self._write_resolved_recipe(resolved_all)
                self.report_path = self._write_report()
        return outcomes

    @staticmethod
    def _resumable_step(stage_dir: Path, digest: str) -> int | None:
        """The step a run of this stage would resume from: its newest checkpoint, when the files
        in its directory belong to an attempt with the same hash (else they are cleared)."""
        try:
            attempt = json.loads((stage_dir / ATTEMPT).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if attempt.get("hash") != digest:
            return None
        return stage_progress(stage_dir).resume_step

    def _write_report(self) -> Path | None:
        """The run's HTML report (posttrain.pipeline.report); a report that cannot be drawn never fails the run."""
        from posttrain.pipeline.report import write_report

        try:
            return write_report(self.recipe.output_dir)
        except Exception as e:  # noqa: BLE001 - the stages' results stand; say why there is no report
            self._log(f"no report written: {type(e).__name__}: {e}")
            return None

    def _prepare_stage_dir(self, stage_dir: Path, digest: str) -> None:
        """Keep a killed attempt's files only when it was the same attempt (so it can resume)."""
        attempt = None
        try:
            attempt = json.loads((stage_dir / ATTEMPT).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if stage_dir.exists() and (attempt is None or attempt.get("hash") != digest):
            shutil.rmtree(stage_dir)
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json(stage_dir / ATTEMPT, {"hash": digest, "started": time.time(), "pid": os.getpid()})

    def _run_stage(self, entry, cfg, digest, resolved, stage_dir: Path, progress_factory) -> StageOutcome:
        self._prepare_stage_dir(stage_dir, digest)
        resumed_from = stage_progress(stage_dir).resume_step
        if resumed_from is not None:
            self._say(f"resuming stage {entry.name!r} from step {resumed_from} (its last checkpoint)")
        kind = STAGE_KINDS[entry.kind]
        ctx = StageContext(name=entry.name, kind=entry.kind, stage_dir=stage_dir, run_dir=self.recipe.output_dir,
                           seed=self.recipe.seed, recipe_name=self.recipe.name,
                           lineage=[self.manifests[s.name] for s in self.recipe.stages
                                    if s.name in self.manifests and s.name != entry.name
                                    and self.manifests[s.name].get("status") == "complete"],
                           progress_factory=progress_factory,
                           recipe_dir=self.recipe.source.parent if self.recipe.source else None)
        if self._channel is not None and kind.distributed:
            self._channel.send({"op": "run", "kind": entry.kind, "config": resolved, "ctx": _portable(ctx)})
        seed_everything(self.recipe.seed)
        _reset_gpu_peak_memory()
        started = time.time()
        manifest = {"name": entry.name, "kind": entry.kind, "config": resolved, "hash": digest,
                    "started": started, "recipe": self.recipe.name}
        try:
            if self._channel is not None and not kind.distributed:
                result = self._run_isolated(entry, resolved, ctx)
            else:
                result = kind.run(cfg, ctx)
        except KeyboardInterrupt as e:
            if self._channel is not None:
                raise  # a multi-process launch: the launcher stops every rank
            self.interrupted = e if isinstance(e, RunInterrupted) else RunInterrupted("SIGINT")
            progress = stage_progress(stage_dir, resolved)
            return StageOutcome(entry.name, entry.kind, "interrupted", time.time() - started, {}, {},
                                interruption_message(entry.name, self.interrupted.signal_name, progress))
        except Exception as e:  # noqa: BLE001 - recorded in the manifest and reported to the user
            ended = time.time()
            child = isinstance(e, StageFailedInChild)
            message = str(e) if child else f"{type(e).__name__}: {e}"
            manifest.update(status="failed", ended=ended, seconds=round(ended - started, 3), error=message,
                            traceback=e.child_traceback if child else traceback.format_exc(), outputs={}, metrics={})
            write_manifest(stage_dir, manifest)
            self.manifests[entry.name] = manifest
            if self.debug:
                raise
            return StageOutcome(entry.name, entry.kind, "failed", ended - started, {}, {}, message)
        ended = time.time()
        missing = [k for k in kind.outputs if k not in result.outputs]
        if missing:
            raise StageError(f"stage kind {entry.kind!r} did not report outputs {missing}")
        metrics = {**result.metrics, **fault_totals(stage_dir / "metrics.jsonl")}
        manifest.update(status="complete", ended=ended, seconds=round(ended - started, 3),
                        outputs={k: str(v) for k, v in result.outputs.items()}, metrics=metrics)
        if resumed_from is not None:
            manifest["resumed_from_step"] = resumed_from
        peak = _gpu_peak_memory_gib()
        if peak is not None:
            manifest["gpu_peak_memory_gib"] = peak  # this process's GPU, during this stage
        write_manifest(stage_dir, manifest)  # last, atomically: the stage is complete from here on
        (stage_dir / ATTEMPT).unlink(missing_ok=True)
        self.manifests[entry.name] = manifest
        return StageOutcome(entry.name, entry.kind, "complete", ended - started, metrics, manifest["outputs"])

    def _run_isolated(self, entry, resolved: dict, ctx: StageContext):
        """Rank 0 of a multi-process launch: a single-process stage runs in a clean child process
        (see posttrain.pipeline.processes.run_in_clean_process); its progress shows as its own output."""
        plugin_dir = self.recipe.source.parent if self.recipe.source else Path.cwd()
        return run_in_clean_process(entry.kind, resolved, _portable(ctx), list(self.recipe.raw.get("plugins") or []),
                                    str(plugin_dir))

    def _write_resolved_recipe(self, resolved_stages: dict[str, dict]) -> None:
        import yaml

        out = {k: v for k, v in self.recipe.raw.items() if k != "stages"}
        out["output_dir"] = str(self.recipe.output_dir)
        # Every stage of the recipe, so that a run stopped early still shows all of them (the report
        # counts them): a stage this run did not reach keeps its references as written.
        written = {s.get("name"): s for s in self.recipe.raw.get("stages", []) if isinstance(s, dict)}
        out["stages"] = [{"name": e.name, **resolved_stages[e.name]} if e.name in resolved_stages else written[e.name]
                         for e in self.recipe.stages]
        text = yaml.safe_dump(out, sort_keys=False)
        tmp = self.recipe.output_dir / "recipe.resolved.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.recipe.output_dir / "recipe.resolved.yaml")


def interruption_message(stage: str, signal_name: str, progress: StageProgress) -> str:
    """One line: which stage stopped where, and what running the same command again does."""
    at = "" if progress.last_step is None else f" at step {progress.last_step}" + (
        f" of {progress.max_steps}" if progress.max_steps else "")
    if progress.resume_step is not None:
        then = f"running the same command again resumes from step {progress.resume_step} (its last checkpoint)"
    else:
        then = "running the same command again starts the stage over (it has no checkpoint yet)"
    return f"{signal_name}: stage {stage!r} interrupted{at}; {then}"


class _signals_interrupt:
    """SIGTERM (what schedulers and `kill` send) stops a run as Ctrl-C does, as a RunInterrupted;
    the handlers are put back afterwards. Signals can only be handled on the main thread."""

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, _raise_interrupted)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _raise_interrupted(signum, frame):
    raise RunInterrupted(signal.Signals(signum).name)


class _signals_deferred:
    """Hold SIGINT/SIGTERM while the resolved recipe and report are written (a second Ctrl-C
    there would leave neither); one that arrives meanwhile is raised afterwards."""

    def __enter__(self):
        self._previous, self._pending = {}, None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame):
        self._pending = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pending is not None and exc[0] is None:
            raise RunInterrupted(signal.Signals(self._pending).name)
        return False


def _reset_gpu_peak_memory() -> None:
    """Start a stage's GPU memory peak afresh (when this process uses CUDA)."""
    import sys

    torch = sys.modules.get("torch")  # a run that never imported torch has no GPU memory to report
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_memory_gib() -> float | None:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _portable(ctx: StageContext) -> dict:
    """The context's fields another process needs to rebuild it (not the live progress bar)."""
    return {"name": ctx.name, "kind": ctx.kind, "stage_dir": ctx.stage_dir, "run_dir": ctx.run_dir, "seed": ctx.seed,
            "recipe_name": ctx.recipe_name, "lineage": ctx.lineage, "recipe_dir": ctx.recipe_dir}


def run_recipe(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), **kwargs) -> dict[str, dict]:
    """Run a recipe file; returns the manifests of its stages by name. Raises StageError on failure."""
    recipe = load_recipe(recipe_path, overrides)
    runner = Runner(recipe, debug=kwargs.pop("debug", False))
    outcomes = runner.run(**kwargs)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise StageError(f"stage {failed[0].name!r} failed: {failed[0].error}")
    return dict(runner.manifests)
