"""posttrain.data's row loaders: one reading and validation path (load_rows) under the prompt and
distillation loaders. Real files, the toy tokenizer."""

from __future__ import annotations

import pytest

from posttrain.data import DataError, load_distill_rows, load_prompts, load_rows, write_jsonl


def test_distill_rows_give_every_prompt_and_the_sequences_of_rows_with_completions(toy_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [
        {"prompt": "What is 2 + 2?"},
        {"prompt": "What is 3 + 3?", "completion": "6"},
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "And 1 + 1?"}]},
    ])
    prompts, sequences = load_distill_rows(str(path), toy_tokenizer, max_length=512)
    assert len(prompts) == 4 and len(sequences) == 2
    for sequence in sequences:
        assert len(sequence.input_ids) == len(sequence.loss_mask)
        first_trained = sequence.loss_mask.index(1)
        assert 0 < first_trained and sequence.loss_mask[-2] == 1  # the answer and its end of turn count, the prompt not
    # the prompt of a conversation ending in an assistant turn is its turns up to the last user turn
    assert sequences[1].input_ids[:len(prompts[2])] == prompts[2]
    _, cut = load_distill_rows(str(path), toy_tokenizer, max_length=8)
    assert [len(s.input_ids) for s in cut] == [8, 8]


def test_a_distill_row_without_prompt_or_messages_is_refused_with_its_line(toy_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"prompt": "What is 2 + 2?"}, {"question": "no prompt here"}])
    with pytest.raises(DataError, match=r"rows.jsonl:2: expected 'prompt' \(optionally with 'completion'\) or "
                                        r"'messages'; the row has \['question'\]"):
        load_distill_rows(str(path), toy_tokenizer, max_length=64)


def test_invalid_rows_are_recorded_with_their_reason_when_the_caller_skips_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"x": 1}, {"y": 2}, {"x": 3}])

    def read_x(where, row):
        if "x" not in row:
            raise DataError(f"{where}: expected 'x'")
        return row["x"]

    skipped: list[dict] = []
    rows, left_out = load_rows(path, read_x, "x rows", skipped=skipped)
    assert rows == [1, 3] and left_out == 0
    assert skipped == [{"where": f"{path}:2", "reason": "expected 'x'", "row": {"y": 2}}]
    write_jsonl(path, [{"y": 2}])
    with pytest.raises(DataError, match=r"rows.jsonl: no x rows \(1 invalid, skipped\)"):
        load_rows(path, read_x, "x rows", skipped=[])


def test_prompts_stop_at_the_limit_and_a_file_of_only_overlong_prompts_says_so(toy_tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": f"What is {i} + {i}?"} for i in range(5)])
    rows, ids, dropped = load_prompts(str(path), toy_tokenizer, limit=2)
    assert [r["prompt"] for r in rows] == ["What is 0 + 0?", "What is 1 + 1?"] and len(ids) == 2 and dropped == 0
    with pytest.raises(DataError, match=r"prompts.jsonl: no usable prompt \(5 longer than max_prompt_tokens=3\)"):
        load_prompts(str(path), toy_tokenizer, max_prompt_tokens=3)
