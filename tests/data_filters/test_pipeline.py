import json

import pytest

from data_filters import FilterConfig, filter_shard, load_filter_config, merge_shards, run_filters
from data_filters.config import PiiConfig

from filters_testutil import chat, read_jsonl

MIXED = [
    chat("My email is ana@example.org", "Noted, thanks."),  # redacted, kept
    chat("Who are you?", "I am ChatGPT, made by OpenAI."),  # identity
    chat("hi", "shut the fuck up"),  # toxicity
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n',
    b"not json\n",
    b"\n",  # blank: not a row
    {"prompt": "2+2?", "completion": "4"},
    {"prompt": "2+2?", "completion": "4"},  # exact duplicate
    {"prompt": "p", "chosen": "good", "rejected": "bad"},
    chat("hi", "   "),  # empty model turn
    b'{"prompt": "bad \xff utf8", "completion": "x"}\n',
    chat("loop", "again and again " * 100),  # repetition
]


def test_every_row_is_kept_or_rejected_exactly_once(write_jsonl, tmp_path):
    report = run_filters(write_jsonl(MIXED), tmp_path / "out")
    kept = read_jsonl(tmp_path / "out" / "kept.jsonl")
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert report.input_rows == 11 == len(kept) + len(rejected)
    assert report.kept_rows == len(kept) == 3 and report.rejected_rows == len(rejected) == 8
    assert sorted(r["index"] for r in rejected) == [1, 2, 3, 4, 6, 8, 9, 10]
    reasons = {r["index"]: (r["filter"], r["reason"]) for r in rejected}
    assert reasons == {1: ("identity", "misidentification"), 2: ("toxicity", "lexicon"),
                       3: ("format", "wrong_role"), 4: ("format", "invalid_json"),
                       6: ("dedup", "exact_duplicate"), 8: ("quality", "empty_model_turn"),
                       9: ("format", "invalid_utf8"), 10: ("quality", "repetition")}
    assert kept[0]["messages"][0]["content"] == "My email is <EMAIL>"
    assert rejected[0]["row"] == MIXED[1]  # the original row travels with its rejection
    assert rejected[3]["row"] == "not json" and rejected[3]["line"] == 5
    assert report.rejected_by["format"] == {"wrong_role": 1, "invalid_json": 1, "invalid_utf8": 1}
    assert report.redactions == {"email": 1} and report.redacted_rows == 1
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "| identity | misidentification | 1 |" in card and "ana@example.org" not in card
    assert json.loads((tmp_path / "out" / "filter_report.json").read_text())["kept_rows"] == 3


def test_pii_drop_mode_rejects_with_the_span(write_jsonl, tmp_path):
    cfg = FilterConfig(pii=PiiConfig(mode="drop"))
    run_filters(write_jsonl([chat("call +1 415 555 2671", "ok")]), tmp_path / "out", cfg)
    [rej] = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rej["filter"] == "pii" and rej["reason"] == "phone"
    assert rej["evidence"][0]["text"] == "+1 415 555 2671"


def test_parallel_and_sharded_runs_match_the_serial_run(write_jsonl, tmp_path):
    rows = [chat(f"question {i % 50}", f"answer number {i % 50} is here") for i in range(120)] + MIXED
    path = write_jsonl(rows)
    cfg = FilterConfig(chunk_size=16)
    serial = run_filters(path, tmp_path / "serial", cfg)
    parallel = run_filters(path, tmp_path / "parallel", cfg, num_proc=2)
    for r in range(3):
        filter_shard(path, tmp_path / "sharded", cfg, rank=r, world_size=3)
    sharded = merge_shards(tmp_path / "sharded", cfg, world_size=3)
    for other in (parallel, sharded):
        assert other.rejected_by == serial.rejected_by and other.kept_rows == serial.kept_rows
    want = (tmp_path / "serial" / "kept.jsonl").read_text()
    assert (tmp_path / "parallel" / "kept.jsonl").read_text() == want
    assert (tmp_path / "sharded" / "kept.jsonl").read_text() == want
    sharded_rej = sorted(r["index"] for r in read_jsonl(tmp_path / "sharded" / "rejected.jsonl"))
    assert sharded_rej == [r["index"] for r in read_jsonl(tmp_path / "serial" / "rejected.jsonl")]


def test_disabled_filters_do_nothing(write_jsonl, tmp_path):
    cfg = load_filter_config({"pii": None, "toxicity": {"enabled": False}, "identity": None,
                              "dedup": None, "quality": None})
    report = run_filters(write_jsonl([chat("a@b.org", "fuck off"), chat("a@b.org", "fuck off")]),
                         tmp_path / "out", cfg)
    assert report.kept_rows == 2


def test_bad_config_names_the_key_and_what_was_expected():
    with pytest.raises(ValueError, match=r"recipe.yaml: pii.mode") as e:
        load_filter_config({"pii": {"mode": "erase"}}, "recipe.yaml")
    assert "redact" in str(e.value)
    with pytest.raises(ValueError, match=r"dedup.treshold"):
        load_filter_config({"dedup": {"treshold": 0.8}})
    with pytest.raises(ValueError, match=r"unknown PII kind"):
        load_filter_config({"pii": {"kinds": ["passport"]}})


def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run_filters(tmp_path / "nope.jsonl", tmp_path / "out")


def test_a_byte_order_mark_before_the_first_row_does_not_cost_that_row(tmp_path):
    # Windows editors and spreadsheet exports start UTF-8 files with one; it is not row data.
    path = tmp_path / "exported.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "2+2?", "completion": "4"}).encode() + b"\n"
                     + json.dumps({"prompt": "3+3?", "completion": "6"}).encode() + b"\n")
    report = run_filters(path, tmp_path / "out")
    assert report.kept_rows == 2 and report.rejected_rows == 0
    assert read_jsonl(tmp_path / "out" / "kept.jsonl")[0] == {"prompt": "2+2?", "completion": "4"}


def test_image_parts_are_counted_however_the_line_spells_them(write_jsonl, tmp_path):
    image = {"type": "image", "path": "a.png"}
    rows = [
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": "A cat."}]},
        # The same part with its type written as a JSON escape: no "image" in the line.
        b'{"messages": [{"role": "user", "content": [{"type": "\\u0069mage", "path": "b.png"}, '
        b'{"type": "text", "text": "And this?"}]}, {"role": "assistant", "content": "A dog."}]}\n',
        chat("Describe an image of a cat.", "No image parts here."),
    ]
    report = run_filters(write_jsonl(rows), tmp_path / "out", FilterConfig(toxicity=None, dedup=None))
    assert report.kept_rows == 3 and report.image_parts_passed == 2
