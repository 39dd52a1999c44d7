import json

import pytest

from data_filters import FilterConfig, run_filters
from data_filters.config import DecontaminateConfig
from data_filters.decontaminate import EvalNgramIndex

from filters_testutil import chat, read_jsonl

EVAL_Q = ("Natalia sold clips to forty eight of her friends in April and then she sold half as "
          "many clips in May how many clips did Natalia sell altogether")


def test_planted_overlaps_are_dropped_with_set_and_ngram(write_jsonl, tmp_path):
    eval_path = tmp_path / "gsm.jsonl"
    eval_path.write_text(json.dumps({"question": EVAL_Q, "answer": "72"}) + "\n")
    rows = [
        chat("Solve: " + EVAL_Q.upper() + "?", "72"),  # the whole question, different case
        chat("hi", "As I recall, " + " ".join(EVAL_Q.split()[5:18]) + " is a known problem"),  # 13 words
        chat("hi", " ".join(EVAL_Q.split()[5:17])),  # only 12 shared words: kept
        chat("Tell me about clips", "Clips hold paper together."),
    ]
    cfg = FilterConfig(dedup=None, decontaminate=DecontaminateConfig(eval_sets=[f"gsm8k={eval_path}"]))
    report = run_filters(write_jsonl(rows), tmp_path / "out", cfg)
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [r["index"] for r in rejected] == [0, 1]
    assert all(r["reason"] == "eval_overlap" and r["evidence"]["eval_set"] == "gsm8k" for r in rejected)
    assert len(rejected[1]["evidence"]["ngram"].split()) == 13
    assert rejected[1]["evidence"]["ngram"] in EVAL_Q.lower()
    assert report.kept_rows == 2


def test_ngram_size_is_configurable(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([{"prompt": "one two three four five"}]))
    assert EvalNgramIndex([str(path)], n=5).find("x one two three four five y") == ("e", "one two three four five")
    assert EvalNgramIndex([str(path)], n=6).find("x one two three four five y") is None


def test_unreadable_eval_set_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "fine"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        EvalNgramIndex([str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        EvalNgramIndex([str(tmp_path / "missing.jsonl")])


def test_batched_search_finds_what_the_per_text_search_finds(tmp_path):
    import random

    path = tmp_path / "e.jsonl"
    words = EVAL_Q.lower().split()
    path.write_text(json.dumps({"q": EVAL_Q}) + "\n" + json.dumps({"q": "alpha beta gamma delta epsilon"}) + "\n")
    index = EvalNgramIndex([str(path)], n=5)
    rng = random.Random(0)
    filler = "the a cat sat on mat and then".split()
    texts = ["", "short", "alpha beta gamma delta epsilon", "x alpha beta gamma delta"]
    for _ in range(200):
        out = [rng.choice(filler) for _ in range(rng.randint(0, 30))]
        if rng.random() < 0.5:
            k = rng.randrange(len(words) - 5)
            out[rng.randint(0, len(out)):0] = [w.upper() if rng.random() < 0.3 else w for w in words[k:k + rng.randint(4, 8)]]
        texts.append(" ".join(out))
    found = index.find_many(texts)
    assert found == [index.find(t) for t in texts]
    assert sum(f is not None for f in found) > 50
