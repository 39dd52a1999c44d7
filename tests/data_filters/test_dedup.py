import random

import pytest

from data_filters import FilterConfig, run_filters
from data_filters.config import DedupConfig
from data_filters.dedup import Deduplicator, MinHasher, dedup_text
from data_filters.rows import row_turns

from filters_testutil import chat, read_jsonl

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega river mountain cloud stone forest ocean").split()


def essay(rng, n=120):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def only_dedup(**kw):
    return FilterConfig(quality=None, pii=None, toxicity=None, identity=None, decontaminate=None,
                        dedup=DedupConfig(**kw))


def test_planted_exact_and_near_duplicates_are_found_without_false_merges(write_jsonl, tmp_path):
    rng = random.Random(0)
    originals = [chat(f"Question {i}: {essay(rng, 30)}", essay(rng)) for i in range(200)]
    rows, planted = list(originals), {}
    for i in range(0, 200, 10):  # exact copy with different case and spacing
        q = originals[i]["messages"][0]["content"].upper().replace(" ", "  ")
        planted[len(rows)] = ("exact_duplicate", i)
        rows.append(chat(q, originals[i]["messages"][1]["content"]))
    for i in range(5, 200, 10):  # near copy: one word changed in the answer (Jaccard ~0.93)
        words = originals[i]["messages"][1]["content"].split()
        words[60] = "CHANGED"
        planted[len(rows)] = ("near_duplicate", i)
        rows.append(chat(originals[i]["messages"][0]["content"], " ".join(words)))
    report = run_filters(write_jsonl(rows), tmp_path / "out", only_dedup())
    rejected = {r["index"]: r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert set(rejected) == set(planted)  # every planted copy found, no original merged
    for index, (reason, original) in planted.items():
        assert rejected[index]["reason"] == reason
        assert rejected[index]["evidence"]["duplicate_of"] == original
    assert report.kept_rows == 200


def test_prompt_only_dedup_compares_prompts():
    a, b = chat("same prompt here", "answer one"), chat("same prompt here", "a different answer")
    for prompt_only, expected in ((False, None), (True, "exact_duplicate")):
        d = Deduplicator(DedupConfig(near=False, prompt_only=prompt_only))
        from data_filters.dedup import exact_key
        keys = [exact_key(dedup_text(row_turns(r), prompt_only)) for r in (a, b)]
        assert d.check(0, keys[0], None) is None
        got = d.check(1, keys[1], None)
        assert (got.reason if got else None) == expected


def test_minhash_similarity_tracks_jaccard():
    rng = random.Random(1)
    row = row_turns(chat("q", essay(rng, 300)))
    h = MinHasher(num_perm=128)
    same, other = h.signature(row), h.signature(row_turns(chat("q", essay(rng, 300))))
    assert (h.signature(row) == same).all()
    assert (same == other).mean() < 0.2


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_threshold_is_configurable(threshold):
    rng = random.Random(2)
    base = essay(rng, 200).split()
    half = base[:170] + essay(rng, 30).split()  # Jaccard of shingle sets about 0.73
    h = MinHasher()
    d = Deduplicator(DedupConfig(exact=False, threshold=threshold))
    assert d.check(0, None, h.signature(row_turns(chat("q", " ".join(base))))) is None
    got = d.check(1, None, h.signature(row_turns(chat("q", " ".join(half)))))
    assert (got is not None) == (threshold == 0.5)


def test_batched_signatures_equal_datasketch_minhash():
    # MinHasher applies datasketch's affine32 permutations itself, for many rows at once;
    # the signatures must be the ones datasketch's MinHash computes from the same shingles.
    from datasketch import MinHash

    from data_filters.dedup import shingle_hashes
    from data_filters.rows import Turn

    rng = random.Random(3)
    rows = [row_turns(chat(essay(rng, rng.randint(1, 40)), essay(rng, rng.randint(0, 200))))
            for _ in range(60)]
    rows += [[Turn("assistant", "only an answer", ("completion",))],  # no prompt turns
             [Turn("user", "", ("prompt",))], [Turn("user", "two words", ("prompt",))]]
    for ngram in (1, 5, 13):
        for prompt_only in (False, True):
            h = MinHasher(num_perm=64, seed=7, ngram=ngram)
            batch = h.signatures(rows, prompt_only)
            for turns, got in zip(rows, batch):
                m = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=lambda v: v)
                m.update_batch(shingle_hashes(turns, ngram, prompt_only))
                assert (got == m.hashvalues).all()
