"""The language of a turn, for the filters that depend on it (toxicity word lists, phone
regions): langdetect's guesses with their probabilities, deterministic and cached.

langdetect (a port of Google's language-detection library, 55 languages, offline) costs
about a millisecond per short text, so the filters ask for a turn's language only when
the answer changes a decision (a word from a language-specific list matched, a number
needs a region), and record it as evidence.

    >>> detect_languages("Eres un imbécil inútil.")[0][0]  # doctest: +SKIP
    'es'
"""

from __future__ import annotations

from functools import lru_cache

from data_filters.text import words

# langdetect names Chinese by script; the filters key their lists by language.
_ALIASES = {"zh-cn": "zh", "zh-tw": "zh"}
# langdetect's n-gram profiles are noisy on very short texts: guesses below this share
# are not candidates (two close languages, Spanish and Portuguese, share the mass).
MIN_PROBABILITY = 0.15
# langdetect averages 7 random-sampling trials by default; 3 halve its cost (it runs the
# most on texts it finds hard) for 0.89 instead of 0.90 top-1 accuracy within a language
# family on bench/filters_multilingual.jsonl.
_TRIALS = 3


def _factory_ready() -> None:
    from langdetect import DetectorFactory
    from langdetect.detector_factory import init_factory

    # A fixed seed: langdetect samples n-grams at random, and the same text must get the
    # same answer in every worker process and every run.
    DetectorFactory.seed = 0
    init_factory()


# English words that are not function words of the other languages the filters know
# ("a", "in", "on", "die", "no", "me" are left out: Spanish, Italian, German, French use
# them too).
ENGLISH_FUNCTION_WORDS = frozenset(
    "the of and to is it that for with this be are you can by from or at not we if will use "
    "each was were have has had been would should could they their there which what when "
    "your our its than then these those into about just only also very".split())
_MARKER_SHARE = 0.05
_MARKER_WORDS = 400


def _plainly_english(text: str) -> bool:
    """ASCII text in which English-only function words are at least 5% of the words (and
    three distinct ones occur): English without asking langdetect, which costs 2-10 ms
    a text on the CPU (its Python loop over 55 languages) while English is most of
    the data; a few dozen microseconds here."""
    if not text.isascii():
        return False
    ws = words(text)[:_MARKER_WORDS]
    # Counted by a C-level map over the words, not a Python loop (a third of the time).
    hits = sum(map(ENGLISH_FUNCTION_WORDS.__contains__, ws))
    return hits >= max(3, _MARKER_SHARE * len(ws)) and len(ENGLISH_FUNCTION_WORDS.intersection(ws)) >= 3


@lru_cache(maxsize=4096)
def detect_languages(text: str) -> tuple[tuple[str, float], ...]:
    """(ISO 639-1 code, probability) pairs, most probable first; () when langdetect finds no
    letters to go by (digits, punctuation, empty text). Plainly English text (see
    `_plainly_english`) is (("en", 1.0),) without running langdetect."""
    from langdetect import detector_factory
    from langdetect.lang_detect_exception import LangDetectException

    if _plainly_english(text):
        return (("en", 1.0),)

    if detector_factory._factory is None:
        _factory_ready()
    try:
        detector = detector_factory._factory.create()
        detector.n_trial = _TRIALS
        detector.append(text)
        guesses = detector.get_probabilities()
    except LangDetectException:
        return ()
    return tuple((_ALIASES.get(g.lang, g.lang), round(g.prob, 4)) for g in guesses)


# Languages langdetect confuses on short texts (observed: Spanish and Portuguese insults
# read as Catalan, French as Italian, Russian as Bulgarian or Macedonian, Danish as
# Norwegian). A hand-written term that is offensive in one of them is offensive in its
# relatives too, so it is looked for in all of them; a term of a packaged word list is
# looked for in its own language only (a word of one language may be harmless in its
# neighbour's: French "con", Spanish "con").
_FAMILIES = (
    frozenset({"es", "pt", "ca", "it", "fr", "ro"}),
    frozenset({"ru", "uk", "bg", "mk"}),
    frozenset({"pl", "cs", "sk", "sl", "hr"}),
    frozenset({"da", "no", "sv"}),
    frozenset({"de", "nl", "af"}),
    frozenset({"hi", "mr", "ne", "ur"}),
    frozenset({"ar", "fa", "ur"}),
    frozenset({"id", "tl"}),
)


def related_languages(code: str) -> frozenset[str]:
    """`code` and the languages langdetect confuses it with."""
    out = {code}
    for family in _FAMILIES:
        if code in family:
            out |= family
    return frozenset(out)


def language_candidates(text: str, min_probability: float = MIN_PROBABILITY) -> frozenset[str]:
    """The languages `text` may be in: every guess with at least `min_probability`."""
    return frozenset(code for code, p in detect_languages(text) if p >= min_probability)


def primary_language(text: str) -> str | None:
    """The most probable language of `text`, or None when it has no letters."""
    guesses = detect_languages(text)
    return guesses[0][0] if guesses else None
