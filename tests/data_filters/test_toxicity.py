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
