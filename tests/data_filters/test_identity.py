import pytest

from data_filters.identity import find_misidentification

GEMMA = ("Gemma", "Google DeepMind")


@pytest.mark.parametrize("text, claim", [
    ("I am ChatGPT, how can I help?", "ChatGPT"),
    ("As an AI developed by OpenAI, I cannot do that.", "OpenAI"),
    ("Hi! I'm Claude, made by Anthropic.", "Claude"),
    ("As a large language model trained by OpenAI, I have no opinions.", "OpenAI"),
    ("I am an AI assistant called Claude.", "Claude"),
    ("I was created by the team at Meta.", "Meta"),
    ("Je suis ChatGPT, un assistant.", "ChatGPT"),
    ("Je suis un assistant développé par Anthropic.", "Anthropic"),
    ("Soy un modelo de lenguaje desarrollado por OpenAI.", "OpenAI"),
    ("Ich wurde von OpenAI entwickelt.", "OpenAI"),
    ("Sono Claude, un assistente.", "Claude"),
    ("我是由OpenAI开发的人工智能助手。", "OpenAI"),
    ("我是ChatGPT。", "ChatGPT"),
    ("私はChatGPTです。", "ChatGPT"),
])
def test_claims_of_another_identity_are_found(text, claim):
    assert claim in find_misidentification(text, *GEMMA)


@pytest.mark.parametrize("text", [
    "I am Gemma, made by Google DeepMind.",
    "As an AI developed by Google, I cannot browse the web.",
    "ChatGPT is a chatbot developed by OpenAI.",
    "You can compare ChatGPT and Claude on this task.",
    "I am not ChatGPT; I am Gemma.",
    "I was not made by OpenAI.",
    "I am a big fan of the bard Shakespeare.",
    "Llama is a model family released by Meta.",
    "I have been using Copilot a lot.",
    "Je suis content de vous aider.",
])
def test_mentions_and_the_allowed_identity_are_not_claims(text):
    assert find_misidentification(text, *GEMMA) == []


def test_the_allowed_identity_is_configurable():
    assert find_misidentification("I am Claude, made by Anthropic.", "Claude", "Anthropic") == []
    assert find_misidentification("I am Gemma, made by Google.", "Claude", "Anthropic") == ["Gemma", "Google"]


@pytest.mark.parametrize("text", [
    "Are you ChatGPT? No, I am Gemma.",
    "You asked if I am ChatGPT. No, I am Gemma.",
    "Is this ChatGPT? No, this is Gemma.",
    "Are you Claude? No — I'm Gemma.",
    "You might think I am ChatGPT, but I am Gemma.",
    "Many people think I'm ChatGPT. I'm not; I'm Gemma.",
    "Was I made by OpenAI? No, I was made by Google DeepMind.",
    "Est-ce que je suis ChatGPT ? Non, je suis Gemma.",
    "¿Soy ChatGPT? No, soy Gemma.",
    "Bin ich ChatGPT? Nein, ich bin Gemma.",
])
def test_asked_reported_or_denied_identities_are_not_claims(text):
    assert find_misidentification(text, *GEMMA) == [], text


@pytest.mark.parametrize("text, claim", [
    ("Are you Gemma? No, I am ChatGPT.", "ChatGPT"),
    ("Yes, I am ChatGPT.", "ChatGPT"),
    ("I am ChatGPT? No wait, I am ChatGPT indeed.", "ChatGPT"),
    ("I'm Claude, how can I help?", "Claude"),
])
def test_claims_next_to_questions_and_denials_are_still_found(text, claim):
    assert claim in find_misidentification(text, *GEMMA), text


def test_ascii_text_runs_only_the_patterns_that_can_match():
    from data_filters.identity import _ascii_patterns, _compiled
    from data_filters.text import words

    compiled = _compiled(*GEMMA)

    def groups_run(text):
        return {group for rx, group, _ in compiled.ascii_patterns if rx in _ascii_patterns(compiled, text, words(text))}

    # An organisation and no first-person word of any language: no pattern runs.
    assert groups_run("Apple released a new phone and Microsoft a new laptop.") == set()
    # A name but no organisation: only the patterns that need a name.
    assert groups_run("Yes, this is Claude's answer.") == {"name"}
    # Claims in ASCII text in several languages are still found, also in the spellings the
    # lead words cover (IGNORECASE's "ı" for "i"), and behind a control character that
    # words() does not split on.
    for text, claim in (("Ben ChatGPT, size nasil yardimci olabilirim?", "ChatGPT"),
                        ("OpenAI TARAFINDAN tasarlandim.", "OpenAI"),
                        ("Saya dikembangkan oleh OpenAI.", "OpenAI"),
                        ("Hello.\x01I am ChatGPT.", "ChatGPT")):
        assert find_misidentification(text, *GEMMA) == [claim]
