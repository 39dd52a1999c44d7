"""Recipe schema, loading and validation, with errors that name file, line and key path.

A recipe is YAML: `name`, `output_dir`, `seed`, `models`, `datasets` and an ordered list of
`stages`, each `{name, kind, ...config}`. Values may reference earlier things:
`${models.NAME}`, `${datasets.NAME}`, `${stages.NAME.OUTPUT}`; references to unknown or later
stages, or to outputs a stage kind does not declare, are errors at load time.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.stages import STAGE_KINDS
from posttrain.toy.models import TinyModelSpec

REFERENCE = re.compile(r"\$\{([^}]*)\}")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """The recipe is invalid; the message says where and what was expected."""


# --- schema ------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelEntry(_Strict):
    """A model: a local directory or hub id (`path`), or a tiny model built locally (`tiny`)."""

    path: str | None = Field(None, description="Local checkpoint directory or hub id (needs the hub cache offline).")
    tiny: TinyModelSpec | None = Field(None, description="Build a tiny model of a real architecture locally.")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of 'path' or 'tiny'")
        return self


class _ToyDifficulty(_Strict):
    """The toy world's difficulty, shared by toy and dirty toy datasets."""

    level: Literal["basic", "hard"] = Field("basic", description="Difficulty: hard replaces code and instructions "
                                            "by harder variants (two numbers to copy into a function; a word to "
                                            "use in the format asked); math and chat are the same at both levels.")
    hard_fraction: float = Field(0.0, ge=0, le=1, description="At level basic: the fraction of code and "
                                 "instruction rows drawn at the hard level all the same (data that teaches both).")

    @model_validator(mode="after")
    def _hard_fraction_at_basic(self):
        if self.hard_fraction and self.level == "hard":
            raise ValueError("hard_fraction: applies at level basic (at level hard every row is hard)")
        return self


class ToyDatasetSpec(_ToyDifficulty):
    task: Literal["math", "code", "instructions", "chat", "mix", "vision_colour", "vision_count"] = Field(
        description="Toy task, or 'mix' of the text ones; vision_colour and vision_count ask about an image of "
        "coloured shapes (posttrain.toy.vision; for composite models), its PNG files written beside the rows.")
    n: int = Field(gt=0, description="Number of rows.")
    split: Literal["train", "eval", "ood"] = Field("train", description="train and eval: disjoint parts of the problem "
                                                   "space; ood: the same tasks on names, items, topics and small "
                                                   "talk neither uses (out of distribution).")
    format: Literal["chat", "prompt", "preference"] = Field("chat", description="Row format.")
    seed: int | None = Field(None, description="Defaults to the recipe seed.")
    mix: dict[str, float] | None = Field(None, description="Task weights when task is 'mix'.")
    flip_rate: float = Field(0.0, ge=0, le=1, description="Preference rows: the fraction whose chosen and rejected "
                             "are swapped (label noise; the toy world still knows the true preference).")
    ignore_instruction_rate: float = Field(0.0, ge=0, le=1, description="Chat rows: the fraction of instruction "
                                           "rows answered with the instruction ignored (imperfect demonstrations).")

    @model_validator(mode="after")
    def _each_rate_fits_the_format(self):
        if self.task.startswith("vision_"):
            if self.format == "preference" or self.split == "ood" or self.mix is not None:
                raise ValueError(f"{self.task}: image rows come as chat or prompt rows, split train or eval, "
                                 "without a mix")
        if self.flip_rate and self.format != "preference":
            raise ValueError(f"flip_rate: only preference rows have labels to flip (format is {self.format!r})")
        if self.ignore_instruction_rate and self.format != "chat":
            raise ValueError("ignore_instruction_rate: only chat rows are demonstrations to spoil "
                             f"(format is {self.format!r})")
        return self


class ToyDirtySpec(_ToyDifficulty):
    """Its `level` and `hard_fraction` are its clean rows' difficulty."""

    n_clean: int = Field(gt=0, description="Clean chat rows (a mix of all tasks).")
    dirty_per_kind: int = Field(5, ge=0, description="Planted rows per kind: pii, toxic, misidentification, exact and near duplicates.")
    seed: int | None = Field(None, description="Defaults to the recipe seed.")


class ColumnSource(_Strict):
    """Where an output column comes from: a source column (`from`, or one picked per row `by` a
    label column's value among `cases`; optionally the text `after` a marker, a transcript split into
    messages at its `turns` markers, or messages whose `roles` are renamed), or a `template`
    formatted over the source row."""

    from_: str | None = Field(None, alias="from", description="Source column.")
    by: str | None = Field(None, description="A label column whose value picks this row's source column among "
                           "`cases`: preference sets that keep two answers and which one won (stanfordnlp/SHP, "
                           "PKU-SafeRLHF, lmsys/chatbot_arena_conversations).")
    cases: dict[str, str] | None = Field(None, description="With `by`: the label's value -> the source column to read "
                                         "for rows with that value (SHP's chosen: {1: human_ref_A, 0: human_ref_B}).")
    after: str | None = Field(None, description="Keep the text after the last occurrence of this marker (GSM8K: '####').")
    template: str | None = Field(None, description="Python format string over the source row, e.g. '{text}\\n{test_list[0]}'.")
    turns: dict[str, Literal["system", "user", "assistant"]] | None = Field(
        None, description="Split a transcript into messages: marker -> role, each occurrence of a marker opens a "
        "turn (Anthropic/hh-rlhf: {'\\n\\nHuman:': user, '\\n\\nAssistant:': assistant}).")
    roles: dict[str, Literal["system", "user", "assistant"]] | None = Field(
        None, description="Rename the roles of a list of messages, which may also be ShareGPT's {from, value} "
        "(e.g. {human: user, gpt: assistant}); roles already system, user or assistant stay as they are.")
    image: str | None = Field(
        None, description="A column holding the row's image (a PIL image, encoded bytes or a file path; a list for "
        "several): put at the start of the first user turn as an image part, a text becoming that turn; the images "
        "are written as files beside the mapped rows (for composite models, e.g. prompt: {from: question, image: image}).")
    drop_last_answer: bool | None = Field(  # None, not False: a mapping without it keeps the fingerprint it had
        None, description="Keep a conversation up to its last assistant turn, the prompt that answer was given to "
        "(RL or distillation prompts from a preference set's `chosen`); after `turns` or `roles` when given.")

    @field_validator("cases", mode="before")
    @classmethod
    def _case_values_as_text(cls, cases):
        # YAML reads `1:` as an int and `true:` as a bool; a JSON or parquet label may be 1, 1.0 or
        # true, and a CSV cell "1". Keys and row values meet as one spelling (data.case_label).
        from posttrain.data import case_label

        if isinstance(cases, dict):
            labels = [case_label(k) for k in cases]
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(f"the label {repeated[0]!r} is given twice")
            return dict(zip(labels, cases.values()))
        return cases

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.from_, self.template, self.by)) != 1:
            raise ValueError("give exactly one of 'from', 'template' or 'by' (with 'cases')")
        if (self.by is None) != (self.cases is None):
            raise ValueError("'by' (the label column) and 'cases' (label -> source column) go together")
        if self.cases is not None:
            if not self.cases:
                raise ValueError("'cases' needs at least one label -> source column")
            blank = [label for label, column in self.cases.items() if not column.strip()]
            if blank:
                raise ValueError(f"'cases': the label {blank[0]!r} names no source column")
        for option in ("after", "turns", "roles"):
            if getattr(self, option) is not None and self.template is not None:
                raise ValueError(f"'{option}' applies to a 'from' (or 'by') column, not to a template")
        given = [option for option in ("after", "turns", "roles") if getattr(self, option) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of 'after' (a text's end), 'turns' (a transcript split into messages) or "
                             f"'roles' (messages' roles renamed), not {' and '.join(repr(g) for g in given)}")
        if self.drop_last_answer and (self.template is not None or self.after is not None):
            raise ValueError("'drop_last_answer' applies to a 'from' column of messages (or one split by 'turns'), "
                             "not to text cut by 'after' or a template")
        if self.roles is not None and not self.roles:
            raise ValueError("'roles' needs at least one source role -> role")
        if self.turns is not None:
            if not self.turns:
                raise ValueError("'turns' needs at least one marker -> role")
            blank = [m for m in self.turns if not m.strip()]
            if blank:
                raise ValueError(f"'turns': a marker must have visible text, got {blank[0]!r}")
            if "assistant" not in self.turns.values():
                raise ValueError("'turns': no marker opens an 'assistant' turn, so no answer would be kept")
        return self


class DatasetEntry(_Strict):
    """A dataset: a local file (`path`: .jsonl, .json, .csv, .parquet, .arrow, a saved `datasets` directory, or a data
    directory `datasets.load_dataset` reads), a Hugging Face hub dataset (`hub`), or a toy generator.
    Hub datasets, and local ones with `columns`, `filter` or `limit`, are loaded through the `datasets`
    library (hub cache and offline mode as usual), mapped into the data contract and written once
    into the run directory."""

    path: str | None = None
    hub: str | None = Field(None, description="Hub dataset name, e.g. openai/gsm8k.")
    config: str | None = Field(None, description="Dataset configuration (hub or load_dataset directory), e.g. main.")
    data_dir: str | None = Field(None, description="A folder of the dataset's repository to read (hub or load_dataset "
                                 "directory), e.g. helpful-base of Anthropic/hh-rlhf.")
    split: str | None = Field(None, description="Split to read, e.g. test; needed when there are several.")
    revision: str | None = Field(None, description="Hub revision (a commit sha pins the data).")
    columns: dict[str, ColumnSource] | None = Field(
        None, description="Output column -> source column name, {from|by+cases, after|turns|roles} or {template}; only mapped "
        "columns are kept.")
    filter: dict[str, Any] | None = Field(None, description="Keep rows whose column equals the value (or is in the list).")
    limit: int | None = Field(None, gt=0, description="Keep the first N rows (after the filter).")
    toy: ToyDatasetSpec | None = None
    toy_dirty: ToyDirtySpec | None = None

    @field_validator("columns", mode="before")
    @classmethod
    def _column_names_are_sources(cls, columns):
        # A bare name is {from: NAME}; read as one shape, a mistake is reported once, under its key path,
        # not once per shape a union would try.
        if isinstance(columns, dict):
            for k, v in columns.items():
                if not isinstance(v, (str, dict)):
                    raise ValueError(f"{k}: expected a source column's name, {{from: NAME, ...}} or {{template: ...}}, "
                                     f"got {type(v).__name__} {v!r}")
            return {k: {"from": v} if isinstance(v, str) else v for k, v in columns.items()}
        return columns

    @model_validator(mode="after")
    def _exactly_one(self):
        if sum(x is not None for x in (self.path, self.hub, self.toy, self.toy_dirty)) != 1:
            raise ValueError("give exactly one of 'path', 'hub', 'toy' or 'toy_dirty'")
        if self.hub is None and self.revision is not None:
            raise ValueError("'revision' applies to hub datasets only")
        self._check_picked_sides()
        if self.path is None and self.hub is None:
            extra = [k for k in ("config", "data_dir", "split", "columns", "filter", "limit") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(repr(k) for k in extra)}: only for 'path' and 'hub' datasets, not toy ones")
        return self

    def _check_picked_sides(self) -> None:
        # `chosen` and `rejected` picked by one label must name different columns for every label,
        # or each such row would become a pair of one answer against itself (kept, teaching nothing).
        columns = self.columns or {}
        chosen, rejected = columns.get("chosen"), columns.get("rejected")
        if chosen is None or rejected is None or chosen.by is None or chosen.by != rejected.by:
            return
        for label in sorted(set(chosen.cases) & set(rejected.cases)):
            if chosen.cases[label] == rejected.cases[label]:
                raise ValueError(f"columns: for {chosen.by} = {label!r}, 'chosen' and 'rejected' both read "
                                 f"{chosen.cases[label]!r}; the two sides must be different answers")
        one_sided = sorted(set(chosen.cases) ^ set(rejected.cases))
        if one_sided:
            raise ValueError(f"columns: {chosen.by} = {one_sided[0]!r} is a case of only one of 'chosen' and "
                             f"'rejected'; give both sides for every label")

    @property
    def loads_through_datasets(self) -> bool:
        """Whether the rows are loaded, mapped and written into the run directory (else read in place)."""
        return self.hub is not None or any(getattr(self, k) is not None
                                           for k in ("config", "data_dir", "split", "columns", "filter", "limit"))

    def load_options(self) -> dict:
        cols = None
        if self.columns is not None:
            cols = {k: v.model_dump(by_alias=True, exclude_none=True) for k, v in self.columns.items()}
        options = {"hub": self.hub is not None, "config": self.config, "split": self.split, "revision": self.revision,
                   "columns": cols, "filter": self.filter, "limit": self.limit}
        if self.data_dir is not None:  # only when given, so that the fingerprints of other entries stay as they were
            options["data_dir"] = self.data_dir
        return options


class StageEntry(_Strict):
    name: str
    kind: str
    config: Any  # the kind's validated config class instance (references still unresolved)


class RecipeTop(_Strict):
    name: str = Field(description="Run name, shown in the model card.")
    output_dir: str = Field(description="Run directory; relative paths are relative to the recipe file.")
    seed: int = Field(0, description="Seed for python, numpy, torch and data order.")
    plugins: list[str] = Field(default_factory=list, description="Modules imported before validation, to register "
                               "your own stage kinds and rewards: 'package.module' or 'path/to/file.py'.")
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    datasets: dict[str, DatasetEntry] = Field(default_factory=dict)
    rollout: dict[str, Any] | None = Field(
        None, description="Recipe-wide rollout engine settings (e.g. {backend: transformers}): every stage with a "
        "`rollout` (rl, distill, warp, evaluate, ...) starts from these, and its own `rollout:` keys override them.")
    stages: list[dict] = Field(description="Ordered list of {name, kind, ...config}.")


@dataclass
class Recipe:
    name: str
    output_dir: Path
    seed: int
    models: dict[str, ModelEntry]
    datasets: dict[str, DatasetEntry]
    stages: list[StageEntry]
    source: Path | None
    raw: dict  # the recipe after overrides, before reference resolution
    lines: dict[tuple, int] = field(default_factory=dict)

    def stage(self, name: str) -> StageEntry:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"no stage named {name!r}; stages are {', '.join(s.name for s in self.stages)}"
                          + _suggest(name, [s.name for s in self.stages]))


# --- YAML with line numbers ------------------------------------------------------------------

def _load_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: malformed YAML: {problem}") from None
    if node is None:
        raise RecipeError(f"{source}: the recipe is empty; expected a mapping with name, output_dir, stages")
    lines: dict[tuple, int] = {}

    def walk(n, path):
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    walk(node, ())
    loader = yaml.SafeLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: malformed YAML: {e}") from None
    finally:
        loader.dispose()
    return data, lines


# --- errors ------------------------------------------------------------------------------------

def _path_str(path: tuple, stage_names: list | None = None) -> str:
    """`stages.rl.rewards[0]`: a stage is named by its `name` (the form `--set` takes too) when
    `stage_names` knows it and it is unique, else by its index (`stages[1].rewards[0]`)."""
    out = ""
    for i, p in enumerate(path):
        if (i == 1 and path[0] == "stages" and isinstance(p, int) and stage_names is not None
                and p < len(stage_names) and isinstance(stage_names[p], str) and STAGE_NAME.match(stage_names[p])
                and stage_names.count(stage_names[p]) == 1):
            out += f".{stage_names[p]}"
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _where(source: str, lines: dict[tuple, int], path: tuple) -> str:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            line = lines[path[:cut]]
            return f"{source}:{line}" if line > 0 else f"{source} (--set)"
    return source


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _allowed_fields(model_cls, loc: tuple) -> list[str]:
    """Field names valid at `loc` inside `model_cls` (best effort, for suggestions)."""
    cls = model_cls
    for part in loc:
        if isinstance(part, int) or cls is None or not hasattr(cls, "model_fields"):
            continue
        f = cls.model_fields.get(part)
        if f is None:
            return list(cls.model_fields)
        cls = _model_in(f.annotation)
    return list(cls.model_fields) if cls is not None and hasattr(cls, "model_fields") else []


def _model_in(annotation):
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_validation(err: ValidationError, model_cls, source: str, lines, prefix: tuple,
                       stage_names: list | None = None) -> str:
    msgs = []
    for e in err.errors():
        # pydantic's union-member and validator labels ("function-after[...]", "list[RewardSpec]") are not keys
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-"))))
        full = prefix + loc
        where = _where(source, lines, full)
        shown = _path_str(full, stage_names)
        if e["type"] == "extra_forbidden" and loc:
            allowed = _allowed_fields(model_cls, loc[:-1])
            msgs.append(f"{where}: unknown key {shown!r}{_suggest(loc[-1], allowed)}"
                        + (f" (valid keys: {', '.join(allowed)})" if allowed else ""))
        elif e["type"] == "missing":
            msgs.append(f"{where}: missing required key {shown!r}")
        else:
            got = e.get("input")
            got_s = repr(got)
            got_s = got_s[:60] + "..." if len(got_s) > 60 else got_s
            msgs.append(f"{where}: {shown}: {e['msg']} (got {got_s})")
    return "\n".join(msgs)


# --- overrides -------------------------------------------------------------------------------

_OVERRIDE_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _override_parts(key: str, assignment: str) -> list:
    """`stages.rl.rewards[0].weight` -> ['stages', 'rl', 'rewards', 0, 'weight']; `stages[1]` and
    `stages.1` address a list item by index too."""
    parts, pos = [], 0
    key = key.strip()
    while pos < len(key):
        if key[pos] == ".":
            pos += 1
            continue
        m = _OVERRIDE_PART.match(key, pos)
        if m is None:
            raise RecipeError(f"--set {assignment!r}: cannot read the key path at {key[pos:]!r}; expected names "
                              "separated by '.', list items as [N] (e.g. stages.rl.rewards[0].weight=2)")
        parts.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    return parts


def _override_index(node: list, part, assignment: str, shown: str) -> int:
    """The index into a list a path part addresses: a number, or (in `stages`) a stage's name."""
    if isinstance(part, int) or part.isdigit():
        idx = int(part)
        if idx >= len(node):
            raise RecipeError(f"--set {assignment!r}: {shown} has {len(node)} items; index {idx} is out of range")
        return idx
    names = [s.get("name") for s in node if isinstance(s, dict)]
    if part not in names:
        raise RecipeError(f"--set {assignment!r}: no stage named {part!r}{_suggest(part, names)}")
    return names.index(part)


def apply_override(raw: dict, assignment: str, lines: dict[tuple, int]) -> None:
    """Apply `key.path=value` (value parsed as YAML). `stages.NAME.key` addresses a stage by name;
    `[N]` (or `.N`) a list item, e.g. `stages.rl.rewards[0].weight=2`."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value")
    key, value_text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {assignment!r}: the value is not valid YAML ({e})") from None
    parts = _override_parts(key, assignment)
    if not parts:
        raise RecipeError(f"--set {assignment!r}: empty key path")
    node: Any = raw
    path: tuple = ()
    stage_names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)] \
        if isinstance(raw.get("stages"), list) else None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        shown = _path_str(path, stage_names)
        if isinstance(node, list):
            idx = _override_index(node, part, assignment, shown)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            path += (idx,)
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise RecipeError(f"--set {assignment!r}: {shown} is a mapping, not a list; [{part}] addresses a list item")
            if last:
                node[part] = value
            else:
                if part not in node:
                    node[part] = [] if isinstance(parts[i + 1], int) else {}
                node = node[part]
            path += (part,)
        else:
            raise RecipeError(f"--set {assignment!r}: {shown} is a {type(node).__name__}, not a mapping or list")
    lines[path] = 0  # 0 marks "came from --set"


# --- references ------------------------------------------------------------------------------

def iter_references(value: Any, path: tuple = ()):
    """Yield (key path, reference text) for every ${...} inside a nested value."""
    if isinstance(value, str):
        for m in REFERENCE.finditer(value):
            yield path, m.group(1).strip()
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from iter_references(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from iter_references(v, path + (i,))


def substitute_references(value: Any, lookup) -> Any:
    """Replace references using `lookup(ref) -> str`; a value that is exactly one reference becomes its target."""
    if isinstance(value, str):
        m = REFERENCE.fullmatch(value.strip())
        if m:
            return lookup(m.group(1).strip())
        return REFERENCE.sub(lambda mm: str(lookup(mm.group(1).strip())), value)
    if isinstance(value, dict):
        return {k: substitute_references(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_references(v, lookup) for v in value]
    return value


def _check_reference(ref: str, top: RecipeTop, earlier: dict[str, str], all_stages: list[str],
                     earlier_configs: dict[str, dict]) -> str | None:
    parts = ref.split(".")
    head = parts[0]
    if head == "models":
        if len(parts) != 2 or parts[1] not in top.models:
            name = parts[1] if len(parts) > 1 else ""
            return f"unknown model {name!r}{_suggest(name, top.models)}; models are: {', '.join(top.models) or '(none)'}"
        return None
    if head == "datasets":
        if len(parts) != 2 or parts[1] not in top.datasets:
            name = parts[1] if len(parts) > 1 else ""
            return f"unknown dataset {name!r}{_suggest(name, top.datasets)}; datasets are: {', '.join(top.datasets) or '(none)'}"
        return None
    if head == "stages":
        if len(parts) != 3:
            return "stage references have the form ${stages.NAME.OUTPUT}"
        name, out = parts[1], parts[2]
        if name not in earlier:
            if name in all_stages:
                return f"stage {name!r} runs later; a stage may only use outputs of stages before it"
            return f"unknown stage {name!r}{_suggest(name, all_stages)}"
        kind = STAGE_KINDS.get(earlier[name])
        if kind is not None and out not in kind.outputs:
            return f"stage {name!r} ({kind.kind}) has no output {out!r}{_suggest(out, kind.outputs)}; it has: {', '.join(kind.outputs)}"
        needs = (kind.output_requires or {}).get(out) if kind is not None else None
        if needs and earlier_configs.get(name, {}).get(needs[0]) is None:
            return f"stage {name!r} ({kind.kind}) gives {out!r} only with {needs[0]} set: {needs[1]}"
        return None
    return f"unknown reference root {head!r}; expected models, datasets or stages"


def import_plugin(spec: str, base: Path) -> None:
    """Import a module by dotted name, or a .py file (relative to the recipe's directory)."""
    import importlib
    import importlib.util
    import sys

    if spec.endswith(".py"):
        path = Path(spec) if Path(spec).is_absolute() else base / spec
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        name = f"posttrain_plugin_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


# --- loading ---------------------------------------------------------------------------------

def check_loaded_columns(recipe: "Recipe", columns_of) -> None:
    """The column checks again, on the data as loaded (`columns_of(reference)`): a hub dataset or a
    folder read through `datasets` has columns only once it is loaded, before the first stage trains."""
    names = [s.name for s in recipe.stages]
    src = str(recipe.source) if recipe.source else "<recipe>"
    base = recipe.source.parent if recipe.source else Path.cwd()
    _preflight(recipe, recipe.stages, names, base, src, recipe.lines, columns_of)


def _check_top_rollout(rollout: dict | None, src: str, lines) -> str | None:
    """The recipe-wide `rollout:` checked on its own, so a mistake there is reported at its line
    once rather than under every stage that inherits it."""
    if rollout is None:
        return None
    from posttrain.rollout.types import RolloutConfig

    try:
        RolloutConfig.model_validate(rollout)
    except ValidationError as e:
        return _format_validation(e, RolloutConfig, src, lines, ("rollout",))
    return None


def _inherit_rollout(cfg_raw: dict, recipe_rollout: dict | None, config_cls) -> None:
    """A stage whose config has a `rollout` starts from the recipe-wide one; its own keys win."""
    if recipe_rollout is None or "rollout" not in getattr(config_cls, "model_fields", {}):
        return
    own = cfg_raw.get("rollout")
    if own is None:
        cfg_raw["rollout"] = dict(recipe_rollout)
    elif isinstance(own, dict):
        cfg_raw["rollout"] = {**recipe_rollout, **own}


def _preflight(top, stages: list[StageEntry], all_names: list, base_dir: Path, src: str, lines,
               columns_of=None) -> None:
    """What the recipe names beyond its schema (rewards, columns, dataset configs), checked before
    any stage trains; see posttrain.pipeline.preflight."""
    from posttrain.pipeline.preflight import recipe_problems

    indexed = [(all_names.index(s.name), s.name, s.kind, s.config) for s in stages]
    problems = recipe_problems(top, indexed, base_dir, columns_of)
    if problems:
        raise RecipeError("\n".join(f"{_where(src, lines, p.path)}: {_path_str(p.path, all_names)}: {p.message}"
                                     for p in problems))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError with every problem found, each with file:line."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: the recipe is not UTF-8 text") from None
    raw, lines = _load_yaml_with_lines(text, str(p))
    return recipe_from_dict(raw, source=p, lines=lines, overrides=overrides)


def recipe_from_dict(raw: Any, source: Path | None = None, lines: dict | None = None,
                     overrides=()) -> Recipe:
    src = str(source) if source else "<recipe>"
    lines = dict(lines or {})
    if not isinstance(raw, dict):
        raise RecipeError(f"{src}: expected a mapping with name, output_dir, stages at the top level, got {type(raw).__name__}")
    import copy

    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment, lines)
    try:
        top = RecipeTop.model_validate(raw)
    except ValidationError as e:
        names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)] \
            if isinstance(raw.get("stages"), list) else None
        raise RecipeError(_format_validation(e, RecipeTop, src, lines, (), names)) from None

    rollout_errors = _check_top_rollout(top.rollout, src, lines)
    if rollout_errors:
        raise RecipeError(rollout_errors)
    for i, plugin in enumerate(top.plugins):
        try:
            import_plugin(plugin, Path(source).parent if source else Path.cwd())
        except Exception as e:  # noqa: BLE001 - any import failure is a recipe error with its location
            raise RecipeError(f"{_where(src, lines, ('plugins', i))}: plugins[{i}]: cannot import {plugin!r}: "
                              f"{type(e).__name__}: {e}") from None
    errors: list[str] = []
    stages: list[StageEntry] = []
    names_seen: dict[str, str] = {}
    configs_seen: dict[str, dict] = {}
    all_names = [s.get("name") for s in top.stages if isinstance(s, dict)]
    for i, entry in enumerate(top.stages):
        where_path = ("stages", i)
        if not isinstance(entry, dict):
            errors.append(f"{_where(src, lines, where_path)}: stages[{i}]: expected a mapping with name and kind")
            continue
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(name, str) or not STAGE_NAME.match(name):
            errors.append(f"{_where(src, lines, where_path + ('name',))}: stages[{i}].name: expected a name of letters, digits, _ . -, got {name!r}")
            continue
        if name in names_seen:
            errors.append(f"{_where(src, lines, where_path + ('name',))}: stages[{i}].name: {name!r} is used twice; stage names must be unique")
            continue
        if kind not in STAGE_KINDS:
            errors.append(f"{_where(src, lines, where_path + ('kind',))}: {_path_str(where_path + ('kind',), all_names)}: "
                          f"unknown stage kind {kind!r}"
                          f"{_suggest(kind, STAGE_KINDS)}; this version has: {', '.join(sorted(STAGE_KINDS))}")
            names_seen[name] = kind
            continue
        cfg_raw = {k: v for k, v in entry.items() if k not in ("name", "kind")}
        _inherit_rollout(cfg_raw, top.rollout, STAGE_KINDS[kind].config_cls)
        configs_seen[name] = cfg_raw
        for rpath, ref in iter_references(cfg_raw):
            problem = _check_reference(ref, top, names_seen, all_names, configs_seen)
            if problem:
                full = where_path + rpath
                errors.append(f"{_where(src, lines, full)}: {_path_str(full, all_names)}: ${{{ref}}}: {problem}")
        cls = STAGE_KINDS[kind].config_cls
        try:
            cfg = cls.model_validate(cfg_raw)
        except ValidationError as e:
            errors.append(_format_validation(e, cls, src, lines, where_path, all_names))
            names_seen[name] = kind
            continue
        stages.append(StageEntry(name=name, kind=kind, config=cfg))
        names_seen[name] = kind
    if errors:
        raise RecipeError("\n".join(errors))
    if not stages:
        raise RecipeError(f"{src}: the recipe has no stages")
    _preflight(top, stages, all_names, Path(source).parent if source else Path.cwd(), src, lines)
    out_dir = Path(top.output_dir)
    if not out_dir.is_absolute() and source is not None:
        out_dir = (Path(source).parent / out_dir)
    return Recipe(top.name, out_dir.resolve(), top.seed, top.models, top.datasets, stages, source, raw, lines)

