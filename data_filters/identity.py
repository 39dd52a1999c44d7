"""Mistaken self-identification: a model turn claiming to be another assistant, or to be
made by another organisation, than the configured identity.

Only first-person claims count: "I am ChatGPT", "as an AI developed by OpenAI", "I'm Claude,
made by Anthropic", "Je suis ChatGPT", "fui creado por OpenAI", "ich wurde von Meta
entwickelt", "我是由OpenAI开发的". A sentence that merely mentions another assistant ("ChatGPT
is a chatbot developed by OpenAI", "compare ChatGPT and Claude") or denies it ("I am not
ChatGPT") is not a claim.

    >>> find_misidentification("Hi! I'm Claude, made by Anthropic.", "Gemma", "Google DeepMind")
    ['Claude', 'Anthropic']
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

from data_filters.config import IdentityConfig
from data_filters.language import primary_language
from data_filters.rows import MODEL_ROLE, Decision, Rejection, Turn
from data_filters.text import has_odd_ascii, words

# Other assistants and model families. Case-sensitive: they are proper nouns, and "a bard"
# or "pi" in lower case are ordinary words.
ASSISTANT_NAMES = (
    "ChatGPT", "GPT-4o", "GPT-4", "GPT-3.5", "GPT-3", "GPT-5", "GPT", "InstructGPT", "Claude",
    "Bard", "Gemini", "Gemma", "LaMDA", "PaLM", "LLaMA", "Llama", "Mistral", "Mixtral",
    "Le Chat", "Qwen", "Tongyi Qianwen", "通义千问", "ERNIE Bot", "ERNIE", "文心一言",
    "Copilot", "Bing Chat", "Bing", "Cortana", "Alexa", "Siri", "Grok", "DeepSeek", "Vicuna",
    "Alpaca", "Falcon", "Command R", "Phi", "Pi", "Kimi", "ChatGLM", "Yi", "Baichuan",
    "OpenAssistant", "Open Assistant", "StableLM", "Dolly", "Koala", "WizardLM", "Zephyr",
)
ORGANISATIONS = (
    "OpenAI", "Anthropic", "Google DeepMind", "Google", "DeepMind", "Meta AI", "Meta",
    "Facebook", "Microsoft", "Mistral AI", "Mistral", "Alibaba Cloud", "Alibaba", "阿里巴巴",
    "阿里云", "Baidu", "百度", "xAI", "DeepSeek", "深度求索", "Cohere", "Amazon", "Apple",
    "Inflection AI", "Inflection", "Technology Innovation Institute", "LMSYS",
    "Stanford", "Moonshot AI", "Zhipu AI", "智谱", "01.AI", "Baichuan", "Stability AI",
    "Databricks", "Hugging Face", "Tsinghua",
)

_SENTENCE_END = r"[^.!?\n。！？]"
_GAP = _SENTENCE_END + "{0,60}?"
# Words a claim's gap may not contain: a negated or reported claim is not a claim.
_NEGATION_RE = re.compile(
    r"(?i)\b(?:not|never|no|n't|neither|nor|unlike|like|pas|jamais|nicht|kein|keine|no soy|non|não|nem|"
    r"не|нет|bukan|tidak|değil|değilim|không)\b|不是|并非|ではない|じゃない|नहीं|নই|نہیں|لست|ليس|아니")
# A negation right before the claim: "No soy ChatGPT", "Não sou", "Non sono", "Я не".
_NEGATED_BEFORE_RE = re.compile(
    r"(?i)(?:\b(?:no|não|nao|non|nem|not|never|ne|nicht|bukan|tidak|không)|(?<!\w)(?:не|нет)|不|没有|لست|ليس|لا)\s*$")
# A negation right after the name, where the verb or its negation follows (Japanese,
# Korean, Turkish, Hindi, Bengali, Urdu): "私はChatGPTではありません", "저는 ChatGPT가
# 아닙니다", "Ben ChatGPT değilim", "मैं ChatGPT नहीं हूँ".
_NEGATED_AFTER_RE = re.compile(
    r"(?i)^(?:\s|[がはでもをの]|이|가|은|는|['’]?(?:y?[ıiuü]m|d[ıiuü]r))*"
    r"(?:ではない|ではありません|じゃない|じゃありません|ではなく|ではございません|아니|아닙|아냐|"
    r"नहीं|नही|নই|না|نہیں|değil|bukan)")


def _alt(items: tuple[str, ...]) -> str:
    return "|".join(re.escape(x) for x in sorted(items, key=len, reverse=True))


def _patterns(names: tuple[str, ...], orgs: tuple[str, ...]) -> list[tuple[re.Pattern, frozenset[str] | None]]:
    """The claim patterns, each with its lead words: for a pattern that can match ASCII
    text, the lower-case words of which ASCII text holds one wherever the pattern matches
    (its first-person words as `data_filters.text.words` splits them; under IGNORECASE the
    pattern's "ı" matches "i" and "I", hence "adim" and "tarafindan"); empty for one that
    needs another script; None for the patterns of other scripts."""
    # ASCII-only word boundary after the name: in "ChatGPTです" or "OpenAI开发" the next
    # character is a (Unicode) word character but the name has ended.
    n = rf"(?P<name>{_alt(names)})(?![A-Za-z0-9_-])"
    o = rf"(?P<org>{_alt(orgs)})(?![A-Za-z0-9_])"
    made = (r"(?:developed|created|made|trained|built|designed|programmed|engineered|"
            r"fine-tuned|finetuned|produced|owned|brought to you)")
    descr = (r"(?:(?:an?|the|your)\s+)?(?:(?:AI|artificial intelligence|large|language|"
             r"helpful|virtual|digital|chat|conversational|friendly|personal|smart)\s+){0,3}"
             r"(?:model|assistant|chatbot|bot|AI|LLM|system)?,?\s*(?:(?:called|named|known as)\s+)?")
    en_i = r"(?i:\bI\s+am|\bI['’]m|\bIm|\bmy\s+name\s+is|\bI\s+am\s+called|\bcall\s+me|" \
           r"\byou(?:['’]re|\s+are)\s+(?:talking|chatting|speaking)\s+(?:to|with)|\bthis\s+is)"
    return [(re.compile(p), frozenset(lead.split())) for p, lead in (
        # English
        (rf"{en_i}\s+(?i:{descr}){n}", "i im my call you this"),
        (rf"(?i:\b(?:I\s+was|I['’]ve\s+been|I\s+have\s+been|I\s+am|I['’]m|as\s+an?)\s+)(?P<gap>{_GAP})"
         rf"(?i:\b{made}\s+(?:and\s+\w+\s+)?by\s+(?:the\s+)?(?:(?:team|researchers|engineers|folks|people)\s+(?:at|of|from)\s+)?){o}", "i as"),
        (rf"(?i:\b(?:my|our)\s+(?:creators?|developers?|makers?|parent company)\s+(?:is|are|was|were|at)\s+){o}", "my our"),
        (rf"{o}(?i:\s+(?:created|developed|made|trained|built|designed)\s+me)\b", "me"),
        # French
        (rf"(?i:\bje\s+suis|\bje\s+m['’]appelle|\bmon\s+nom\s+est)\s+(?i:(?:(?:un|une|l['’]|le|la)\s*)?(?:(?:assistant|modèle|IA|intelligence artificielle|agent conversationnel)\s+)?(?:(?:appelé|nommé)\s+)?){n}", "je mon"),
        (rf"(?i:\b(?:je\s+suis|j['’]ai\s+été)\s+)(?P<gap>{_GAP})(?i:\b(?:développée?|créée?|conçue?|entraînée?|formée?)\s+par\s+(?:l['’]équipe\s+(?:de\s+|d['’])?)?){o}", "je j"),
        # Spanish / Portuguese
        (rf"(?i:\bsoy|\bme\s+llamo|\bsou|\bme\s+chamo|\bmeu\s+nome\s+é|\bmi\s+nombre\s+es)\s+(?i:(?:(?:un|una|o|a|um|uma)\s+)?(?:(?:asistente|modelo|IA|assistente)\s+)?(?:(?:llamad[oa]|chamad[oa])\s+)?){n}", "soy me sou meu mi"),
        (rf"(?i:\b(?:soy|fui|sou|fui|he\s+sido|I?fui)\s+)(?P<gap>{_GAP})(?i:\b(?:desarrollad[oa]|cread[oa]|entrenad[oa]|hech[oa]|diseñad[oa]|desenvolvid[oa]|criad[oa]|treinad[oa])\s+(?:por|pela|pelo)\s+(?:el\s+equipo\s+de\s+|a\s+equipe\s+da\s+)?){o}", "soy fui sou he ifui"),
        # German
        (rf"(?i:\bich\s+bin|\bich\s+heiße|\bmein\s+name\s+ist)\s+(?i:(?:(?:ein|eine)\s+)?(?:(?:KI|Assistent|Sprachmodell|KI-Assistent)\s+)?(?:(?:namens|genannt)\s+)?){n}", "ich mein"),
        (rf"(?i:\bich\s+(?:wurde|bin)\s+)(?P<gap>{_GAP})(?i:\b(?:von|durch)\s+){o}(?i:\s+(?:entwickelt|erstellt|trainiert|gebaut|programmiert|geschaffen))", "ich"),
        # Italian
        (rf"(?i:\bsono|\bmi\s+chiamo)\s+(?i:(?:(?:un|una|l['’])\s*)?(?:(?:assistente|modello|IA)\s+)?(?:(?:chiamat[oa])\s+)?){n}", "sono mi"),
        (rf"(?i:\bsono\s+(?:stat[oa]\s+)?)(?P<gap>{_GAP})(?i:\b(?:sviluppat[oa]|creat[oa]|addestrat[oa]|progettat[oa])\s+da\s+){o}", "sono"),
        # Chinese
        (rf"(?:我是|我叫|我的名字是)\s*(?:一个|一款|一位)?(?:名叫|叫做|叫|名为)?(?:由{_GAP})?{n}", ""),
        (rf"我(?:是|由|被)?{_SENTENCE_END}{{0,12}}?由\s*{o}\s*(?:开发|创建|训练|打造|研发|推出|设计)", ""),
        # Indonesian
        (rf"(?i:\b(?:saya|aku)\s+(?:adalah\s+)?|\bnama\s+(?:saya|aku)\s+(?:adalah\s+)?)(?i:(?:(?:asisten|model)\s+(?:AI\s+|bahasa\s+)?)?(?:(?:bernama)\s+)?){n}", "saya aku nama"),
        (rf"(?i:\b(?:saya|aku)\s+)(?P<gap>{_GAP})(?i:\b(?:dikembangkan|dibuat|dilatih|dirancang|diciptakan)\s+oleh\s+(?:tim\s+)?){o}", "saya aku"),
        # Turkish
        (rf"(?i:\bben\s+|\b(?:benim\s+)?adım\s+)(?i:(?:(?:bir\s+)?(?:yapay\s+zeka\s+)?(?:asistan[ıi]?|dil\s+modeli)\s+)?){n}", "ben adim"),
        (rf"{o}(?:['’]?(?:n[ıi]n)?)?\s+(?i:tarafından\s+(?:geliştirildim|oluşturuldum|eğitildim|yaratıldım|tasarlandım|yapıldım))", "tarafindan"),
    )] + [(re.compile(p), None) for p in _non_latin_patterns(n, o)]


def _non_latin_patterns(n: str, o: str) -> list[str]:
    """Claims whose first-person words are written in other scripts (CJK, Cyrillic, Arabic,
    Devanagari, Bengali, Hangul) or with Vietnamese letters: they cannot match ASCII text,
    which skips them (`_compiled` counts them)."""
    return [
        # Japanese
        rf"(?:私は|僕は|わたしは|俺は)\s*{n}",
        rf"(?:私は|僕は|わたしは){_SENTENCE_END}{{0,20}}?{o}\s*(?:によって|が)\s*(?:開発|作成|訓練|トレーニング)",
        rf"(?:私|僕|わたし)を(?:開発|作成|訓練)した(?:のは)?\s*{o}",
        # Russian
        rf"(?i:(?<!\w)(?:я|меня\s+зовут|мо[её]\s+имя)\s*[—–-]?\s+(?:(?:языковая\s+модель|ии-ассистент|ассистент|помощник|чат-бот|модель|бот)\s+)?(?:(?:по\s+имени|под\s+названием)\s+)?){n}",
        rf"(?i:(?<!\w)(?:я|меня)\s+)(?P<gap>{_GAP})(?i:(?<!\w)(?:был[аои]?\s+)?(?:создан[аоы]?|разработан[аоы]?|обучен[аоы]?|сделан[аоы]?|создали|разработали|обучили|создала|разработала|обучила)\s+(?:(?:в\s+)?(?:компани(?:ей|и)|команд(?:ой|е))\s+)?){o}",
        # Hindi, Urdu
        rf"(?:मैं|मेरा\s+नाम|میں|میرا\s+نام)\s+(?:(?:एक|ایک)\s+)?{n}",
        rf"(?:मैं|मुझे|میں|مجھے)\s+(?P<gap>{_GAP}){o}\s+(?:ने|द्वारा|نے|کے\s+ذریعے)\s+(?:\S+\s+)?(?:बनाया|विकसित|प्रशिक्षित|तैयार|बनाई|بنایا|تیار|تربیت)",
        # Bengali
        rf"(?:আমি|আমার\s+নাম)\s+(?:একটি\s+)?{n}",
        rf"(?:আমি|আমাকে)\s+(?P<gap>{_GAP}){o}\s*(?:দ্বারা|-?এর\s+তৈরি|তৈরি|বানিয়েছে)",
        # Arabic
        rf"(?:(?<!\w)(?:أنا|انا|اسمي)\s+(?:(?:نموذج|مساعد)\s+(?:\S+\s+)?(?:اسمه|يدعى|يُدعى)?\s*)?){n}",
        rf"(?:تم\s+(?:تطويري|إنشائي|انشائي|تدريبي|تصميمي|صنعي)|طورتني|أنشأتني|انشأتني|دربتني|صممتني|صنعتني)\s+(?:(?:من\s+قبل|بواسطة|من|في)\s+)?(?:شركة\s+)?{o}",
        # Korean
        rf"(?:저는|나는|전|제\s*이름은)\s*{n}",
        rf"(?:저는|나는|저를|나를)\s*(?P<gap>{_GAP}){o}\s*(?:에서|가|이|에\s*의해(?:서)?)\s*(?:개발|만든|만들었|만들어|훈련|학습)",
        # Vietnamese
        rf"(?i:\b(?:tôi|mình|tớ)\s+là\s+|\btên\s+(?:tôi|mình)\s+là\s+)(?i:(?:(?:một\s+)?(?:trợ\s+lý|mô\s+hình)\s+(?:AI\s+|ngôn\s+ngữ\s+)?)?){n}",
        rf"(?i:\b(?:tôi|mình)\s+)(?P<gap>{_GAP})(?i:được\s+(?:phát\s+triển|tạo\s+ra|huấn\s+luyện|xây\s+dựng|thiết\s+kế)\s+bởi\s+){o}",
    ]


# A claim that is asked, reported or denied is not a claim: "Are you ChatGPT? No, I am Gemma",
# "je suis ChatGPT ? Non", "you might think I'm ChatGPT, but", "I'm ChatGPT. Just kidding, no".
_CLAUSE_START_RE = re.compile(r"[.!?\n。！？;:]")
_REPORTED_RE = re.compile(
    r"(?i)\b(?:if|whether|pretend|pretending|imagine|roleplay|role-play|say|says|said|think|thinks|"
    r"thought|believe|believes|believed|assume|assumes|assumed|suppose|wonder|wondering|mistake|"
    r"mistaken|confuse|confused|rumou?r|asks?|asked|asking|si|ob|crees|creen|pensez|penses|pensent|"
    r"glaubst|glauben|denkst|если|думаешь|думают|считаешь|считают|ли|apakah|jika|kalau|eğer|sanıyor|"
    r"sanıyorsun|nếu|hay|agar|اگر|إذا|اذا|هل|acham|acha|pensam|pensa|acreditam|pensano|credono|pensi|"
    r"mengira|kira|nghĩ|tưởng|يظن|يظنون|يعتقد|يعتقدون|सोचते|समझते)\b|अगर|क्या|如果|もし|만약|যদি|以为|认为|觉得|以為|認為")
_DENIAL_AFTER_RE = re.compile(
    r"(?i)^\s*[,.!?;:—–-]*\s*(?:no|non|nein|nope|nah|não|not|niet|いいえ|不是|不)\b"
    r"|^\s*[,.!?;:—–-]*\s*(?:but\s+)?(?:I\s+am\s+not|I['’]m\s+not|je\s+ne\s+suis\s+pas|"
    r"no\s+soy|ich\s+bin\s+(?:es\s+)?nicht|just\s+kidding)")


def _not_a_claim(text: str, start: int, end: int) -> bool:
    """The match is asked ("...ChatGPT?"), reported ("you think I am ...") or denied right
    after ("... ChatGPT. No, ...")."""
    rest = text[end:end + 80]
    if re.match(r"[^.!?\n。！？,;:—]{0,20}[?？؟]", rest):  # the claim's own clause is a question
        return True
    if _NEGATED_AFTER_RE.match(rest):
        return True
    if _NEGATED_BEFORE_RE.search(text[max(0, start - 12):start]):
        return True
    if _DENIAL_AFTER_RE.search(rest):
        return True
    head = text[max(0, start - 80):start]
    clause = _CLAUSE_START_RE.split(head)[-1]
    return bool(_REPORTED_RE.search(clause))


_NON_LATIN_COUNT = len(_non_latin_patterns("n", "o"))


def _allowed(name: str, developer: str) -> set[str]:
    allowed = {name.casefold(), developer.casefold()}
    allowed.update(w.casefold() for w in re.split(r"[\s,]+", developer) if len(w) > 1)
    return allowed


class _Compiled(NamedTuple):
    patterns: list[re.Pattern]  # every pattern, for text in any script
    # For ASCII text: (pattern, the group it needs: "name" or "org", its lead words).
    ascii_patterns: list[tuple[re.Pattern, str, frozenset[str]]]
    by_trigger: dict[str, list[str]]  # first word (lower case) -> names and organisations
    triggers: frozenset[str]
    leads: frozenset[str]  # every pattern's lead words
    names: tuple[str, ...]  # in Latin letters
    orgs: tuple[str, ...]
    gate: re.Pattern


@lru_cache(maxsize=16)
def _compiled(name: str, developer: str) -> _Compiled:
    allowed = _allowed(name, developer)
    names = tuple(x for x in ASSISTANT_NAMES if x.casefold() not in allowed)
    orgs = tuple(x for x in ORGANISATIONS if x.casefold() not in allowed)
    # A claim needs a foreign name: texts without one of these first words skip the regexes.
    by_trigger: dict[str, list[str]] = {}
    for x in names + orgs:
        if x.isascii():
            by_trigger.setdefault(words(x)[0], []).append(x)
    # Names are written in Latin letters inside text of any script ("ChatGPTです", "我是ChatGPT").
    gate = re.compile(_alt(names + orgs))
    patterns = _patterns(names, orgs)
    ascii_patterns = []
    for rx, leads in patterns[:len(patterns) - _NON_LATIN_COUNT]:
        group = "name" if "(?P<name>" in rx.pattern else "org"
        assert leads is not None and ("(?P<org>" in rx.pattern) == (group == "org")
        ascii_patterns.append((rx, group, leads))
    return _Compiled([rx for rx, _ in patterns], ascii_patterns, by_trigger, frozenset(by_trigger),
                     frozenset().union(*(leads for _, _, leads in ascii_patterns)),
                     tuple(x for x in names if x.isascii()), tuple(x for x in orgs if x.isascii()), gate)


def _ascii_patterns(c: _Compiled, text: str, ws: tuple[str, ...]) -> list[re.Pattern]:
    """The patterns that can match ASCII `text` (of words `ws`): a pattern needs its name or
    organisation group verbatim in the text, and one of its lead words among the words.
    The regexes cost ~20-50 us each on a 1,000-character text (most have no literal
    prefix to search for), and text that names an organisation (Google, Apple, Meta) is
    common. Lead words are not used where an odd control character could end a regex
    word inside one of `ws`' tokens."""
    groups = {"name"} if any(x in text for x in c.names) else set()
    if any(x in text for x in c.orgs):
        groups.add("org")
    lead_words = None if has_odd_ascii(text) else c.leads.intersection(ws)
    return [rx for rx, group, leads in c.ascii_patterns
            if group in groups and (lead_words is None or not leads.isdisjoint(lead_words))]



def find_misidentification(text: str, name: str = "Gemma", developer: str = "Google DeepMind") -> list[str]:
    """Other assistant names or organisations that `text` claims as its own identity.

    `name` and `developer` are the allowed identity: "Gemma" and "Google DeepMind" allow
    "Gemma", "Google", "DeepMind" and "Google DeepMind". Returns [] when the text is fine.
    """
    c = _compiled(name, developer)
    # Only ASCII text is gated: CJK is not split into words by spaces. Every pattern holds
    # a case-sensitive name or organisation group, so a claim needs one of them verbatim:
    # a lower-case word such as "pi" or "meta" alone does not run the regexes.
    if text.isascii():
        # Looked up from the word tuple: building the text's frozenset costs more.
        ws = words(text)
        present = c.triggers.intersection(ws)
        if not present or not any(x in text for w in present for x in c.by_trigger[w]):
            return []
        patterns = _ascii_patterns(c, text, ws)
    elif c.gate.search(text) is None:
        return []  # the same test for text in any script: no foreign name, no claim
    else:
        patterns = c.patterns
    found: list[str] = []
    for rx in patterns:
        for m in rx.finditer(text):
            gap = m.groupdict().get("gap")
            if gap and _NEGATION_RE.search(gap):
                continue
            lead = text[max(0, m.start() - 12):m.start()]
            if _NEGATION_RE.search(m.group()) or re.search(r"(?i)\b(?:if|pretend|imagine|roleplay|role-play|say)\W*$", lead):
                continue
            if _not_a_claim(text, m.start(), m.end()):
                continue
            claimed = m.groupdict().get("name") or m.groupdict().get("org")
            if claimed and claimed not in found:
                found.append(claimed)
    return found


class IdentityFilter:
    name = "identity"

    def __init__(self, config: IdentityConfig):
        self.config = config

    def __call__(self, row: dict, turns: list[Turn]) -> Decision:
        for i, t in enumerate(turns):
            if t.role != MODEL_ROLE:
                continue
            claims = find_misidentification(t.text, self.config.name, self.config.developer)
            if claims:
                return Rejection(self.name, "misidentification",
                                 {"turn": i, "claims": claims, "language": primary_language(t.text)})
        return None
