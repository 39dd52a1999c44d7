"""The Gemma IT format: exact ids and masks, system folding, control-token safety."""

import pytest

from posttrain.chat import (BOS, END_OF_TURN, START_OF_TURN, ChatFormatError, normalise_messages,
                            prompt_completion_to_messages, render_text, tokenize_conversation, tokenize_prompt)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def ctl(tok, t):
    return tok.convert_tokens_to_ids(t)


def test_single_turn_ids_and_mask_are_exact(toy_tokenizer):
    tok = toy_tokenizer
    tc = tokenize_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    user_body = ids_of(tok, "user\nHi")
    model_head = ids_of(tok, "model\n")
    model_body = ids_of(tok, "model\nHello.")
    nl = ids_of(tok, "\n")
    expected = ([ctl(tok, BOS), ctl(tok, START_OF_TURN)] + user_body + [ctl(tok, END_OF_TURN)] + nl
                + [ctl(tok, START_OF_TURN)] + model_body + [ctl(tok, END_OF_TURN)] + nl)
    assert tc.input_ids == expected
    n_answer = len(model_body) - len(model_head)
    expected_mask = ([0, 0] + [0] * len(user_body) + [0] + [0] * len(nl) + [0] + [0] * len(model_head)
                     + [1] * n_answer + [1] + [0] * len(nl))
    assert tc.loss_mask == expected_mask
    assert tc.input_ids[0] == tok.bos_token_id


def test_mask_covers_model_turns_and_their_end_of_turn_only(toy_tokenizer):
    tok = toy_tokenizer
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
    tc = tokenize_conversation(tok, msgs)
    trained = [i for i, m in zip(tc.input_ids, tc.loss_mask) if m]
    eot = ctl(tok, END_OF_TURN)
    assert trained == ids_of(tok, "5") + [eot] + ids_of(tok, "8") + [eot]
    # every <end_of_turn> of a user turn is masked out
    user_eots = [m for i, m in zip(tc.input_ids, tc.loss_mask) if i == eot]
    assert user_eots == [0, 1, 0, 1]


def test_matches_the_shipped_chat_template(toy_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A tiny model."}]
    ref = toy_tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    tc = tokenize_conversation(toy_tokenizer, msgs)
    assert tc.input_ids == ref["input_ids"]
    assert tc.loss_mask == ref["assistant_masks"]


def test_system_prompt_is_folded_into_first_user_turn():
    text = render_text([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == f"{BOS}{START_OF_TURN}user\nS\n\nU{END_OF_TURN}\n"


def test_generation_prompt_ends_with_model_header(toy_tokenizer):
    tok = toy_tokenizer
    ids = tokenize_prompt(tok, "Hi")
    assert ids[-1 - len(ids_of(tok, "model\n")):] == [ctl(tok, START_OF_TURN)] + ids_of(tok, "model\n")
    assert ids == toy_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=True)["input_ids"]


def test_bos_text_and_control_strings_in_content_never_become_control_tokens(toy_tokenizer):
    tok = toy_tokenizer
    tc = tokenize_conversation(tok, [{"role": "user", "content": "[BOS] <bos> <end_of_turn> <start_of_turn>"},
                                     {"role": "assistant", "content": "ok"}])
    assert tc.input_ids.count(tok.bos_token_id) == 1 and tc.input_ids[0] == tok.bos_token_id
    assert tc.input_ids.count(ctl(tok, END_OF_TURN)) == 2
    assert tc.input_ids.count(ctl(tok, START_OF_TURN)) == 2


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "content"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "assistant", "content": "x"}], "first non-system turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
    ([{"role": "system", "content": "s"}], "no user or assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
])
def test_invalid_conversations_are_refused_with_the_reason(messages, fragment):
    with pytest.raises(ChatFormatError, match=fragment):
        normalise_messages(messages)


USER = {"role": "user", "content": "What is 2 + 2?"}
ANSWER = {"role": "assistant", "content": "4"}


@pytest.mark.parametrize("prompt, completion, expected", [
    ("What is 2 + 2?", "4", [USER, ANSWER]),
    ("What is 2 + 2?", ANSWER, [USER, ANSWER]),
    ([USER], [ANSWER, {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}],
     [USER, ANSWER, {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}]),
    # HuggingFaceH4/ultrafeedback_binarized: the prompt as text, `chosen` the whole conversation.
    ("What is 2 + 2?\n", [USER, ANSWER], [USER, ANSWER]),
    ([{"role": "system", "content": "Be brief."}, USER], [{"role": "system", "content": "Be brief."}, USER, ANSWER],
     [{"role": "system", "content": "Be brief."}, USER, ANSWER]),
])
def test_a_completion_that_repeats_its_prompt_is_the_whole_conversation(prompt, completion, expected):
    assert prompt_completion_to_messages(prompt, completion) == expected


@pytest.mark.parametrize("completion", [
    [{"role": "user", "content": "Something else"}, ANSWER],   # another prompt: which one is meant?
    [USER],                                                    # the prompt and no answer
])
def test_a_completion_opening_with_another_users_turn_is_refused(completion):
    with pytest.raises(ChatFormatError, match="opening turns are not the prompt's"):
        prompt_completion_to_messages("What is 2 + 2?", completion)


def parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


def test_content_given_as_text_parts_renders_as_the_joined_text(toy_tokenizer):
    # The shape transformers' chat templates and OpenAI-style datasets use; the templates
    # render the text parts back to back.
    as_parts = [{"role": "user", "content": parts("What is ", "2 + 2?")}, {"role": "assistant", "content": parts("4")}]
    as_text = [USER, ANSWER]
    assert normalise_messages(as_parts) == as_text
    assert tokenize_conversation(toy_tokenizer, as_parts).input_ids == tokenize_conversation(toy_tokenizer, as_text).input_ids
    # The H4 shape with parts: the repeated prompt is recognised whatever shape its content takes.
    assert prompt_completion_to_messages("What is 2 + 2?", as_parts) == as_parts


@pytest.mark.parametrize("content, fragment", [
    ([{"type": "image", "url": "cat.png"}, {"type": "text", "text": "What is this?"}], r"content\[0\]: .*'image' part; .*text-only"),
    ([{"type": "text", "text": 3}], r"content\[0\]: expected a text part"),
    (["plain string in a list"], r"content\[0\]: expected a text part"),
    ([], "content: expected a string or a list of text parts"),
    (None, "content: expected a string or a list of text parts"),
])
def test_content_that_is_not_text_is_refused_with_the_part(content, fragment):
    with pytest.raises(ChatFormatError, match=rf"messages\[0\]\.{fragment}"):
        normalise_messages([{"role": "user", "content": content}])


@pytest.mark.parametrize("prompt, completion, fragment", [
    (float("nan"), "4", "prompt: expected text or a list"),
    (7, "4", "prompt: expected text or a list"),
    ("What is 2 + 2?", 4, "completion: expected text, one message or a list"),
    ("What is 2 + 2?", None, "completion: expected text, one message or a list"),
])
def test_a_prompt_or_completion_of_another_type_is_refused_not_crashed_on(prompt, completion, fragment):
    with pytest.raises(ChatFormatError, match=fragment):
        prompt_completion_to_messages(prompt, completion)


def test_a_generation_prompt_of_another_type_is_refused(toy_tokenizer):
    with pytest.raises(ChatFormatError, match="row 3 prompt: expected text"):
        tokenize_prompt(toy_tokenizer, 12, where="row 3 prompt")


@pytest.mark.parametrize("prompt", ["", "  \n", [{"role": "user", "content": ""}],
                                    [{"role": "system", "content": " "}, {"role": "user", "content": [{"type": "text", "text": " "}]}]])
def test_a_blank_generation_prompt_is_refused(toy_tokenizer, prompt):
    # An unmapped or empty prompt column: RL and distillation would sample answers to nothing.
    with pytest.raises(ChatFormatError, match="row 3 prompt: empty; a generation prompt needs text"):
        tokenize_prompt(toy_tokenizer, prompt, where="row 3 prompt")
