"""Reading and writing row files (JSONL, Parquet, Arrow) with errors that name file and line, and
the loaders that turn them into the rows each training loop reads."""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from posttrain.chat import (ROLES, ChatFormatError, has_image_parts, normalise_messages, prompt_completion_to_messages,
                            text_view, tokenize_conversation, tokenize_prompt)


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) pairs, streaming; location is `file:line` for JSONL, `file[row i]` otherwise.

    JSONL (`.jsonl`, or `.json` with an object per line), a `.json` file holding one array of
    objects (what many tools export), `.csv` with a header line, Parquet, Arrow or a saved
    `datasets` directory. A UTF-8 byte-order mark (Windows editors and spreadsheet exports
    write one) is skipped rather than taken for broken JSON.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    suffix, compressed = _data_suffix(p) if p.is_file() else (p.suffix.lower(), False)
    if compressed:  # data.jsonl.gz: read as the file inside
        if suffix not in (".jsonl", ".json"):
            raise DataError(f"{p}: unsupported data file; a compressed file must be .jsonl.gz or .json.gz")
    if suffix in (".jsonl", ".json") and p.is_file():
        try:
            if suffix == ".json" and _first_byte(p, compressed) == b"[":
                yield from _json_array_rows(p, compressed)
                return
            with (gzip.open if compressed else open)(p, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw = raw[len(codecs.BOM_UTF8):]
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise DataError(f"{p}:{lineno}: not a valid JSON object ({e})") from None
                    if not isinstance(row, dict):
                        hint = (" (a .jsonl file holds one object per line; a JSON array belongs in a .json file)"
                                if isinstance(row, list) and lineno == 1 else "")
                        raise DataError(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}{hint}")
                    yield f"{p}:{lineno}", row
        except (OSError, EOFError) as e:  # a gzip file cut short or not gzip at all, a failing disk
            raise DataError(f"{p}: cannot read{' the compressed file' if compressed else ''} ({e})") from None
        return
    if suffix == ".csv" and p.is_file():
        yield from _csv_rows(p)
        return
    if suffix == ".parquet" or suffix == ".arrow" or p.is_dir():
        import datasets

        if p.is_dir():
            if not is_saved_dataset(p):
                raise DataError(f"{p}: a directory, but not one written by datasets' save_to_disk; name it as a "
                                "recipe dataset (`path:`) to read the data files inside it through "
                                "datasets.load_dataset")
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if len(ds) != 1:
                    raise DataError(f"{p}: a saved dataset with splits {', '.join(ds)}; name one (`split:` in "
                                    "the recipe's dataset entry)")
                ds = next(iter(ds.values()))
        elif suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(p))
        else:
            ds = datasets.Dataset.from_file(str(p))
        for i, row in enumerate(ds):
            yield f"{p}[row {i}]", dict(row)
        return
    raise DataError(f"{p}: unsupported data file; expected .jsonl, .json (either may be gzipped), .csv, .parquet, "
                    ".arrow or a saved datasets directory")


def _data_suffix(path: Path) -> tuple[str, bool]:
    """A data file's own suffix (for `.gz`, that of the file inside) and whether it is gzipped."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return Path(path.stem).suffix.lower(), True
    return suffix, False


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json",
                                                                      "state.json"))


def _first_byte(path: Path, compressed: bool = False) -> bytes:
    """The file's first byte that is not whitespace (after a byte-order mark), b"" when empty."""
    with (gzip.open if compressed else open)(path, "rb") as fh:
        head = fh.read(4096)
        while head:
            stripped = head.removeprefix(codecs.BOM_UTF8).lstrip()
            if stripped:
                return stripped[:1]
            head = fh.read(4096)
    return b""


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV file with a header line, every cell as text. The standard library's reader,
    not `datasets`: that one guesses column types (an answer column of numbers becomes integers,
    an empty cell NaN), and loses the line a row started on."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for cells in reader:
                where = f"{path}:{start}"
                if not any(cell.strip() for cell in cells):
                    start = reader.line_num + 1
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{where}: {len(cells)} fields, but the header line has {len(header)} "
                                    f"({', '.join(header)})")
                yield where, dict(zip(header, cells))
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _json_array_rows(path: Path, compressed: bool = False) -> Iterator[tuple[str, dict]]:
    """Rows of a .json file holding one array of objects (read whole: JSON has no streaming form
    in the standard library, and such files are exports small enough to be written whole)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
        data = json.loads(raw.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}[row {i}]: expected a JSON object per array element, got {type(row).__name__}")
        yield f"{path}[row {i}]", row


def read_rows(path: str | Path) -> list[dict]:
    return [row for _, row in iter_rows(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temporary file, then rename): a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    return n


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def require_columns(row: dict, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataError(f"{where}: row is missing {', '.join(repr(c) for c in missing)}; has {sorted(row)}")


# --- datasets through the `datasets` library: hub or local, mapped into the data contract ------

def load_table(source: str, *, hub: bool, config: str | None = None, split: str | None = None,
               revision: str | None = None, data_dir: str | None = None, where: str = "dataset"):
    """A `datasets.Dataset` from the hub (`hub=True`: `datasets.load_dataset`, so the hub cache and
    HF_DATASETS_OFFLINE behave as usual) or from a local path: a `save_to_disk` directory, a data
    directory or file `load_dataset` understands (gzipped JSON too). `split` picks one split of a
    dataset dict; `data_dir` one folder of a repository."""
    import datasets

    p = Path(source)
    if data_dir is not None and not hub and (p.is_file() or is_saved_dataset(p)):
        raise DataError(f"{where}.data_dir: applies to a repository's folder of data files; {p} is "
                        f"{'a file' if p.is_file() else 'a saved dataset'}")
    try:
        if not hub and is_saved_dataset(p):
            ds = datasets.load_from_disk(str(p))
        elif not hub and p.is_file():
            kind, compressed = _data_suffix(p)
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(kind)
            if builder is None or (compressed and builder != "json"):
                raise DataError(f"{where}: {p}: unsupported file; expected .jsonl, .json (either may be gzipped), "
                                ".parquet, .csv or .arrow")
            if builder == "csv":
                ds = _csv_table(p, split or "train")
            else:
                ds = datasets.load_dataset(builder, data_files=str(p), split=split or "train")
        else:
            ds = datasets.load_dataset(source, config, split=split, revision=revision, data_dir=data_dir)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's many error types, reported with the entry's key path
        hint = config_hint(p, config) if (config and not hub and p.is_dir()) else None
        raise DataError(f"{where}: cannot load {source!r}"
                        f"{f' (config {config!r})' if config else ''}{f' split {split!r}' if split else ''}: "
                        f"{type(e).__name__}: {e}" + (f". {hint}" if hint else "")) from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is not None:
            if split not in ds:
                raise DataError(f"{where}.split: {split!r} is not a split of {source!r}; it has {', '.join(ds)}")
            ds = ds[split]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{where}.split: {source!r} has splits {', '.join(ds)}; name one")
    return ds


def config_hint(folder: Path, config: str) -> str | None:
    """Why `config` does not fit a local data folder, and what would: a folder without a dataset
    card that lists configurations has only `default`, and a subfolder named like a hub
    configuration (a clone of openai/gsm8k has main/ and socratic/) is read with `data_dir`."""
    import datasets

    try:
        names = datasets.get_dataset_config_names(str(folder))
    except Exception:  # noqa: BLE001 - no list to compare with; the loader's own error stands
        return None
    if config in names:
        return None
    hint = f"config {config!r} is not a configuration of the folder {str(folder)!r}; it has: {', '.join(names)}"
    if (folder / config).is_dir():
        hint += (f". Its subfolder {config}/ is read with `data_dir: {config}` (and no `config:`): a local folder's "
                 "configurations come from its README's `configs:` list, not from its subfolders")
    elif names == ["default"]:
        hint += "; leave `config:` out, or use `data_dir:` to read one of its subfolders"
    return hint


def _csv_table(path: Path, split: str):
    """A CSV file through `datasets` with every cell as text, as `iter_rows` reads it: the csv
    builder would otherwise make an answer column of digits integers ("02139" becomes 2139) and an
    empty cell missing, so that the same file would read differently once a recipe maps it."""
    import datasets

    with path.open(encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: empty CSV; expected a header line")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset("csv", data_files=str(path), split=split, features=features, keep_default_na=False,
                                 encoding="utf-8-sig")


def _keep(row: dict, where_filter: dict[str, Any], where: str) -> bool:
    for column, wanted in where_filter.items():
        if column not in row:
            raise DataError(f"{where}.filter.{column}: no such column; the rows have {sorted(row)}")
        value = row[column]
        if isinstance(wanted, list) and not isinstance(value, list):
            if not any(_same_value(value, w) for w in wanted):
                return False
        elif not _same_value(value, wanted):
            return False
    return True


def _same_value(value: Any, wanted: Any) -> bool:
    """A filter's value against a row's: equal, or the same scalar label in another spelling (a
    CSV cell "1" against YAML's 1, a parquet 1.0 against 1), as `cases` compares them."""
    if value == wanted:
        return True
    scalars = (str, int, float, bool)
    return isinstance(value, scalars) and isinstance(wanted, scalars) and case_label(value) == case_label(wanted)


def map_row(row: dict, columns: dict[str, Any] | None, where: str, images: "ImageFiles | None" = None,
            index: int = 0) -> dict:
    """One row in the data contract. `columns` maps each output column to its source: a column name,
    `{from: NAME, after: MARKER}` (the text after the last MARKER, stripped: GSM8K's `#### 42`),
    `{from: NAME, turns: {MARKER: ROLE}}` (a transcript split into messages), `{from: NAME, roles:
    {SOURCE: ROLE}}` (messages' roles renamed), either with `drop_last_answer` (the prompt before
    the last answer), `{by: LABEL, cases: {VALUE: NAME}}` in place of `from` (the column named by
    this row's label: which of two answers won), or `{template: "...{question}..."}` (str.format
    over the row); any of them with `image: COLUMN`, the row's image(s) put at the start of the
    first user turn (a text becomes that turn), written as files by `images` (ImageFiles; `index`
    names this row's). No mapping keeps the row."""
    if not columns:
        return dict(row)
    out = {}
    for target, source in columns.items():
        if isinstance(source, dict) and source.get("image"):
            if images is None:
                raise DataError(f"{where}.columns.{target}.image: images are mapped where a dataset is written "
                                "into the run directory (materialize_dataset)")
            plain = {k: v for k, v in source.items() if k != "image"}
            value = map_row(row, {target: plain}, where)[target]
            out[target] = with_image_parts(value, images.parts(row, source["image"], f"{where}.columns.{target}.image",
                                                               index), f"{where}.columns.{target}")
            continue
        key = f"{where}.columns.{target}"
        if isinstance(source, str):
            source = {"from": source}
        if "template" in source:
            try:
                out[target] = source["template"].format(**row)
            except (KeyError, IndexError, AttributeError) as e:
                raise DataError(f"{key}.template: {type(e).__name__}: {e}; the rows have {sorted(row)}") from None
            continue
        if "by" in source:
            name = _picked_column(row, source["by"], source["cases"], key)
        else:
            name = source["from"]
        if name not in row:
            raise DataError(f"{key}: column {name!r} is not in the dataset; the rows have {sorted(row)}")
        value = row[name]
        if source.get("after"):
            text = str(value)
            marker = source["after"]
            if marker not in text:
                raise DataError(f"{key}.after: {marker!r} not found in column {name!r}: {text[:80]!r}")
            value = text.rsplit(marker, 1)[1].strip()
        if source.get("turns"):
            value = split_transcript(value, source["turns"], f"{key}.turns (column {name!r})")
        if source.get("roles"):
            value = rename_roles(value, source["roles"], f"{key}.roles (column {name!r})")
        if source.get("drop_last_answer"):
            value = without_last_answer(value, f"{key}.drop_last_answer (column {name!r})")
        out[target] = value
    return out


class ImageFiles:
    """The images of a mapped dataset's image column, written as files in `folder` (beside the data
    the run reads), so that the rows stay JSON and refer to them by path as the project's image
    parts do. A cell may hold a PIL image (`datasets`' Image feature), encoded bytes, a dict with
    `bytes` or `path` (the feature undecoded), a path (relative to `base_dir`, the source's folder),
    or a list of these (several images)."""

    def __init__(self, folder: str | Path, base_dir: str | Path | None = None):
        self.folder, self.base_dir = Path(folder), Path(base_dir) if base_dir is not None else None

    def parts(self, row: dict, column: str, key: str, index: int) -> list[dict]:
        if column not in row:
            raise DataError(f"{key}: column {column!r} is not in the dataset; the rows have {sorted(row)}")
        cells = row[column] if isinstance(row[column], (list, tuple)) else [row[column]]
        if not cells or any(cell is None for cell in cells):
            raise DataError(f"{key}: column {column!r} holds no image in this row")
        return [{"type": "image", "path": self._file(cell, f"{key} (column {column!r})", f"{index}_{j}")}
                for j, cell in enumerate(cells)]

    def _file(self, cell: Any, key: str, stem: str) -> str:
        import io

        from PIL import Image, UnidentifiedImageError

        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, str):
            path = Path(cell).expanduser()
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            if not path.is_file():
                raise DataError(f"{key}: image file {cell!r} not found" +
                                (f" (relative paths are read from {self.base_dir})" if self.base_dir else ""))
            return str(path.resolve())
        self.folder.mkdir(parents=True, exist_ok=True)
        if isinstance(cell, Image.Image):
            out = self.folder / f"{stem}.png"
            cell.save(out)
            return str(out)
        if isinstance(cell, (bytes, bytearray)):
            try:  # kept as encoded (a JPEG stays a JPEG); the format only names the file
                kind = (Image.open(io.BytesIO(cell)).format or "img").lower()
            except UnidentifiedImageError:
                raise DataError(f"{key}: the bytes are not an image PIL can read") from None
            out = self.folder / f"{stem}.{kind}"
            out.write_bytes(cell)
            return str(out)
        raise DataError(f"{key}: expected an image (PIL image, encoded bytes, or a file path), got {type(cell).__name__}")


def with_image_parts(value: Any, parts: list[dict], where: str) -> list[dict]:
    """`value` (a text, or a list of messages) with image `parts` at the start of its first user turn;
    a text becomes that user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": value}]}]
    if not isinstance(value, list):
        raise DataError(f"{where}: images go into a text or a list of messages, got {type(value).__name__}")
    for i, message in enumerate(value):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            return value[:i] + [{**message, "content": [*parts, *text]}] + value[i + 1:]
    raise DataError(f"{where}: the messages have no user turn to put the image in")


def case_label(value: Any) -> str:
    """A label as `cases` keys and row values are compared: YAML reads `1:` as an int and `true:` as
    a bool, a label column may hold 1, 1.0, true, or (from CSV) "1"; all meet as "1" or "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _picked_column(row: dict, by: str, cases: dict[str, str], key: str) -> str:
    """The source column `cases` (keyed by case_label) names for this row's value of its label
    column `by`. A value no case names (a tie, say) is refused, not guessed: `filter:` keeps only
    the rows meant to be read."""
    if by not in row:
        raise DataError(f"{key}.by: column {by!r} is not in the dataset; the rows have {sorted(row)}")
    label = case_label(row[by])
    if label not in cases:
        hint = ""
        if {"true", "false"} & set(cases) and label.lower() in ("yes", "no", "on", "off", "y", "n"):
            hint = f"; YAML reads an unquoted {label} as a boolean, so quote the recipe's key ('{label}':)"
        raise DataError(f"{key}.cases: {by!r} is {row[by]!r}, which no case names (cases: {sorted(cases)}); "
                        f"keep only the rows to read with `filter: {{{by}: [...]}}`{hint}")
    if cases[label] not in row:
        raise DataError(f"{key}.cases.{label}: column {cases[label]!r} is not in the dataset; the rows have "
                        f"{sorted(row)}")
    return cases[label]


def split_transcript(text: Any, turns: dict[str, str], where: str) -> list[dict]:
    """A conversation kept as one text as messages: each occurrence of a marker opens a turn of its
    role, running to the next marker; the turn's text is stripped. Markers carry the separators the
    source uses, so that a marker word inside a turn stays text: Anthropic/hh-rlhf's
    "\\n\\nHuman: ...\\n\\nAssistant: ..." splits at "\\n\\nHuman:" and "\\n\\nAssistant:", guanaco's
    "### Human: ...### Assistant: ..." at "### Human:" and "### Assistant:". Neither datasets nor
    transformers parse such transcripts, hence this. Text before the first marker is refused
    rather than dropped."""
    if not isinstance(text, str):
        raise DataError(f"{where}: expected the transcript as text, got {type(text).__name__}")
    markers = sorted(turns, key=len, reverse=True)  # the longest first, should one marker begin another
    found = list(re.finditer("|".join(re.escape(m) for m in markers), text))
    if not found:
        raise DataError(f"{where}: none of the markers {list(turns)} occurs in {text[:80]!r}")
    head = text[:found[0].start()]
    if head.strip():
        raise DataError(f"{where}: text before the first marker {found[0].group()!r}: {head[:80]!r}")
    ends = [m.start() for m in found[1:]] + [len(text)]
    return [{"role": turns[m.group()], "content": text[m.end():end].strip()} for m, end in zip(found, ends)]


def rename_roles(messages: Any, roles: dict[str, str], where: str) -> list[dict]:
    """A list of messages with their roles renamed by `roles`, as {role, content}. A message may
    also be ShareGPT's {from, value} (`from`: human, gpt, system), the shape of many public chat
    sets; a role neither renamed nor already system, user or assistant is refused with its index,
    rather than dropped or guessed."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "role" in message:
            role, content = message["role"], message.get("content")
        elif isinstance(message, dict) and "from" in message:
            role, content = message["from"], message.get("value")
        else:
            raise DataError(f"{where}[{i}]: expected a message with 'role' (or ShareGPT's 'from' and 'value'), got "
                            f"{sorted(message) if isinstance(message, dict) else type(message).__name__}")
        renamed = roles.get(role, role if role in ROLES else None)
        if renamed is None:
            raise DataError(f"{where}[{i}]: role {role!r} is not renamed (roles: {sorted(roles)}) and is not one of "
                            f"{', '.join(ROLES)}")
        out.append({"role": renamed, "content": content})
    return out


def without_last_answer(messages: Any, where: str) -> list[dict]:
    """A conversation without its last (assistant) turn: the prompt that answer was given to."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}"
                        + (" (a text: split it with 'turns' first)" if isinstance(messages, str) else ""))
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise DataError(f"{where}: the conversation ends with {role!r}, not with an assistant answer to drop")
    if len(messages) == 1:
        raise DataError(f"{where}: the conversation is one assistant answer, with no prompt before it")
    return messages[:-1]


def materialize_dataset(source: str, options: dict[str, Any], out: str | Path, where: str, source_identity: str) -> str:
    """Load `source` (hub name or local path) with `options` (hub, config, split, revision, columns,
    filter, limit, and data_dir when given), map it into the data contract and write it as JSONL at
    `out`, once: a marker file remembers what was written, and the same options and source identity
    reuse it. Returns a
    fingerprint of the written rows' origin (for the stage hash)."""
    import hashlib

    out = Path(out)
    spec = {"source": source, "identity": source_identity, **options}
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    marker = out.with_suffix(".spec.json")
    if out.exists() and marker.exists():
        try:
            if json.loads(marker.read_text()) == json.loads(json.dumps(spec, default=str)):
                return fingerprint
        except json.JSONDecodeError:
            pass
    ds = load_table(source, hub=bool(options.get("hub")), config=options.get("config"), split=options.get("split"),
                    data_dir=options.get("data_dir"),
                    revision=options.get("revision"), where=where)
    row_filter, columns, limit = options.get("filter") or {}, options.get("columns"), options.get("limit")
    local = Path(source) if not options.get("hub") else None
    # Image columns become files beside the written rows; relative paths in them are the source's.
    images = ImageFiles(out.with_name(out.stem + "_images"),
                        (local.parent if local.is_file() else local) if local is not None else None)
    if columns:  # `cases` keys as the recipe keeps them (case_label), once, whoever built the options
        columns = {target: ({**source, "cases": {case_label(k): v for k, v in source["cases"].items()}}
                            if isinstance(source, dict) and source.get("cases") else source)
                   for target, source in columns.items()}

    def rows():
        n = 0
        for index, row in enumerate(ds):
            if limit is not None and n >= limit:
                return
            if row_filter and not _keep(row, row_filter, where):
                continue
            n += 1
            try:
                yield map_row(row, columns, where, images, index)
            except DataError as e:
                raise DataError(f"{e} (source row {index})") from None

    written = write_jsonl(out, rows())
    if written == 0:
        raise DataError(f"{where}: no rows left from {source!r}" + (" after the filter" if row_filter else ""))
    write_json(marker, spec)
    return fingerprint


# --- rows for the training loops: one reading and validation path, one loader per kind of row ------
#
# Every training loop reads rows of one kind: prompts (rl, warp, evaluation), distillation rows
# (distill, distill_cache), conversations (sft), preference pairs (reward_model). Each kind is a
# `read_row` function of (where, row) on the one path `load_rows`, which owns what they all need:
# errors that name the file and line, invalid rows refused or recorded with their reason, rows left
# out on purpose counted, and a file that yields nothing refused with the reason why.

T = TypeVar("T")


@dataclass
class TokenSequence:
    """A tokenised conversation: ids and the loss mask (1 on tokens the student learns to predict);
    with images, `images` is the ImagePrompt (posttrain.images) whose images its image tokens stand for."""

    input_ids: list[int]
    loss_mask: list[int]
    images: Any = None


def load_rows(path: str | Path, read_row: Callable[[str, dict], T | None], expected: str, *,
              left_out_because: str = "", skipped: list[dict] | None = None,
              limit: int | None = None) -> tuple[list[T], int]:
    """The rows of `path` as `read_row(where, row)` makes them, and how many it left out.

    `where` is the row's place (`file:line`). `read_row` raises ChatFormatError or DataError for a
    row that is not of the kind `expected` names, and returns None for a valid row it leaves out on
    purpose (`left_out_because` says why: a prompt over the length limit). An invalid row is an error
    naming its file and line or, with `skipped` given, is recorded there as {where, reason, row} and
    reading goes on: no row disappears without a reason. Reading stops after `limit` rows. A file
    that yields no row is an error naming the file, what was expected, and where the rows went.
    """
    rows: list[T] = []
    left_out = 0
    for where, row in iter_rows(path):
        if limit is not None and len(rows) >= limit:
            break
        try:
            value = read_row(where, row)
        except (ChatFormatError, DataError) as e:
            reason = str(e).removeprefix(f"{where}: ")
            if skipped is None:
                raise DataError(f"{where}: {reason}") from None
            skipped.append({"where": where, "reason": reason, "row": row})
            continue
        if value is None:
            left_out += 1
        else:
            rows.append(value)
    if not rows:
        why = [f"{left_out} {left_out_because}"] if left_out else []
        why += [f"{len(skipped)} invalid, skipped"] if skipped else []
        raise DataError(f"{path}: no {expected}" + (f" ({'; '.join(why)})" if why else ""))
    return rows, left_out


def load_conversations(path: str, skipped: list[dict] | None = None, allow_images: bool = False) -> list[list[dict]]:
    """Conversations to finetune on, from `messages` or `prompt` + `completion` rows, each with at
    least one assistant turn (image parts allowed when `allow_images`: a composite model's data).
    An invalid row is an error naming its file and line, or, with `skipped`, recorded there."""

    def read_conversation(where: str, row: dict) -> list[dict]:
        if "messages" in row:
            messages = row["messages"]
        elif "prompt" in row and "completion" in row:
            messages = prompt_completion_to_messages(row["prompt"], row["completion"])
        else:
            raise ChatFormatError(f"expected a 'messages' list or 'prompt' and 'completion'; the row has {sorted(row)}")
        turns = normalise_messages(text_view(messages) if allow_images and has_image_parts(messages) else messages)
        if not any(t["role"] == "assistant" for t in turns):
            raise ChatFormatError("the conversation has no assistant turn to learn from")
        return messages

    return load_rows(path, read_conversation, "usable training rows", skipped=skipped)[0]


def load_prompts(path: str, tokenizer, max_prompt_tokens: int | None = None,
                 limit: int | None = None, processor=None) -> tuple[list[dict], list[list[int]], int]:
    """Prompt rows for RL-style loops and evaluation: (rows, prompt token ids, number dropped as too long).

    Rows keep every column for the rewards; `prompt` is text or messages, tokenised in the Gemma IT
    format (posttrain.chat). A row without a prompt is an error naming its file and line. Prompts
    longer than `max_prompt_tokens` (None: no limit; an image's soft tokens count) are dropped and
    counted; at most `limit` rows are read. With a composite model's `processor`, a prompt with
    image parts becomes an ImagePrompt (posttrain.images); without one, image parts are an error
    naming the row.
    """

    def read_prompt(where: str, row: dict) -> tuple[dict, list[int]] | None:
        if "prompt" not in row:
            raise DataError(f"expected a 'prompt' (text or messages); the row has {sorted(row)}")
        prompt_ids = _prompt_ids(tokenizer, processor, row["prompt"])
        if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
            return None
        return row, prompt_ids

    read, too_long = load_rows(path, read_prompt, "usable prompt", limit=limit,
                               left_out_because=f"longer than max_prompt_tokens={max_prompt_tokens}")
    if too_long:
        logging.getLogger(__name__).warning("%s: dropped %d prompts longer than max_prompt_tokens=%d", path, too_long,
                                            max_prompt_tokens)
    return [row for row, _ in read], [ids for _, ids in read], too_long


def load_distill_rows(path: str, tokenizer, max_length: int,
                      processor=None) -> tuple[list[list[int]], list[TokenSequence]]:
    """Distillation rows: prompt ids for on-policy sampling, and whole sequences for off-policy batches.

    A row is `prompt` (text or messages), `prompt` + `completion`, or `messages`; every row gives
    its prompt (a conversation's turns up to its last user turn), and a row with a completion (or
    `messages` ending in an assistant turn) also gives its whole sequence, cut to `max_length`
    tokens, with the loss mask on the model's turns. With a composite model's `processor`, rows
    with image parts give ImagePrompts and sequences that carry their images (never cut: a row
    longer than max_length with its images is an error naming it).
    """

    def read_distill_row(where: str, row: dict) -> tuple[list[int], TokenSequence | None]:
        if "messages" in row:
            messages = row["messages"]
            images = processor is not None and has_image_parts(messages)
            turns = normalise_messages(text_view(messages) if images else messages, where="messages")
            if images:  # checked above as text; the turns themselves keep their images (and system turn)
                turns = list(messages)
            last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
            whole = turns if turns[-1]["role"] == "assistant" else None
            return (_prompt_ids(tokenizer, processor, turns[:last_user + 1]),
                    _token_sequence(tokenizer, processor, whole, max_length))
        if "prompt" in row:
            whole = (prompt_completion_to_messages(row["prompt"], row["completion"]) if "completion" in row else None)
            return _prompt_ids(tokenizer, processor, row["prompt"]), _token_sequence(tokenizer, processor, whole,
                                                                                    max_length)
        raise DataError(f"expected 'prompt' (optionally with 'completion') or 'messages'; the row has {sorted(row)}")

    read, _ = load_rows(path, read_distill_row, "prompt or conversation rows")
    return [prompt for prompt, _ in read], [sequence for _, sequence in read if sequence is not None]


def _prompt_ids(tokenizer, processor, prompt: Any) -> list[int]:
    """A generation prompt's ids: an ImagePrompt when it holds images and the model has a processor
    (without one, tokenize_prompt refuses the image parts, naming them)."""
    if processor is not None and isinstance(prompt, (list, tuple)) and has_image_parts(prompt):
        from posttrain.images import tokenize_image_prompt

        return tokenize_image_prompt(processor, prompt)
    return tokenize_prompt(tokenizer, prompt)


def _token_sequence(tokenizer, processor, messages: list[dict] | None, max_length: int) -> TokenSequence | None:
    if messages is None:
        return None
    if processor is not None and has_image_parts(messages):
        from posttrain.chat import tokenize_image_conversation
        from posttrain.images import ImagePrompt

        tc, _ = tokenize_image_conversation(processor, messages)
        if len(tc.input_ids) > max_length:
            raise DataError(f"{len(tc.input_ids)} tokens with its images, over max_length {max_length}; raise "
                            "max_length (rows with images are not cut: a cut could split an image)")
        return TokenSequence(tc.input_ids, tc.loss_mask, ImagePrompt.of_conversation(processor, tc.input_ids, messages))
    tc = tokenize_conversation(tokenizer, messages)
    return TokenSequence(tc.input_ids[:max_length], tc.loss_mask[:max_length])


# --- preference pairs (reward models) ------------------------------------------------------------

@dataclass
class PreferencePairs:
    """A preference file's pairs as token ids, what was done to them, and what was refused."""

    pairs: list[tuple[list[int], list[int]]]  # (chosen ids, rejected ids), whole conversations
    margins: list[float]  # per pair: its `margin` column, 0.0 without one
    truncated: int  # pairs cut to max_length (keeping <bos> and their end)
    skipped: list[dict] = field(default_factory=list)  # {where, reason, row} per refused row (skip mode)


def load_preference_pairs(path: str, tokenizer, max_length: int, skip_invalid: bool = False) -> PreferencePairs:
    """Preference rows (`prompt`, `chosen`, `rejected`, optional `margin`) as token ids, tokenised
    by `posttrain.chat.encode_pair`, the tokenisation reward models are scored in.

    A row without a non-empty `chosen` and `rejected`, whose two sides are not two answers to
    one conversation, or whose conversation is not valid in the chat format, is refused with its
    file and line; with `skip_invalid` it is recorded in `skipped` instead.
    """
    from posttrain.chat import has_gemma_control_tokens

    out = PreferencePairs([], [], 0)
    gemma_format = has_gemma_control_tokens(tokenizer)
    for where, row in iter_rows(path):
        try:
            sides = _encode_preference_row(where, row, tokenizer, gemma_format)
            margin = _preference_margin(where, row)
        except DataError as e:
            if not skip_invalid:
                raise
            out.skipped.append({"where": where, "reason": str(e).removeprefix(f"{where}: "), "row": row})
            continue
        if any(len(ids) > max_length for ids in sides):
            out.truncated += 1
            sides = tuple(ids[:1] + ids[len(ids) - max_length + 1:] if len(ids) > max_length else ids for ids in sides)
        out.pairs.append(sides)
        out.margins.append(margin)
    if not out.pairs:
        skipped = f" ({len(out.skipped)} invalid, skipped)" if out.skipped else ""
        raise DataError(f"{path}: no preference rows{skipped}")
    return out


def _encode_preference_row(where: str, row: dict, tokenizer, gemma_format: bool) -> tuple[list[int], list[int]]:
    """One preference row's two token sequences, whole; DataError naming `where` when it is not a pair."""
    from posttrain.chat import TRANSCRIPT_HINT, ChatFormatError, encode_pair, is_blank, preference_conversations

    for side in ("chosen", "rejected"):
        if side not in row:
            raise DataError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected'; "
                            f"'{side}' is missing (the row has {sorted(row)})")
        if is_blank(row[side]):
            raise DataError(f"{where}: '{side}' is empty; a preference pair needs two non-empty answers")
    prompt, sides = row.get("prompt"), (row["chosen"], row["rejected"])
    if prompt is None and not all(isinstance(side, list) for side in sides):
        raise DataError(f"{where}: 'prompt' is missing; without it, 'chosen' and 'rejected' must be whole "
                        "conversations (lists of {role, content})"
                        + (f"; {TRANSCRIPT_HINT}" if any(isinstance(side, str) for side in sides) else ""))
    if prompt is not None and is_blank(prompt):
        raise DataError(f"{where}: 'prompt' is empty")
    try:
        conversations = preference_conversations(prompt, *sides)
        chosen, rejected = (encode_pair(tokenizer, None, messages, 10**9, gemma_format) for messages in conversations)
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    return chosen, rejected


def _preference_margin(where: str, row: dict) -> float:
    """The row's `margin` (how much better chosen is, e.g. a rating difference; Llama 2's margin
    loss, TRL's `margin` column), 0.0 without one; anything but a finite number (or a number's
    text, as a CSV cell holds it) is refused."""
    margin = row.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, str):
        try:
            margin = float(margin.strip())
        except ValueError:
            pass
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: 'margin' must be a finite number (how much chosen is preferred), got {margin!r}")
    return float(margin)
