"""The filters on languages other than English: toxicity word lists guarded by the detected
language, self-identification claims and negations, national phone formats."""

import json
import re

import pytest

from data_filters import load_filter_config, run_filters
from data_filters.config import PiiConfig, ToxicityConfig
from data_filters.identity import find_misidentification
from data_filters.language import detect_languages, related_languages
from data_filters.pii import PiiFilter, find_pii
from data_filters.rows import row_turns
from data_filters.toxicity import ToxicityFilter
from data_filters.word_lists import glin_profanity_terms, language_terms, parse_terms

from filters_testutil import chat

# ---------------------------------------------------------------------------------------
# language detection

def test_language_detection_is_deterministic_and_names_chinese_by_language():
    text = "Ich hätte gern einen Kaffee mit Milch und ein Stück Kuchen."
    assert detect_languages(text) == detect_languages.__wrapped__(text)
    assert detect_languages(text)[0][0] == "de"
    assert detect_languages("我想要一杯加牛奶的咖啡，谢谢。")[0][0] == "zh"
    assert detect_languages("12345 !!!") == ()


def test_related_languages_group_what_langdetect_confuses():
    assert {"es", "pt", "ca"} <= related_languages("es")
    assert "bg" in related_languages("ru")
    assert related_languages("ko") == {"ko"}


# ---------------------------------------------------------------------------------------
# toxicity

TOXIC = {
    "es": "Eres un imbécil inútil, ojalá te mueras, hijo de puta.",
    "fr": "Ferme ta gueule, espèce de connard.",
    "de": "Halt die Fresse, du Vollidiot.",
    "it": "Vaffanculo, stronzo, non capisci niente.",
    "pt": "Vai se foder, filho da puta.",
    "ru": "Ты тупой идиот, сдохни.",
    "zh": "你这个白痴，去死吧！",
    "ja": "お前はバカ野郎だ、死ね。",
    "ko": "닥쳐, 이 병신아.",
    "ar": "أنت غبي وحقير، اخرس.",
    "hi": "तू बेवकूफ है, मर जा।",
    "tr": "Kapa çeneni, salak.",
}
CLEAN = {
    "es": "Quiero un café con leche y una tostada, por favor.",
    "fr": "La veuve a hérité de la maison familiale près de Lyon.",
    "de": "Das Gift der Schlange ist für Menschen gefährlich.",
    "it": "Il pesce alla griglia era ottimo e la regina ha applaudito.",
    "pt": "A cerveja artesanal de Minas é famosa; vamos comer feijoada.",
    "ru": "Хрен — острая приправа к мясу, её подают к холодцу.",
    "zh": "性教育是学校课程的一部分。",
    "ja": "その女王様のドレスは美しかった。",
    "ko": "그는 시험 전날 미친 듯이 공부했다.",
    "ar": "الشعر العربي غني بالصور البلاغية.",
    "hi": "दादी हर रविवार को पराठे बनाती हैं।",
    "tr": "Bu durum için destek ekibine yazın.",
}


@pytest.fixture(scope="module")
def toxicity_filter():
    return ToxicityFilter(ToxicityConfig())


def verdict(toxicity: ToxicityFilter, answer: str, prompt: str = "Hi"):
    """What the filter says of a one-turn conversation ending in `answer`: None (kept) or the rejection."""
    row = chat(prompt, answer)
    return toxicity(row, row_turns(row))


@pytest.mark.parametrize("language", sorted(TOXIC))
def test_toxic_answer_is_rejected_with_its_language_as_evidence(toxicity_filter, language):
    rejection = verdict(toxicity_filter, TOXIC[language], prompt="Hello")
    assert rejection is not None and rejection.reason == "lexicon"
    assert rejection.evidence["lexicon_language"] == language
    assert rejection.evidence["language"] in related_languages(language)


@pytest.mark.parametrize("language", sorted(CLEAN))
def test_clean_answer_with_listed_everyday_words_is_kept(toxicity_filter, language):
    assert verdict(toxicity_filter, CLEAN[language], prompt="Hello") is None


# Ordinary Turkish that the packaged Turkish list used to reject, one sentence per kind of
# entry left out (toxicity_lexicon_neutral.txt): body and medicine, food and objects, family
# words alone, everyday verbs, text without Turkish letters, religion and news.
TURKISH_EVERYDAY = (
    "Göğüs ağrısı olursa hemen doktora gidin.",
    "Kahvaltıda kaşar peyniri ve zeytin yedik.",
    "Anneni ara, seni çok merak ediyor.",
    "Bahçeye iki ağaç diktim, biri hemen büyüdü.",
    "Bu film cok sikici, baska bir sey izleyelim.",
    "Trafikte sikismis kaldik, biraz gecikecegiz.",
    "Müslüman, Hristiyan ve Yahudi din adamları bir araya geldi.",
    "Mal ve hizmet alımlarında KDV uygulanır.",
)


def test_everyday_turkish_is_kept_and_turkish_insults_still_rejected(toxicity_filter):
    kept = [text for text in TURKISH_EVERYDAY if verdict(toxicity_filter, text) is None]
    assert kept == list(TURKISH_EVERYDAY)
    for text, term in (("Amına koyayım, defol.", "amına koyayım"), ("Siktir git, şerefsiz.", "siktir git"),
                       ("Sen tam bir aptalsın, geber!", "geber")):
        assert verdict(toxicity_filter, text).evidence["lexicon_term"] == term


def test_word_offensive_in_one_language_does_not_reject_its_harmless_use_in_another(toxicity_filter):
    # French "con" is an insult; Spanish and Italian "con" mean "with".
    for text in ("Quiero un café con leche y una tostada, por favor.",
                 "Con questa funzione puoi ordinare la lista in pochi passi."):
        assert verdict(toxicity_filter, text) is None
    insult = "Franchement, tu es vraiment un con, et tout le monde au bureau le sait bien."
    assert verdict(toxicity_filter, insult).evidence["lexicon_term"] == "con"
    # English "kys" is a threat; Danish "kys" is a kiss.
    assert verdict(toxicity_filter, "Jeg giver dig et kys på kinden.") is None
    assert verdict(toxicity_filter, "just kys already").evidence["lexicon_term"] == "kys"


def test_multilingual_lists_can_be_switched_off_or_restricted():
    assert verdict(ToxicityFilter(ToxicityConfig(multilingual=False)), TOXIC["es"]) is None
    assert verdict(ToxicityFilter(ToxicityConfig(languages=["de"])), TOXIC["es"]) is None
    assert verdict(ToxicityFilter(ToxicityConfig(languages=["es"])), TOXIC["es"]) is not None


def test_unknown_language_code_is_refused_naming_the_key_and_the_supported_codes(tmp_path):
    for codes, hint in ((["de", "xx"], r"\['xx'\]"), (["DE"], r"\['DE'\].*lower-case"),
                        (["en"], "English has no per-language list")):
        with pytest.raises(ValueError, match=r"toxicity\.languages: .*ar cs da de .* tr zh") as refused:
            load_filter_config({"toxicity": {"languages": codes}})
        assert re.search(hint, str(refused.value))
    # A language the user's own lexicon has a section for is a language with a list.
    extra = tmp_path / "extra.txt"
    extra.write_text("[sw]\nmjinga\n", encoding="utf-8")
    config = load_filter_config({"toxicity": {"lexicon_path": str(extra), "languages": ["sw", "es"]}})
    assert config.toxicity.languages == ["sw", "es"]
    with pytest.raises(ValueError, match=r"toxicity\.languages: .*\['sw'\]"):
        load_filter_config({"toxicity": {"languages": ["sw"]}})


def test_language_thresholds_apply_to_the_classifier_per_detected_language():
    text = "Du bist so ein dummer Idiot, wirklich dumm und blöd."
    base = ToxicityConfig(use_lexicon=False, threshold=0.01)
    assert verdict(ToxicityFilter(base), text) is not None
    strict = base.model_copy(update={"language_thresholds": {"de": 1.0}})
    assert verdict(ToxicityFilter(strict), text) is None
    with pytest.raises(ValueError, match="thresholds must lie in"):
        load_filter_config({"toxicity": {"language_thresholds": {"de": 1.5}}})


def test_user_lexicon_sections_are_language_specific(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("# mine\nblorf\n[es]\nzorrupio\n", encoding="utf-8")
    f = ToxicityFilter(ToxicityConfig(lexicon_path=str(extra)))
    assert verdict(f, "Eres un zorrupio y todos lo saben en el pueblo.").evidence["lexicon_term"] == "zorrupio"
    assert verdict(f, "You are a zorrupio and everybody in the village knows it.") is None
    assert verdict(f, "What a blorf.").evidence["lexicon_term"] == "blorf"


def test_malformed_section_header_names_the_line():
    with pytest.raises(ValueError, match="line 2.*section header"):
        parse_terms("ok\n[spanish words]\n", where="my.txt")


def test_package_lists_are_read_and_everyday_words_left_out():
    languages = {t.language for t in glin_profanity_terms()}
    assert {"es", "fr", "de", "it", "pt", "ru", "zh", "ja", "ko", "ar", "tr"} <= languages
    kept = {(t.language, t.text) for t in language_terms()}
    assert ("pt", "cerveja") not in kept and ("it", "pesce") not in kept
    assert ("de", "arschloch") in kept


# ---------------------------------------------------------------------------------------
# self-identification

CLAIMS = {
    "en": "I am ChatGPT, a language model developed by OpenAI.",
    "zh": "我是ChatGPT，由OpenAI开发的语言模型。",
    "hi": "मैं ChatGPT हूँ, जिसे OpenAI ने बनाया है।",
    "es": "Soy ChatGPT, un modelo de lenguaje creado por OpenAI.",
    "fr": "Je suis ChatGPT, un modèle de langage développé par OpenAI.",
    "ar": "أنا ChatGPT، تم تطويري من قبل OpenAI.",
    "bn": "আমি ChatGPT, OpenAI দ্বারা তৈরি।",
    "pt": "Sou o ChatGPT, um modelo de linguagem criado pela OpenAI.",
    "ru": "Я ChatGPT, языковая модель, созданная OpenAI.",
    "ur": "میں ChatGPT ہوں، جسے OpenAI نے بنایا ہے۔",
    "id": "Saya adalah ChatGPT, dikembangkan oleh OpenAI.",
    "de": "Ich bin ChatGPT, ein Sprachmodell von OpenAI.",
    "ja": "私はChatGPTです。OpenAIによって開発されました。",
    "tr": "Ben ChatGPT, OpenAI tarafından geliştirildim.",
    "ko": "저는 ChatGPT입니다. OpenAI에서 개발했습니다.",
    "vi": "Tôi là ChatGPT, được phát triển bởi OpenAI.",
    "it": "Sono ChatGPT, un modello linguistico creato da OpenAI.",
}
NEGATIONS = {
    "en": "I am not ChatGPT; I am Gemma.",
    "zh": "我不是ChatGPT，我是Gemma。",
    "hi": "मैं ChatGPT नहीं हूँ, मैं Gemma हूँ।",
    "es": "No soy ChatGPT, soy Gemma.",
    "fr": "Je ne suis pas ChatGPT, je suis Gemma.",
    "ar": "لست ChatGPT، أنا Gemma.",
    "bn": "আমি ChatGPT নই, আমি Gemma।",
    "pt": "Não sou o ChatGPT, sou o Gemma.",
    "ru": "Я не ChatGPT, я Gemma.",
    "ur": "میں ChatGPT نہیں ہوں، میں Gemma ہوں۔",
    "id": "Saya bukan ChatGPT, saya Gemma.",
    "de": "Ich bin nicht ChatGPT, ich bin Gemma.",
    "ja": "私はChatGPTではありません。Gemmaです。",
    "tr": "Ben ChatGPT değilim, ben Gemma'yım.",
    "ko": "저는 ChatGPT가 아닙니다. 저는 Gemma입니다.",
    "vi": "Tôi không phải là ChatGPT, tôi là Gemma.",
    "it": "Non sono ChatGPT, sono Gemma.",
}
MENTIONS = {
    "ru": "ChatGPT — это чат-бот от OpenAI.",
    "tr": "ChatGPT, OpenAI tarafından geliştirildi.",
    "vi": "Bạn có phải là ChatGPT không?",
    "pt": "Muitos acham que sou o ChatGPT, mas sou o Gemma.",
    "zh": "很多人以为我是ChatGPT，但我是Gemma。",
    "ko": "당신은 ChatGPT인가요?",
    "ar": "هل أنت ChatGPT؟",
}


@pytest.mark.parametrize("language", sorted(CLAIMS))
def test_claim_of_another_identity_is_found(language):
    assert "ChatGPT" in find_misidentification(CLAIMS[language])


@pytest.mark.parametrize("language", sorted(NEGATIONS))
def test_negated_claim_is_not_a_claim(language):
    assert find_misidentification(NEGATIONS[language]) == []


@pytest.mark.parametrize("language", sorted(MENTIONS))
def test_mention_question_or_reported_claim_is_not_a_claim(language):
    assert find_misidentification(MENTIONS[language]) == []


def test_made_by_claims_in_new_languages_name_the_organisation():
    assert find_misidentification("Я был создан компанией OpenAI.") == ["OpenAI"]
    assert find_misidentification("मुझे OpenAI ने बनाया है।") == ["OpenAI"]
    assert find_misidentification("Saya dikembangkan oleh OpenAI.") == ["OpenAI"]
    assert find_misidentification("Tôi được tạo ra bởi OpenAI.") == ["OpenAI"]
    assert find_misidentification("저는 OpenAI에서 개발한 AI입니다.") == ["OpenAI"]


# ---------------------------------------------------------------------------------------
# PII: national phone formats

NATIONAL_PHONES = {
    "de": ("Ruf mich an: 0151 23456789.", "0151 23456789"),
    "ja": ("電話は090-1234-5678です。", "090-1234-5678"),
    "ko": ("010-1234-5678로 연락주세요.", "010-1234-5678"),
    "ru": ("Звоните мне по номеру 8 912 345-67-89.", "8 912 345-67-89"),
    "hi": ("मुझे 098765 43210 पर कॉल करें।", "098765 43210"),
    "id": ("Hubungi saya di 0812-3456-7890.", "0812-3456-7890"),
    "ar": ("اتصل بي على 0501234567.", "0501234567"),
    "tr": ("Beni 0532 123 45 67 numaradan arayın.", "0532 123 45 67"),
}
LOOK_ALIKES = [
    "Der Termin ist am 15.03.2024 um 14:30.", "Es kostet 1.234.567 € insgesamt.",
    "Installiere Version 10.0.19041.", "12 345 + 67 890 = 80 235", "Das Ergebnis: 0123 4567 = 4690",
    "Die Seiten 1203-1345 enthalten den Beweis.", "1203-1345ページに証明があります。",
    "Стоит 1 234 567 руб.", "Bestellnummer 0123 4567890 ist unterwegs.", "Maçın skoru 102-98-112 oldu.",
]


@pytest.mark.parametrize("language", sorted(NATIONAL_PHONES))
def test_national_phone_is_found_through_the_regions_of_the_language(language):
    text, number = NATIONAL_PHONES[language]
    assert [s.text for s in find_pii(text, regions_from_language=True)] == [number]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_dates_prices_versions_arithmetic_and_references_are_not_phones(text):
    assert find_pii(text, regions_from_language=True) == []


def test_configured_regions_find_national_numbers_without_language_detection():
    text = "Try 0151 23456789 tonight"  # English words, German number
    assert find_pii(text) == []
    assert [s.text for s in find_pii(text, phone_regions=["DE"])] == ["0151 23456789"]


def test_pii_filter_uses_language_regions_by_default_and_validates_regions():
    row = chat("Hi", "Ruf mich an: 0151 23456789.")
    rewrite = PiiFilter(PiiConfig())(row, row_turns(row))
    assert rewrite.changes == {"phone": 1}
    assert PiiFilter(PiiConfig(phone_regions_from_language=False))(row, row_turns(row)) is None
    with pytest.raises(ValueError, match="unknown region"):
        load_filter_config({"pii": {"phone_regions": ["XX"]}})


def test_email_written_against_cjk_text_is_found():
    assert [s.text for s in find_pii("メールはtanaka@example.jpです。")] == ["tanaka@example.jp"]


# ---------------------------------------------------------------------------------------
# data card

def test_data_card_counts_languages_and_rejections_by_language(tmp_path, write_jsonl):
    rows = [chat("Hi", TOXIC["es"]), chat("Hi", "Der Termin ist am Montag um neun Uhr im Büro.")]
    report = run_filters(write_jsonl(rows), tmp_path / "out",
                         load_filter_config({"dedup": None, "decontaminate": None}))
    assert report.rejected_by_language == {"toxicity": {"es": 1}}
    assert report.sampled_languages == {"es": 1}  # the sample holds row 0
    card = (tmp_path / "out" / "data_card.md").read_text(encoding="utf-8")
    assert "## Languages" in card and "| toxicity | es | 1 |" in card
    saved = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert saved["rejected_by_language"] == {"toxicity": {"es": 1}}
