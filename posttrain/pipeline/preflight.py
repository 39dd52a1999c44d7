"""Checks of what a recipe names that can be made without training, run when the recipe loads.

`posttrain validate` and `posttrain run` (before the first stage trains) both load the recipe
through `posttrain.pipeline.recipe`, which calls `recipe_problems` once the stage configs are valid:

- rewards: a registry name that exists ("did you mean 'math'"), a file that exists and defines
  the function, an import path that imports, factory arguments and keyword options the function
  takes;
- columns: the columns each reward reads (its required parameters, and the built-in rewards'
  known columns) and the columns a stage reads (`prompt`, `messages`, ...), wherever a dataset's
  columns can be known without loading it (a toy dataset, a local file, a `columns:` mapping);
- dataset configs: a local hub-style folder read with a `config:` it does not have;
- engines: image prompts (a toy vision set, or a local file whose rows hold image parts) given to a
  stage whose rollout engine is vLLM, which generates from text alone here.

Each problem is a (key path, message) pair; `posttrain.pipeline.recipe` adds file and line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel

# Columns the built-in rewards read. Their functions take every column as optional (a mixed
# dataset's rows lack some), so their signatures do not say it; a dataset without any of these
# columns would score nothing. A tuple is "one of these".
BUILTIN_REWARD_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "math": [("answer",)],
    "code": [("tests", "io")],
    "instructions": [("instruction_id_list",)],
}
# Keyword arguments GRPOTrainer passes besides the columns; a reward may require them.
CALLER_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
# The columns a stage kind reads from its data (one of the alternatives), by config field.
STAGE_COLUMNS: dict[str, dict[str, list[tuple[str, ...]]]] = {
    "sft": {"dataset": [("messages",), ("prompt", "completion")]},
    "rl": {"dataset": [("prompt",)], "eval_dataset": [("prompt",)]},
    "warp": {"dataset": [("prompt",)], "eval_dataset": [("prompt",)]},
    "evaluate": {"datasets": [("prompt",)]},
}
# Config fields that name the data a stage's rewards score.
DATA_FIELDS = ("dataset", "eval_dataset", "datasets")


@dataclass
class Problem:
    path: tuple  # key path inside the recipe, e.g. ("stages", 1, "rewards", 0, "fn")
    message: str


def recipe_problems(top, stages: list, base_dir: Path,
                    columns_of: Callable[[str], set | None] | None = None) -> list[Problem]:
    """Every problem found in `stages` ([(index, name, kind, config)]) of the validated recipe `top`.
    `columns_of(reference)` gives a dataset's columns (default: what is knowable without loading it;
    the runner passes the columns of the data it has loaded)."""
    problems: list[Problem] = []
    columns_of = columns_of or _DatasetColumns(top, base_dir)
    for name, entry in top.datasets.items():
        message = dataset_config_problem(entry, base_dir)
        if message:
            problems.append(Problem(("datasets", name, "config"), message))
    for index, _name, kind, config in stages:
        where = ("stages", index)
        data = list(_data_references(config))
        problems += _image_engine_problems(where, config, data, columns_of)
        for field, required in STAGE_COLUMNS.get(kind, {}).items():
            for path, ref in data:
                if path[0] == field:
                    problems += _missing_columns(where + path, ref, columns_of(ref), required,
                                                 f"the {kind} stage reads")
        for path, spec in _reward_specs(config):
            fn, message = _load(spec, base_dir)
            if message:
                problems.append(Problem(where + path + (("fn",) if spec.fn else ("name",)), message))
                continue
            if fn is not None:
                problems += _call_problems(where + path, spec, fn)
            for data_path, ref in data:
                problems += _reward_column_problems(where + path, spec, fn, data_path, ref, columns_of(ref))
    return problems


# --- rewards ---------------------------------------------------------------------------------------

def _reward_specs(config: BaseModel) -> Iterator[tuple[tuple, Any]]:
    """(key path, RewardSpec) of every reward a stage config names, at any depth."""
    from rewards.combine import RewardSpec

    def walk(value, path):
        if isinstance(value, RewardSpec):
            yield path, value
        elif isinstance(value, BaseModel):
            for key in type(value).model_fields:
                yield from walk(getattr(value, key), path + (key,))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(v, path + (i,))
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, path + (k,))

    yield from walk(config, ())


def _load(spec, base_dir: Path) -> tuple[Callable | None, str | None]:
    from rewards.registry import RewardLoadError, load_reward, registered_rewards

    target = spec.target.strip()
    if "${" in target:
        return None, None  # resolved at run time
    if ":" not in target and target not in registered_rewards():
        import difflib

        close = difflib.get_close_matches(target, registered_rewards(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return None, (f"unknown reward {target!r}{hint} Registered rewards: {', '.join(registered_rewards())}; "
                      "or give an import path 'package.module:function' or a file 'path/to/file.py:function' "
                      "(relative to the recipe)")
    from rewards.registry import is_builtin_reward

    if is_builtin_reward(target) and spec.factory is None:
        return None, None  # known and importable; importing it here would pull in its heavy dependencies
    try:
        return load_reward(target, base_dir=base_dir), None
    except RewardLoadError as e:
        return None, str(e)


def _parameters(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool] | None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None  # a builtin or extension callable: nothing to check
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return dict(params), takes_any


def _call_problems(path: tuple, spec, fn: Callable) -> list[Problem]:
    """Factory arguments the factory does not take; options the function does not take."""
    if spec.factory is not None:
        try:
            inspect.signature(fn).bind(**spec.factory)
        except TypeError as e:
            taken = _parameters(fn)
            names = ", ".join(taken[0]) if taken else "?"
            return [Problem(path + ("factory",), f"{spec.target} cannot be called with {sorted(spec.factory)}: {e}; "
                            f"it takes: {names}")]
        except ValueError:
            pass
        return []  # the function the factory returns is only known once it is called, when the stage runs
    found = _parameters(fn)
    if found is None or found[1]:
        return []
    params, _ = found
    unknown = [k for k in spec.kwargs if k not in params]
    if unknown:
        return [Problem(path + ("kwargs", unknown[0]), f"{spec.target} takes no argument {unknown[0]!r}; it takes: "
                        f"{', '.join(params)}")]
    return []


def _reward_columns(spec, fn: Callable) -> list[tuple[str, ...]]:
    """Columns the reward reads (each a tuple of alternatives), after its `columns` renames."""
    required: list[tuple[str, ...]] = list(BUILTIN_REWARD_COLUMNS.get(spec.target.strip(), []))
    found = _parameters(fn) if (fn is not None and spec.factory is None) else None
    if found is not None:
        for name, p in found[0].items():
            if (p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and name not in CALLER_ARGUMENTS and name not in spec.kwargs):
                required.append((name,))
    renamed = [tuple(spec.columns.get(c, c) for c in group) for group in required]
    renamed += [(c,) for c in spec.columns.values() if all(c not in g for g in renamed)]
    return renamed


def _reward_column_problems(path, spec, fn, data_path, ref, columns) -> list[Problem]:
    if columns is None:
        return []
    out = []
    for group in _reward_columns(spec, fn):
        if not any(c in columns for c in group):
            wanted = " or ".join(repr(c) for c in group)
            out.append(Problem(path, f"reward {spec.label!r} reads the column {wanted}, which {ref} "
                               f"({'.'.join(str(p) for p in data_path)}) does not have; its columns are: "
                               f"{', '.join(sorted(columns)) or '(none)'}. Map one into the dataset (its `columns:`) "
                               f"or point the reward at another with `columns: {{{group[0]}: COLUMN}}`"))
    return out


# --- data ------------------------------------------------------------------------------------------

def _data_references(config: BaseModel) -> Iterator[tuple[tuple, str]]:
    for field in DATA_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, str):
            yield (field,), value
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, str):
                    yield (field, k), v


def _missing_columns(path, ref, columns, required, reader) -> list[Problem]:
    if columns is None or any(all(c in columns for c in group) for group in required):
        return []
    wanted = " or ".join("+".join(repr(c) for c in group) for group in required)
    return [Problem(path, f"{reader} {wanted} from {ref}, which has the columns: {', '.join(sorted(columns)) or '(none)'}")]


def _image_engine_problems(where: tuple, config: BaseModel, data: list, columns_of) -> list[Problem]:
    """Image prompts for a stage whose rollout engine is vLLM (named, or a server): refused here, before
    anything trains, rather than at the first image prompt. (`auto` picks the transformers engine for
    image prompts itself.)"""
    rollout = getattr(config, "rollout", None)
    if rollout is None or not (rollout.backend == "vllm" or rollout.mode == "server"):
        return []
    holds_images = getattr(columns_of, "holds_images", None)
    if holds_images is None:
        return []
    from posttrain.images import IMAGE_ENGINE_HINT

    key = ("rollout", "backend") if rollout.backend == "vllm" else ("rollout", "mode")
    return [Problem(where + key, f"{ref} ({'.'.join(str(p) for p in path)}) holds image prompts, and vLLM generates "
                    f"from text alone here (it serves a composite model's language model); {IMAGE_ENGINE_HINT}")
            for path, ref in data if holds_images(ref)][:1]


class _DatasetColumns:
    """Columns of a `${datasets.NAME}` reference when knowable without loading it, else None."""

    def __init__(self, top, base_dir: Path):
        self.top, self.base_dir = top, base_dir
        self._cache: dict[str, set | None] = {}

    def holds_images(self, ref: str) -> bool:
        """Whether the rows of `ref` hold image parts, where that is knowable without loading it
        (a toy vision set, a local file): False when it is not."""
        entry = self._entry(ref)
        if entry is None:
            return False
        if entry.toy is not None:
            return entry.toy.task.startswith("vision_")
        if entry.columns and any(source.image for source in entry.columns.values()):
            return True
        if entry.path is None or entry.loads_through_datasets:
            return False
        path = _local_path(entry.path, self.base_dir)
        return path is not None and path.is_file() and file_holds_images(path)

    def _entry(self, ref: str):
        ref = ref.strip()
        if not (ref.startswith("${datasets.") and ref.endswith("}")):
            return None
        return self.top.datasets.get(ref[len("${datasets."):-1])

    def __call__(self, ref: str) -> set | None:
        ref = ref.strip()
        if not (ref.startswith("${datasets.") and ref.endswith("}")):
            return None  # a stage's output or a path: known only when the run gets there
        name = ref[len("${datasets."):-1]
        if name not in self._cache:
            entry = self.top.datasets.get(name)
            try:
                self._cache[name] = None if entry is None else self._columns(entry)
            except Exception:  # noqa: BLE001 - unreadable here: the loader reports it properly at run time
                self._cache[name] = None
        return self._cache[name]

    def _columns(self, entry) -> set | None:
        if entry.columns is not None:
            return set(entry.columns)
        if entry.toy is not None and entry.toy.task.startswith("vision_"):
            return {"messages"} if entry.toy.format == "chat" else {"prompt", "answer"}
        if entry.toy is not None:
            from posttrain.toy import tasks

            spec = entry.toy
            # rows of a mix are drawn task by task at random: 200 of them hold every task's columns
            rows = tasks.generate(spec.task, min(spec.n, 200), seed=spec.seed or 0, split=spec.split, fmt=spec.format,
                                     mix=spec.mix, flip_rate=spec.flip_rate,
                                     ignore_instruction_rate=spec.ignore_instruction_rate, level=spec.level,
                                  hard_fraction=spec.hard_fraction)
            return {k for row in rows for k in row}
        if entry.path is None or entry.loads_through_datasets:
            return None
        path = _local_path(entry.path, self.base_dir)
        if path is None or not path.is_file():
            return None
        return file_columns(path)


def file_columns(path: str | Path, max_rows: int = 200_000) -> set | None:
    """Every column of a data file's rows, or None when that is not known for sure: the file has
    more than `max_rows` rows (a column may first appear late, as in files of several tasks put
    one after another), or a row cannot be read (the stage that reads it reports that, with its
    line, or skips it under `on_invalid_row: skip`)."""
    from posttrain.data import iter_rows

    keys: set = set()
    try:
        for i, (_, row) in enumerate(iter_rows(path)):
            if i >= max_rows:
                return None
            keys |= set(row)
    except Exception:  # noqa: BLE001 - see the docstring: not this check's error to report
        return None
    return keys


def file_holds_images(path: str | Path, max_rows: int = 200_000) -> bool:
    """Whether some row among a data file's first `max_rows` holds an image part in its prompt,
    messages or completion (False for a file that cannot be read: its stage reports that)."""
    from posttrain.chat import has_image_parts
    from posttrain.data import iter_rows

    try:
        for i, (_, row) in enumerate(iter_rows(path)):
            if i >= max_rows:
                return False
            if any(has_image_parts(row.get(column)) for column in ("prompt", "messages", "completion")):
                return True
    except Exception:  # noqa: BLE001 - see the docstring: not this check's error to report
        return False
    return False


def _local_path(text: str, base_dir: Path) -> Path | None:
    p = Path(text).expanduser()
    for c in ([p] if p.is_absolute() else [base_dir / p, Path.cwd() / p]):
        if c.exists():
            return c
    return None


def dataset_config_problem(entry, base_dir: Path) -> str | None:
    """A local data folder read with a `config:` that the folder does not define."""
    if entry.path is None or entry.config is None:
        return None
    path = _local_path(entry.path, base_dir)
    if path is None or not path.is_dir():
        return None
    from posttrain.data import config_hint, is_saved_dataset

    if is_saved_dataset(path):
        return None
    return config_hint(path, entry.config)
