"""Run the filter chain over JSONL files with a complete audit trail.

    report = run_filters("train.jsonl", "out/", FilterConfig(), num_proc=4)

writes `out/kept.jsonl` (rows kept, redacted where PII was found), `out/rejected.jsonl` (one
line per rejected row: its input index, file and line, the filter, the reason, the evidence
and the original row), `out/data_card.md` and `out/filter_report.json`, and checks that
kept + rejected == input.

Input is streamed: per-row filters run in `num_proc` worker processes on chunks of lines;
the main process sees results in input order and runs the global dedup pass.

Across machines, `filter_shard(rank, world_size)` runs the per-row filters on every
world_size-th chunk and writes dedup keys beside the surviving rows; one `merge_shards`
task then deduplicates globally and writes the same outputs as `run_filters`.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import heapq
import json
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_filters.card import write_data_card
from data_filters.chain import FilterChain, RowResult, pack_results, unpack_results
from data_filters.config import FilterConfig
from data_filters.dedup import Deduplicator, MinHasher
from data_filters.language import primary_language
from data_filters.rows import InvalidRow, Rejection, row_turns

KEPT_FILE = "kept.jsonl"
REJECTED_FILE = "rejected.jsonl"
CARD_FILE = "data_card.md"
REPORT_FILE = "filter_report.json"
EXAMPLES_PER_REASON = 3
# The data card's languages come from a sample: every this-many-th input row (detecting a
# row's language costs about a millisecond, ~2 us a row spread over the sample).
LANGUAGE_SAMPLE_EVERY = 500


@dataclass
class FilterReport:
    """What a filter run did; `to_dict()` is what goes into a stage manifest."""

    input_rows: int = 0
    kept_rows: int = 0
    rejected_rows: int = 0
    redacted_rows: int = 0
    rejected_by: dict[str, dict[str, int]] = field(default_factory=dict)  # filter -> reason -> n
    redactions: dict[str, int] = field(default_factory=dict)  # PII kind -> spans replaced
    image_parts_passed: int = 0  # image parts of kept rows, passed through unread
    kept_path: str = ""
    rejected_path: str = ""
    data_card_path: str = ""
    seconds: float = 0.0
    # Detected language -> rows, over every LANGUAGE_SAMPLE_EVERY-th input row.
    sampled_languages: dict[str, int] = field(default_factory=dict)
    # filter -> language of the rejected turn (from the evidence, where recorded) -> rows
    rejected_by_language: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict, repr=False)  # "filter/reason" -> few

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("examples")
        return d

    def count_rejection(self, rejection: Rejection, raw: str) -> None:
        by = self.rejected_by.setdefault(rejection.filter, {})
        by[rejection.reason] = by.get(rejection.reason, 0) + 1
        self.rejected_rows += 1
        language = rejection.evidence.get("language") if isinstance(rejection.evidence, dict) else None
        if language:
            by_lang = self.rejected_by_language.setdefault(rejection.filter, {})
            by_lang[language] = by_lang.get(language, 0) + 1
        key = f"{rejection.filter}/{rejection.reason}"
        examples = self.examples.setdefault(key, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"row": raw[:2000], "evidence": rejection.evidence})

    def merge(self, other: "FilterReport") -> None:
        self.input_rows += other.input_rows
        self.kept_rows += other.kept_rows
        self.rejected_rows += other.rejected_rows
        self.redacted_rows += other.redacted_rows
        self.image_parts_passed += other.image_parts_passed
        for f, reasons in other.rejected_by.items():
            mine = self.rejected_by.setdefault(f, {})
            for r, n in reasons.items():
                mine[r] = mine.get(r, 0) + n
        for k, n in other.redactions.items():
            self.redactions[k] = self.redactions.get(k, 0) + n
        for key, ex in other.examples.items():
            mine = self.examples.setdefault(key, [])
            mine.extend(ex[:EXAMPLES_PER_REASON - len(mine)])
        for lang, n in other.sampled_languages.items():
            self.sampled_languages[lang] = self.sampled_languages.get(lang, 0) + n
        for f, langs in other.rejected_by_language.items():
            mine = self.rejected_by_language.setdefault(f, {})
            for lang, n in langs.items():
                mine[lang] = mine.get(lang, 0) + n

    def sample_language(self, res: RowResult) -> None:
        """Count the detected language of every LANGUAGE_SAMPLE_EVERY-th row (by input
        index, so the sample is the same however the rows are sharded)."""
        if res.index % LANGUAGE_SAMPLE_EVERY:
            return
        language = "unknown"
        try:
            turns = row_turns(json.loads(res.raw))
        except (ValueError, InvalidRow, TypeError):
            turns = []
        text = " ".join(t.text for t in turns)[:2000]
        if text.strip():
            language = primary_language(text) or "unknown"
        self.sampled_languages[language] = self.sampled_languages.get(language, 0) + 1


def _input_paths(input_path) -> list[Path]:
    paths = [Path(p) for p in ([input_path] if isinstance(input_path, (str, Path)) else input_path)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"filter input {p} does not exist or is not a file; "
                                    "expected a JSONL file (one JSON object per line, .jsonl or .jsonl.gz)")
    return paths


def _read_chunks(paths: list[Path], chunk_size: int) -> Iterator[list[tuple[int, int, str, bytes]]]:
    """Chunks of (index, line number, file, raw line) over all files; blank lines skipped."""
    index, chunk = 0, []
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # an editor's byte-order mark, not row data
                    raw = raw[len(codecs.BOM_UTF8):]
                if not raw.strip():
                    continue
                chunk.append((index, lineno, str(path), raw))
                index += 1
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


_worker_chain: FilterChain | None = None


def _init_worker(config_json: str, minhash_permutations) -> None:
    global _worker_chain
    _worker_chain = FilterChain(FilterConfig.model_validate_json(config_json), minhash_permutations)


def _process_in_worker(lines):
    return pack_results(_worker_chain.process(lines))


def _results(chunks: Iterable, config: FilterConfig, num_proc: int) -> Iterator[RowResult]:
    """Per-row filter results in input order, computed in `num_proc` processes."""
    if num_proc <= 1:
        chain = FilterChain(config)
        for lines in chunks:
            yield from chain.process(lines)
        return
    # A bounded window of chunks in flight keeps memory flat however large the input.
    ctx = get_context("spawn")
    d = config.active("dedup")
    permutations = MinHasher.permutations(d.num_perm, d.seed) if d and d.near else None
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                             initargs=(config.model_dump_json(), permutations)) as pool:
        pending: deque = deque()
        for lines in chunks:
            pending.append((pool.submit(_process_in_worker, lines), lines))
            if len(pending) >= 3 * num_proc:
                future, sent = pending.popleft()
                yield from unpack_results(future.result(), sent)
        while pending:
            future, sent = pending.popleft()
            yield from unpack_results(future.result(), sent)


def _rejected_line(res: RowResult, rejection: Rejection) -> str:
    head = json.dumps({"index": res.index, "source": res.source, "line": res.line,
                       "filter": rejection.filter, "reason": rejection.reason,
                       "evidence": rejection.evidence}, ensure_ascii=False)
    try:  # the original row, embedded as JSON when it parses
        json.loads(res.raw)
        row = res.raw
    except json.JSONDecodeError:
        row = json.dumps(res.raw, ensure_ascii=False)
    return head[:-1] + ', "row": ' + row + "}\n"


def _finish(report: FilterReport, out: Path, config: FilterConfig, started: float) -> FilterReport:
    report.kept_path = str(out / KEPT_FILE)
    report.rejected_path = str(out / REJECTED_FILE)
    report.data_card_path = str(out / CARD_FILE)
    report.seconds = round(time.perf_counter() - started, 3)
    if report.kept_rows + report.rejected_rows != report.input_rows:
        raise AssertionError(f"audit failed: kept {report.kept_rows} + rejected "
                             f"{report.rejected_rows} != input {report.input_rows}")
    write_data_card(report, config, out / CARD_FILE, LANGUAGE_SAMPLE_EVERY)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def run_filters(input_path, output_dir, config: FilterConfig | None = None,
                num_proc: int = 1) -> FilterReport:
    """Filter JSONL file(s) into `output_dir`; returns counts per filter and reason.

    `input_path` is a path or a list of paths (.jsonl or .jsonl.gz). Every input row ends in
    exactly one of kept.jsonl or rejected.jsonl; an invalid row is rejected, never fatal.
    """
    config = config or FilterConfig()
    started = time.perf_counter()
    paths = _input_paths(input_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dedup_cfg = config.active("dedup")
    dedup = Deduplicator(dedup_cfg) if dedup_cfg else None
    report = FilterReport()
    with open(out / KEPT_FILE, "w", encoding="utf-8") as kept_f, \
            open(out / REJECTED_FILE, "w", encoding="utf-8") as rej_f:
        for res in _results(_read_chunks(paths, config.chunk_size), config, num_proc):
            report.sample_language(res)
            _route(res, dedup, report, kept_f, rej_f)
    return _finish(report, out, config, started)


def _route(res: RowResult, dedup: Deduplicator | None, report: FilterReport, kept_f, rej_f) -> None:
    report.input_rows += 1
    rejection = res.rejection
    if rejection is None and dedup is not None:
        rejection = dedup.check(res.index, res.key, res.signature)
    if rejection is not None:
        rej_f.write(_rejected_line(res, rejection))
        report.count_rejection(rejection, res.raw)
        return
    kept_f.write(res.output + "\n")
    report.kept_rows += 1
    report.image_parts_passed += res.image_parts
    if res.changes:
        report.redacted_rows += 1
        for kind, n in res.changes.items():
            report.redactions[kind] = report.redactions.get(kind, 0) + n


# ---------------------------------------------------------------------------------------
# many machines: per-row filters per shard, then one global dedup task


def shard_dir(output_dir, rank: int) -> Path:
    return Path(output_dir) / "shards" / f"{rank:05d}"


def filter_shard(input_path, output_dir, config: FilterConfig | None, rank: int,
                 world_size: int, num_proc: int = 1) -> FilterReport:
    """Per-row filters on the chunks `c` with `c % world_size == rank`.

    Writes `shards/{rank}/candidates.jsonl` (surviving rows with their dedup keys),
    `rejected.jsonl` and `report.json` under `output_dir`. Every rank must read the same
    input files in the same order and use the same config.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    config = config or FilterConfig()
    paths = _input_paths(input_path)
    out = shard_dir(output_dir, rank)
    out.mkdir(parents=True, exist_ok=True)
    mine = (c for i, c in enumerate(_read_chunks(paths, config.chunk_size)) if i % world_size == rank)
    report = FilterReport()
    with open(out / "candidates.jsonl", "w", encoding="utf-8") as cand_f, \
            open(out / REJECTED_FILE, "w", encoding="utf-8") as rej_f:
        for res in _results(mine, config, num_proc):
            report.sample_language(res)
            report.input_rows += 1
            if res.rejection is not None:
                rej_f.write(_rejected_line(res, res.rejection))
                report.count_rejection(res.rejection, res.raw)
                continue
            sig = None if res.signature is None else base64.b64encode(res.signature.tobytes()).decode()
            meta = {"index": res.index, "source": res.source, "line": res.line, "key": res.key,
                    "signature": sig, "changes": res.changes, "image_parts": res.image_parts}
            cand_f.write(json.dumps(meta)[:-1] + ', "raw": ' + json.dumps(res.raw, ensure_ascii=False)
                         + ', "output": ' + res.output + "}\n")
    state = report.to_dict() | {"examples": report.examples}
    (out / "report.json").write_text(json.dumps(state))
    return report


def _read_candidates(path: Path) -> Iterator[RowResult]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            sig = None if d["signature"] is None else np.frombuffer(
                base64.b64decode(d["signature"]), dtype=np.uint32)
            yield RowResult(d["index"], d["line"], d["source"], d["raw"], None,
                            json.dumps(d["output"], ensure_ascii=False), d["changes"], d["key"], sig,
                            d.get("image_parts", 0))


def merge_shards(output_dir, config: FilterConfig | None, world_size: int) -> FilterReport:
    """The global dedup step: merge the shards' survivors in input order, keep the first of
    each duplicate group, and write kept.jsonl, rejected.jsonl, the data card and report."""
    config = config or FilterConfig()
    started = time.perf_counter()
    out = Path(output_dir)
    dirs = [shard_dir(out, r) for r in range(world_size)]
    missing = [str(d) for d in dirs if not (d / "report.json").is_file()]
    if missing:
        raise FileNotFoundError(f"shard output missing (did every rank finish?): {missing}")
    report = FilterReport()
    for d in dirs:
        state = json.loads((d / "report.json").read_text())
        shard = FilterReport(**{k: v for k, v in state.items() if k in FilterReport.__dataclass_fields__})
        shard.kept_rows = 0  # kept is decided here, after dedup
        shard.input_rows = shard.rejected_rows
        report.merge(shard)
    dedup_cfg = config.active("dedup")
    dedup = Deduplicator(dedup_cfg) if dedup_cfg else None
    with open(out / KEPT_FILE, "w", encoding="utf-8") as kept_f, \
            open(out / REJECTED_FILE, "w", encoding="utf-8") as rej_f:
        for d in dirs:
            with open(d / REJECTED_FILE, encoding="utf-8") as f:
                for line in f:
                    rej_f.write(line)
        streams = [_read_candidates(d / "candidates.jsonl") for d in dirs]
        for res in heapq.merge(*streams, key=lambda r: r.index):
            _route(res, dedup, report, kept_f, rej_f)
    return _finish(report, out, config, started)
