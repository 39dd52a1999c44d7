"""Per-language lists of offensive words and phrases, and matching them in text.

Source: the dictionaries shipped inside the `glin-profanity` package (MIT licence; 24
languages, Latin, Cyrillic, Arabic, CJK, kana, Hangul and Thai scripts; JSON files read
from the installed package, nothing downloaded). Chosen over the other packaged lists
because it is maintained (releases through 2026), has no dependencies, and covers the most
of Gemma 3's widely spoken languages (its Russian list is in Cyrillic, unlike the LDNOOBW
copies in `expletives`; `safetext` has no Italian and imports `requests`).

Like LDNOOBW, from which most of them descend, these lists were made for blocking search
terms, and hold everyday and clinical words ("cerveja", "cadavere", "性", "حمام"). The
project removes those (`toxicity_lexicon_neutral.txt`, per language) and adds hand-written
threats, self-harm encouragement and insults per language (the `[xx]` sections of
`toxicity_lexicon.txt`). A term of a packaged list counts only in text whose detected
language is the term's language: "con" is an insult in French and "with" in Spanish, "kys"
a threat in English and a kiss in Danish. A hand-written term, checked to be offensive in
the languages close to its own, also counts in those (langdetect often reads a short
Spanish or Portuguese sentence as Catalan, a Russian one as Bulgarian).

File format of the project's lists: one term per line, `#` comments; terms before any
section apply in every language; terms after a `[xx]` line (ISO 639-1) belong to language
xx; a term followed by `[not: da no sv]` does not count in text detected as one of those.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable

from data_filters.language import ENGLISH_FUNCTION_WORDS, related_languages
from data_filters.text import word_set, words

# glin-profanity's file names -> ISO 639-1.
GLIN_LANGUAGES = {
    "arabic": "ar", "chinese": "zh", "czech": "cs", "danish": "da", "dutch": "nl",
    "english": "en", "esperanto": "eo", "finnish": "fi", "french": "fr", "german": "de",
    "hindi": "hi", "hungarian": "hu", "italian": "it", "japanese": "ja", "korean": "ko",
    "norwegian": "no", "persian": "fa", "polish": "pl", "portuguese": "pt", "russian": "ru",
    "spanish": "es", "swedish": "sv", "thai": "th", "turkish": "tr",
}
# English is covered by the classifier and the project's own high-precision lexicon; the
# package's English list (search-blocking terms such as "sex", "drunk") would cost more
# precision on English data than it adds recall.
DEFAULT_EXCLUDED_SOURCES = frozenset({"en"})

# Scripts written without spaces between words, or (Hangul) with particles glued to the
# word: their terms are found as substrings, the others as whole words.
_UNSPACED_RE = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_NOT_RE = re.compile(r"\s*\[not:\s*([a-z\s,-]*)\]\s*$")
_SECTION_RE = re.compile(r"^\[([a-z]{2,3}(?:-[a-z]+)?)\]$")


@dataclass(frozen=True, slots=True)
class Term:
    text: str  # lower-cased
    language: str | None  # None: every language
    not_in: frozenset[str] = frozenset()  # languages in which it is harmless
    source: str = "project"


def parse_terms(text: str, source: str = "project", where: str = "lexicon") -> list[Term]:
    """Terms of a project-format list (see the module docstring)."""
    out: list[Term] = []
    language: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            m = _SECTION_RE.match(line.lower())
            if not m:
                raise ValueError(f"{where}: line {n}: {line!r} is not a section header; "
                                 "expected [xx] with an ISO 639-1 language code")
            language = m.group(1)
            continue
        not_in: frozenset[str] = frozenset()
        m = _NOT_RE.search(line)
        if m:
            not_in = frozenset(x for x in re.split(r"[\s,]+", m.group(1)) if x)
            line = line[:m.start()]
        out.append(Term(line.lower(), language, not_in, source))
    return out


def read_lexicon_file(path: str | Path) -> list[Term]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toxicity.lexicon_path: {path} does not exist; expected a "
                                "text file with one term per line")
    return parse_terms(path.read_text("utf-8"), "project", str(path))


def _shipped(name: str) -> str:
    return resources.files("data_filters").joinpath(name).read_text("utf-8")


@lru_cache(maxsize=1)
def glin_profanity_terms() -> tuple[Term, ...]:
    """Every term of glin-profanity's dictionaries, tagged with its language."""
    root = resources.files("glin_profanity").joinpath("data", "dictionaries")
    out: list[Term] = []
    for name, code in GLIN_LANGUAGES.items():
        entry = root.joinpath(f"{name}.json")
        if not entry.is_file():
            continue
        for w in json.loads(entry.read_text("utf-8")).get("words", []):
            w = w.strip().lower()
            if w:
                out.append(Term(w, code, frozenset(), "glin-profanity"))
    if not out:
        raise RuntimeError("glin-profanity's dictionaries were not found in the installed "
                           "package; expected glin_profanity/data/dictionaries/*.json")
    return tuple(out)


@lru_cache(maxsize=1)
def neutral_terms() -> frozenset[tuple[str, str]]:
    """(language, term) pairs of the package lists that are ordinary vocabulary."""
    return frozenset((t.language or "", t.text) for t in parse_terms(_shipped("toxicity_lexicon_neutral.txt")))


def _english_function_words() -> frozenset[str]:
    """English function words (`data_filters.language.ENGLISH_FUNCTION_WORDS`). A packaged
    term spelled like one ("it" is an insult in Turkish) would match nearly every English
    turn and make each of them pay for language detection, to reject none of them."""
    return ENGLISH_FUNCTION_WORDS


def language_terms(languages: Iterable[str] | None = None, use_package: bool = True,
                   extra: Iterable[Term] = ()) -> list[Term]:
    """The language-specific terms: the package's (minus neutral words and the excluded
    sources) and the project's `[xx]` sections, for `languages` (None: all)."""
    wanted = None if languages is None else frozenset(languages)
    neutral = neutral_terms()
    terms: list[Term] = []
    if use_package:
        english = _english_function_words()
        terms += [t for t in glin_profanity_terms()
                  if t.language not in DEFAULT_EXCLUDED_SOURCES and (t.language, t.text) not in neutral
                  and t.text not in english]
    terms += [t for t in parse_terms(_shipped("toxicity_lexicon.txt")) if t.language]
    terms += [t for t in extra if t.language]
    return [t for t in terms if wanted is None or t.language in wanted]


def list_languages(extra_path: str | Path | None = None) -> list[str]:
    """The language codes that have a per-language list: glin-profanity's (less the
    excluded sources), the project's `[xx]` sections, and those of `extra_path` when that
    file exists (a missing one is reported where it is read)."""
    codes = set(GLIN_LANGUAGES.values()) - DEFAULT_EXCLUDED_SOURCES
    codes |= {t.language for t in parse_terms(_shipped("toxicity_lexicon.txt")) if t.language}
    if extra_path and Path(extra_path).is_file():
        codes |= {t.language for t in read_lexicon_file(extra_path) if t.language}
    return sorted(codes)


# Punctuation of other scripts that `data_filters.text.words` keeps inside words (Arabic
# comma and question mark, Devanagari danda, Urdu full stop, Spanish inverted marks).
_EXTRA_PUNCTUATION = str.maketrans({ch: " " for ch in "\u060c\u061b\u061f\u0964\u0965\u06d4\u00bf\u00a1"})


@dataclass
class GuardedLexicon:
    """Finds language-tagged terms: whole words and phrases in spaced scripts, substrings
    in unspaced ones. `candidates` returns every hit with, for each language it belongs
    to, the detected languages in which it counts: the language alone for a packaged
    list's term, the language and its close relatives (`related_languages`) for the
    project's hand-written terms."""

    single: dict[str, set[tuple[str, frozenset[str]]]] = field(default_factory=dict)
    phrases: dict[str, list[tuple[tuple[str, ...], tuple[str, frozenset[str]], frozenset[str]]]] = field(default_factory=dict)
    unspaced: dict[str, set[tuple[str, frozenset[str]]]] = field(default_factory=dict)
    _unspaced_re: re.Pattern | None = None
    _keys: frozenset = frozenset()  # single words and phrases' first words
    vocabulary: frozenset = frozenset()  # every word of every spaced term

    @classmethod
    def build(cls, terms: Iterable[Term]) -> "GuardedLexicon":
        lex = cls()
        for t in terms:
            counts_in = frozenset({t.language}) if t.source != "project" else related_languages(t.language)
            tag = (t.language, counts_in)
            if _UNSPACED_RE.search(t.text):
                lex.unspaced.setdefault(t.text, set()).add(tag)
                continue
            toks = words(t.text.translate(_EXTRA_PUNCTUATION))
            if len(toks) == 1:
                lex.single.setdefault(toks[0], set()).add(tag)
            elif toks:
                lex.phrases.setdefault(toks[0], []).append((toks, tag, frozenset(toks[1:])))
        # frozenset & frozenset walks the smaller side (a turn's words); intersecting with
        # the dicts would walk their thousands of keys.
        lex._keys = frozenset(lex.single) | frozenset(lex.phrases)
        lex.vocabulary = lex._keys.union(*(phrase for lst in lex.phrases.values() for phrase, _, _ in lst))
        if lex.unspaced:
            # Longest first, so a phrase is reported rather than a word inside it.
            alt = "|".join(re.escape(s) for s in sorted(lex.unspaced, key=len, reverse=True))
            lex._unspaced_re = re.compile(alt)
        return lex

    def candidates(self, text: str, ws: frozenset[str] | None = None) -> list[tuple[str, frozenset[tuple[str, frozenset[str]]]]]:
        """(term, {(its language, detected languages it counts in)}) for each term found.
        `ws`, for ASCII text: its word set, or the part of it inside `vocabulary`."""
        if not text.isascii():
            text, ws = text.translate(_EXTRA_PUNCTUATION), None
        if ws is None:
            ws = word_set(text)
        found: dict[str, set] = {}
        joined = None
        for w in ws & self._keys:
            if w in self.single:
                found.setdefault(w, set()).update(self.single[w])
            for phrase, tag, rest in self.phrases.get(w, ()):
                # Most phrases start with a common word ("a", "se", "te"): their other
                # words, a subset test on the word set, rule them out before any search.
                if not rest <= ws:
                    continue
                if joined is None:
                    joined = " " + " ".join(words(text)) + " "
                p = " ".join(phrase)
                if f" {p} " in joined:
                    found.setdefault(p, set()).add(tag)
        if self._unspaced_re is not None and not text.isascii() and _UNSPACED_RE.search(text):
            for m in self._unspaced_re.finditer(text.lower()):
                found.setdefault(m.group(), set()).update(self.unspaced[m.group()])
        # Longer terms first: evidence names the phrase, not a word inside it.
        return sorted(((t, frozenset(tags)) for t, tags in found.items()), key=lambda x: (-len(x[0]), x[0]))
