"""The `posttrain` command: run, validate, stages, report.

Exit codes: 0 success, 1 a stage failed, 2 the recipe (or a --set override) is invalid, 130/143
interrupted by SIGINT/SIGTERM (one line says where, and that running the command again resumes).
Errors are one paragraph without a traceback unless --debug.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_STAGE_FAILED = 1
EXIT_BAD_RECIPE = 2
# As a shell reports a process a signal ended: 128 + the signal's number.
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


def escape(text: str) -> str:
    """Text shown as it is: rich reads "[word]" as markup and drops it ("data.json[row 3]" would
    print as "data.json"), and messages, descriptions and defaults hold such brackets."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _console():
    from rich.console import Console

    # Wide enough for the summary table even when output is not a terminal (CI logs, pipes).
    return Console(stderr=False, highlight=False, width=max(Console().width, 140))


def _progress_factory(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    @contextmanager
    def factory(total, description):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    return factory


def _fmt_metric(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _with_interval(metrics: dict, key: str) -> str:
    """`0.86 [0.78, 0.92]`: a figure with its 95% interval when the stage recorded one."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    shown = _fmt_metric(metrics[key])
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low == low and high == high:
        shown += f" [{low:.2f}, {high:.2f}]"
    return shown


def _key_metrics(metrics: dict, limit: int = 4) -> str:
    """The few numbers worth a glance: accuracies when a stage has them, else losses, rewards, counts."""
    acc = {k.rsplit("/", 1)[0]: k for k in metrics if k.endswith("/accuracy")}
    if acc:
        return "accuracy " + ", ".join(f"{name} {_with_interval(metrics, key)}" for name, key in acc.items())
    # kl_start_k3 (never negative) before kl_start (k1, an unbiased estimate that a batch can make negative)
    preferred = ("kept_rows", "rejected_rows", "loss_last", "reward/mean", "kl_start_k3", "kl_start",
                 "kl_teacher_student_last", "front/eta_1/reward", "front/eta_1/kl", "probe_answer")
    keys = [k for k in preferred if k in metrics and not (k == "kl_start" and "kl_start_k3" in metrics)][:limit]
    shown = ", ".join(f"{k}={_fmt_metric(metrics[k])}" for k in keys)
    # Faults are totals over the run (see runner.fault_totals); any at all is worth a glance.
    faults = {k.rsplit("/", 1)[0]: v for k, v in metrics.items() if k.endswith("/faults") and v}
    if faults:
        shown += ("; " if shown else "") + "faults " + ", ".join(f"{k} {v}" for k, v in faults.items())
    return shown


def _summary(console, outcomes, run_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"posttrain run summary ({run_dir})")
    for col in ("stage", "kind", "status", "wall time", "key metrics", "output"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        style = {"complete": "green", "skipped": "cyan", "skip (complete)": "cyan", "failed": "red"}.get(o.status, "")
        out = o.outputs.get("model") or o.outputs.get("dataset") or next(iter(o.outputs.values()), "")
        if out and Path(out).is_relative_to(run_dir):
            out = str(Path(out).relative_to(run_dir))
        wall = f"{o.seconds:.1f}s" + (" (earlier run)" if o.status == "skipped" and o.seconds else "")
        table.add_row(escape(o.name), o.kind, f"[{style}]{o.status}[/{style}]" if style else o.status, wall,
                      escape(o.error or _key_metrics(o.metrics)), escape(str(out)))
    console.print(table)


def cmd_run(args) -> int:
    from posttrain.pipeline.recipe import load_recipe
    from posttrain.pipeline.runner import Runner

    from posttrain.pipeline.processes import is_main

    console = _console()
    if not is_main():
        console.quiet = True  # multi-process launch: rank 0 reports for the run
    recipe = load_recipe(args.recipe, args.set or [])
    runner = Runner(recipe, console=console, debug=args.debug)
    console.print(f"[bold]posttrain[/bold] {escape(recipe.name)}: {len(recipe.stages)} stages -> "
                  f"{escape(str(recipe.output_dir))}")
    outcomes = runner.run(from_stage=args.from_stage, only=args.only, dry_run=args.dry_run,
                          progress_factory=_progress_factory(console),
                          on_stage_start=lambda e: console.rule(escape(f"{e.name} ({e.kind})")))
    if not is_main():
        return 0
    if runner.interrupted is not None:
        stopped = next(o for o in outcomes if o.status == "interrupted")
        console.print(f"[yellow]posttrain: {escape(stopped.error or '')}[/yellow]", soft_wrap=True)
        return EXIT_INTERRUPTED[runner.interrupted.signal_name]
    _summary(console, outcomes, recipe.output_dir)
    if runner.report_path is not None:
        console.print(f"report: {escape(str(runner.report_path))}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        f = failed[0]
        details = recipe.output_dir / f.name / "manifest.json"
        console.print(f"[red]stage {escape(repr(f.name))} failed:[/red] {escape(f.error or '')}\n"
                      f"(details: {escape(str(details))}; re-run with --debug for a traceback)")
        return EXIT_STAGE_FAILED
    return 0


def cmd_report(args) -> int:
    from posttrain.pipeline.report import write_report

    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"posttrain report: {e}", file=sys.stderr)
        return EXIT_BAD_RECIPE
    print(f"report: {path}")
    return 0


def cmd_validate(args) -> int:
    from posttrain.pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {', '.join(f'{s.name}:{s.kind}' for s in recipe.stages)})")
    return 0


def cmd_stages(args) -> int:
    from posttrain.stages import STAGE_KINDS

    console = _console()
    for kind in sorted(STAGE_KINDS):
        k = STAGE_KINDS[kind]
        if args.kind and kind != args.kind:
            continue
        console.rule(f"[bold]{kind}[/bold]")
        console.print(escape(k.summary))
        console.print(f"outputs: {', '.join('${stages.NAME.' + o + '}' for o in k.outputs)}")
        _print_fields(console, k.config_cls, "  ")
    if args.kind and args.kind not in STAGE_KINDS:
        print(f"unknown stage kind {args.kind!r}; kinds: {', '.join(sorted(STAGE_KINDS))}", file=sys.stderr)
        return EXIT_BAD_RECIPE
    return 0


def type_text(annotation) -> str:
    """A field's type as a user reads it: a Literal's allowed values ('cosine' | 'linear'), unions
    spelt with |, containers with their item types, Annotated types as their base type."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_text(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _print_fields(console, cls, indent: str) -> None:
    from pydantic_core import PydanticUndefined

    from posttrain.pipeline.recipe import _model_in

    for name, f in cls.model_fields.items():
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = f"default {f.default_factory()!r}"
        else:
            default = f"default {f.default!r}" if f.default is not PydanticUndefined else ""
        ann = type_text(f.annotation)
        console.print(f"{indent}[bold]{name}[/bold] {escape(f'({ann}, {default}): {f.description or str()}')}",
                      soft_wrap=True)
        sub = _model_in(f.annotation)
        if sub is not None and sub is not cls:
            _print_fields(console, sub, indent + "    ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-train a pretrained LM into an instruction-tuned one from a YAML recipe.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe")
    r.add_argument("recipe")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run from this stage on")
    r.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must be complete)")
    r.add_argument("--set", action="append", metavar="key.path=value", help="override a recipe value (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="show what would run")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    v = sub.add_parser("validate", help="check a recipe (exit 0 valid, 2 invalid)")
    v.add_argument("recipe")
    v.add_argument("--set", action="append", metavar="key.path=value")
    v.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    rp = sub.add_parser("report", help="write the HTML report of a run directory (plots embedded; opens offline)")
    rp.add_argument("run_dir")
    rp.add_argument("--out", metavar="FILE", help="where to write it (default RUN_DIR/report.html)")
    rp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    s = sub.add_parser("stages", help="list stage kinds with their config fields and defaults")
    s.add_argument("kind", nargs="?")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    if args.command == "run":
        from posttrain.allocator import retain_freed_memory

        retain_freed_memory()  # training steps reuse freed heap memory instead of page-faulting it back
    from posttrain.data import DataError
    from posttrain.pipeline.recipe import RecipeError

    try:
        code = {"run": cmd_run, "validate": cmd_validate, "stages": cmd_stages, "report": cmd_report}[args.command](args)
    except RecipeError as e:
        if args.debug:
            raise
        print(f"posttrain: invalid recipe:\n{e}", file=sys.stderr)
        code = EXIT_BAD_RECIPE
    except DataError as e:
        if args.debug:
            raise
        print(f"posttrain: bad data: {e}", file=sys.stderr)
        code = EXIT_BAD_RECIPE
    except KeyboardInterrupt as e:  # outside a stage (loading data, building models, writing the report)
        if args.debug:
            raise
        name = getattr(e, "signal_name", "SIGINT")
        print(f"posttrain: {name}: interrupted outside a stage; no stage's work was lost, and running the same "
              "command again goes on from the stages already complete", file=sys.stderr)
        code = EXIT_INTERRUPTED[name]
    if args.command == "run" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_launched_rank(code)
    return code


def _leave_launched_rank(code: int) -> None:
    """End a rank of a multi-process launch once the run is over and its process groups are torn
    down (posttrain.pipeline.processes.ControlChannel.close). Left to the interpreter's exit, a gloo
    thread still unwinding can make C++ abort the process ("terminate called without an active
    exception") after all the work is done and written, and the launcher then reports a failure."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
