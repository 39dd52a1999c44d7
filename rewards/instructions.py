"""Instruction-following verifiers (the IFEval families, "verifiable programmatically").

``check(response, instruction_id_list, kwargs)`` returns one bool per instruction; ids and
keyword arguments follow IFEval's ``input_data.jsonl`` format (``kwargs`` is a list of dicts,
one per id; ``None`` values are ignored). ``loose=True`` applies IFEval's loose variant: an
instruction counts as followed when any of the response variants (first line removed, last
line removed, both, and each of those with ``*`` removed) follows it.

The verifiers are written from the instruction definitions. Tokenisation uses regular
expressions instead of nltk: nltk's sentence model is a separate data download, which is not
available at run time everywhere, and ``\\w+`` words are what IFEval counts anyway.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Sequence

from rewards.completions import completion_text

__all__ = ["check", "instructions_reward", "VERIFIERS", "count_sentences", "count_words"]


def _rel(value: int, relation: str | None, target: int) -> bool:
    if relation in ("less than", "<"):
        return value < target
    if relation in ("at least", ">="):
        return value >= target
    raise ValueError(f"unknown relation {relation!r}; expected 'less than' or 'at least'")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|Inc|Ltd|Co|No|Fig|U\.S)\.$",
                     re.IGNORECASE)


def count_sentences(text: str) -> int:
    """Sentences ending in . ! ? (or a line end), ignoring decimals, initials, abbreviations."""
    n = 0
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+\.)\s)", text):
        block = block.strip()
        if not block:
            continue
        parts = re.split(r"(?<=[.!?])[\"')\]]*\s+", block)
        count = 0
        for i, p in enumerate(parts):
            p = p.strip()
            if not p:
                continue
            if i < len(parts) - 1 and (_ABBREV.search(p) or re.search(r"\b[A-Z]\.$", p)):
                continue  # "Dr. Smith", "J. Doe": not a sentence end
            count += 1
        n += max(count, 1) if re.search(r"\w", block) else 0
    return n


def _paragraphs_divider(text: str) -> list[str] | None:
    parts = re.split(r"\s?\*\*\*\s?", text)
    n = len(parts)
    out = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i == 0 or i == n - 1:
                continue
            return None  # empty paragraph between dividers
        out.append(p)
    return out


def _language(text: str) -> str | None:
    try:
        import langdetect
        from langdetect import DetectorFactory

        DetectorFactory.seed = 0
        return langdetect.detect(text)
    except Exception:  # noqa: BLE001 - langdetect raises on text without features
        return None


def _keyword_count(text: str, kw: str) -> int:
    return len(re.findall(r"\b" + re.escape(kw.strip()) + r"\b", text, flags=re.IGNORECASE))


# ---------------------------------------------------------------- verifiers

def existence(r, keywords=(), **_):
    return all(_keyword_count(r, k) > 0 for k in keywords)


def frequency(r, keyword, frequency, relation, **_):
    return _rel(_keyword_count(r, keyword), relation, frequency)


def forbidden_words(r, forbidden_words=(), **_):
    return not any(_keyword_count(r, w) > 0 for w in forbidden_words)


def letter_frequency(r, letter, let_frequency, let_relation, **_):
    return _rel(r.lower().count(letter.lower()), let_relation, let_frequency)


def response_language(r, language, **_):
    return _language(r) == language


def number_sentences(r, num_sentences, relation, **_):
    return _rel(count_sentences(r), relation, num_sentences)


def number_paragraphs(r, num_paragraphs, **_):
    paras = _paragraphs_divider(r)
    return paras is not None and len(paras) == num_paragraphs


def number_words(r, num_words, relation, **_):
    return _rel(count_words(r), relation, num_words)


def nth_paragraph_first_word(r, num_paragraphs, nth_paragraph, first_word, **_):
    paras = [p for p in re.split(r"\n\s*\n", r) if p.strip()]
    if len(paras) != num_paragraphs or not (1 <= nth_paragraph <= len(paras)):
        return False
    words = paras[nth_paragraph - 1].strip().split()
    if not words:
        return False
    word = re.sub(r"^[^\w]+|[^\w]+$", "", words[0]).lower()
    return word == first_word.strip().lower()


def number_placeholders(r, num_placeholders, **_):
    return len(re.findall(r"\[[^\[\]\n]*\]", r)) >= num_placeholders


def postscript(r, postscript_marker, **_):
    m = postscript_marker.strip().lower()
    if m in ("p.p.s", "p.p.s."):
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif m in ("p.s", "p.s."):
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + re.escape(m) + r".*$"
    return re.search(pat, r.lower(), flags=re.MULTILINE) is not None


def number_bullet_lists(r, num_bullets, **_):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(r, **_):
    return any(opt in r.strip() for opt in CONSTRAINED)


def number_highlighted_sections(r, num_highlights, **_):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.strip("*").strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(r, num_sections, section_spliter, **_):
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


def json_format(r, **_):
    s = r.strip()
    s = re.sub(r"^```(?:json|JSON|Json)?\s*", "", s)
    s = re.sub(r"\s*```$", "", s).strip()
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def title(r, **_):
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", r))


def two_responses(r, **_):
    parts = r.split("******")
    nonempty = [p.strip() for p in parts]
    if len(parts) != 2 or not all(nonempty):
        # tolerate empty leading/trailing segments around exactly two responses
        nonempty = [p for i, p in enumerate(nonempty) if p or 0 < i < len(parts) - 1]
        if len(nonempty) != 2 or not all(nonempty):
            return False
    return nonempty[0] != nonempty[1]


def repeat_prompt(r, prompt_to_repeat, **_):
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(r, end_phrase, **_):
    return r.strip().strip("\"'*` ").lower().endswith(end_phrase.strip().lower()) or \
        r.strip().lower().endswith(end_phrase.strip().lower())


def capital_word_frequency(r, capital_frequency, capital_relation, **_):
    words = re.findall(r"\b[^\W\d_]+\b", r)
    return _rel(sum(w.isupper() for w in words), capital_relation, capital_frequency)


def english_capital(r, **_):
    return r.isupper() and _language(r) == "en"


def english_lowercase(r, **_):
    return r.islower() and _language(r) == "en"


def no_comma(r, **_):
    return "," not in r


def quotation(r, **_):
    s = r.strip()
    return len(s) > 1 and s[0] == '"' and s[-1] == '"'


VERIFIERS: dict[str, Callable[..., bool]] = {
    "keywords:existence": existence,
    "keywords:frequency": frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


def _variants(r: str) -> list[str]:
    lines = r.split("\n")
    base = [r, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [v.replace("*", "") for v in base]


def check(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[dict[str, Any] | None],
          loose: bool = False) -> list[bool]:
    """One bool per instruction: whether ``response`` follows it."""
    if len(kwargs) != len(instruction_id_list):
        raise ValueError(f"{len(instruction_id_list)} instruction ids but {len(kwargs)} kwargs")
    out = []
    variants = _variants(response) if loose else [response]
    for iid, kw in zip(instruction_id_list, kwargs):
        fn = VERIFIERS.get(iid)
        if fn is None:
            raise KeyError(f"unknown instruction id {iid!r}; known: {sorted(VERIFIERS)}")
        kw = {k: v for k, v in (kw or {}).items() if v is not None}
        out.append(any(bool(v.strip()) and fn(v, **kw) for v in variants))
    return out


def instructions_reward(prompts, completions, instruction_id_list=None, kwargs=None, *,
                        mode: str = "fraction", loose: bool = False, **_: Any) -> list[float | None]:
    """TRL-style reward: fraction of instructions followed (``mode="fraction"``) or 1/0 when
    all are followed (``"all"``). Columns ``instruction_id_list`` and ``kwargs``."""
    if instruction_id_list is None:
        raise ValueError("the instructions reward needs an 'instruction_id_list' column")
    kwargs = kwargs if kwargs is not None else [None] * len(completions)
    out: list[float | None] = []
    for c, ids, kws in zip(completions, instruction_id_list, kwargs):
        if not ids:
            out.append(None)
            continue
        kws = kws if kws is not None else [{}] * len(ids)
        res = check(completion_text(c), ids, kws, loose=loose)
        out.append(sum(res) / len(res) if mode == "fraction" else float(all(res)))
    return out
