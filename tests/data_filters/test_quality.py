import pytest

from data_filters.chain import parse_line
from data_filters.config import QualityConfig
from data_filters.quality import QualityFilter
from data_filters.rows import row_turns

from filters_testutil import chat


@pytest.mark.parametrize("raw, reason", [
    (b'{"messages": [{"role": "user"}]}', "missing_field"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "wrong_role"),
    (b'{"messages": [{"role": "user", "content": 3}]}', "non_string_content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}]}', "non_string_content"),
    (b'{"messages": [{"role": "user", "content": []}]}', "non_string_content"),
    (b'{"messages": []}', "missing_field"),
    (b'{"text": "no known fields"}', "missing_field"),
    (b'{"prompt": "p", "chosen": "a"}', "missing_field"),
    (b'{"prompt": ["not a message"], "completion": "x"}', "wrong_type"),
    (b'[1, 2]', "wrong_type"),
    (b'{"prompt": "bad \xff", "completion": "x"}', "invalid_utf8"),
    (b'{"prompt": "lone \\ud800 surrogate", "completion": "x"}', "invalid_utf8"),
    (b'{"prompt": ', "invalid_json"),
])
def test_invalid_rows_are_rejected_with_a_reason(raw, reason):
    _, _, rejection = parse_line(raw)
    assert rejection is not None and rejection.filter == "format" and rejection.reason == reason


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}',
    b'{"prompt": "p", "completion": "c"}',
    b'{"prompt": "p", "chosen": "a", "rejected": "b", "score": 3}',
    b'{"prompt": [{"role": "user", "content": "p"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "u"}]}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}]}, {"role": "assistant", "content": "a"}]}',
])
def test_valid_rows_of_every_shape_parse(raw):
    assert parse_line(raw)[2] is None


def check(row, **cfg):
    return QualityFilter(QualityConfig(**cfg))(row, row_turns(row))


def test_empty_model_turn_and_missing_model_turn():
    assert check(chat("hi", "   ")).reason == "empty_model_turn"
    row = {"messages": [{"role": "user", "content": "hi"}]}
    assert check(row).reason == "no_model_turn"
    assert check(row, require_model_turn=False) is None


def test_degenerate_repetition_is_rejected_and_normal_text_is_not():
    assert check(chat("hi", "I am sorry. " * 200)).reason == "repetition"
    lines = "\n".join(["See the table below."] * 8 + ["Row %d has value %d" % (i, i * i) for i in range(4)])
    assert check(chat("hi", lines * 3), min_compression_ratio=None).reason == "duplicate_lines"
    prose = " ".join(f"Step {i}: multiply {i} by {i + 7} to get {i * (i + 7)}, then note it." for i in range(40))
    assert check(chat("hi", prose)) is None


def test_over_long_rows_are_rejected():
    assert check(chat("hi", "x y z " * 100), max_chars=100).reason == "too_long"
    many = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 5}
    assert check(many, max_turns=4).reason == "too_many_turns"


def test_ascii_fast_tokeniser_matches_the_unicode_one():
    # words() lower-cases and splits ASCII text with a bytes table; the result must be the
    # str.translate path's, including for control characters str.split treats as spaces.
    import string

    from data_filters.text import _TO_SPACE, words

    text = string.printable + "\x00\x01\x1c\x1d\x1e\x1f\x7f A_b C-d E'f"
    assert list(words(text)) == text.lower().translate(_TO_SPACE).split()
    assert words("Hello, World! foo_bar\x1cbaz") == ("hello", "world", "foo_bar", "baz")


def test_text_parts_are_turns_and_a_blank_part_beside_text_is_not_an_empty_answer():
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " "}]}]}
    assert [t.text for t in row_turns(row)] == ["hi", "Hello"]
    assert check(row) is None
    blank = {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": [{"type": "text", "text": "  "}]}]}
    assert check(blank).reason == "empty_model_turn"
