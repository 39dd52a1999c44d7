from data_filters.config import ToxicityConfig
from data_filters.rows import row_turns
from data_filters.toxicity import ToxicityFilter, ToxicityScorer, score

from filters_testutil import chat


def test_scores_are_one_per_text_in_unit_range():
    scores = score(["Have a nice day.", "You are a worthless idiot and a moron.", ""])
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[1] > 0.9 > scores[0]


def test_benign_technical_text_scores_low():
    texts = ["The process was terminated by the OOM killer.", "Sort the list, then merge.",
             "Photosynthesis converts light into chemical energy."]
    assert max(score(texts)) < 0.5


def test_lexicon_alone_works_without_a_model():
    scorer = ToxicityScorer(ToxicityConfig(classifier="lexicon"))
    assert scorer.score(["you should kill yourself", "kill the process"]) == [1.0, 0.0]


def test_filter_checks_model_turns_by_default_and_user_turns_on_request():
    row = chat("shut the fuck up", "Let us keep this friendly.")
    assert ToxicityFilter(ToxicityConfig())(row, row_turns(row)) is None
    rejection = ToxicityFilter(ToxicityConfig(apply_to_user_turns=True))(row, row_turns(row))
    assert rejection.reason == "lexicon" and rejection.evidence["turn"] == 0


def test_threshold_is_configurable():
    row = chat("hi", "That was a stupid question.")
    s = score(["That was a stupid question."])[0]
    strict = ToxicityFilter(ToxicityConfig(threshold=max(0.0, s - 0.01), use_lexicon=False))
    lax = ToxicityFilter(ToxicityConfig(threshold=min(1.0, s + 0.01), use_lexicon=False))
    assert strict(row, row_turns(row)) is not None
    assert lax(row, row_turns(row)) is None


def _bound_texts():
    import random

    rng = random.Random(0)
    pieces = ["you", "are", "a", "stupid", "idiot", "moron", "shut", "the", "fuck", "up", "nice",
              "day", "kill", "process", "hell", "damn", "crap", "ass", "sort", "list", "dumb"]
    seps = [" ", " ", ", ", "! ", "_", "\x01", "©", "😀", "\u2019", "\x1c", "é"]
    texts = ["", "   ", "Have a nice day.", "You are a worthless idiot and a moron.",
             "idiot©moron", "stupid_idiot", "dumb\x01ass", "Ｓｔｕｐｉｄ idiot", "ИДИОТ idiot"]
    for _ in range(400):
        n = rng.randint(1, 30)
        texts.append("".join(rng.choice(pieces) + rng.choice(seps) for _ in range(n)))
    return texts


def test_score_bound_is_an_upper_bound_of_the_classifier():
    scorer = ToxicityScorer(ToxicityConfig(use_lexicon=False))
    assert scorer.bound is not None  # the shipped model has the structure the bound needs
    texts = _bound_texts()
    scores, bounds = scorer.score(texts), scorer.bound.upper_bounds(texts)
    assert all(b >= s for s, b in zip(scores, bounds))
    assert max(bounds[:3]) < 0.5  # and tight enough to skip benign text
    assert sum(b < 0.9 for b in bounds) > 20


def test_the_bound_only_skips_turns_that_cannot_reach_the_threshold():
    texts = _bound_texts()
    rows = [chat("hi", t) for t in texts]
    items = [(r, row_turns(r)) for r in rows]
    for threshold in (0.3, 0.6, 0.9):
        flt = ToxicityFilter(ToxicityConfig(threshold=threshold))
        with_bound = flt.batch(items)
        flt.scorer.bound = None  # score every turn
        assert flt.batch(items) == with_bound
        assert any(d is not None for d in with_bound)
