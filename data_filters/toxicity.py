"""Score texts for toxic or unsafe content, offline on the CPU.

The default classifier is the linear model (TF-IDF + calibrated linear SVM) shipped inside
the `alt-profanity-check` package, trained by its authors on public toxic-comment data
(Kaggle's Toxic Comment Classification data and Davidson et al.'s hate-speech data); it loads
from the package in well under a second and scores hundreds of thousands of short texts per
second. It detects offensive and abusive language, not every kind of unsafe advice. A seed
lexicon (`toxicity_lexicon.txt`) adds a score of 1.0 for unambiguous phrases. A local
transformers text-classification checkpoint can replace the default (`classifier="hf"`).

    >>> score(["Have a nice day.", "shut the fuck up"])  # doctest: +SKIP
    [0.02, 1.0]
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from data_filters.config import ToxicityConfig
from data_filters.rows import MODEL_ROLE, Decision, Rejection, Turn
from data_filters.language import detect_languages
from data_filters.text import has_odd_ascii, word_set, words
from data_filters.word_lists import GuardedLexicon, Term, language_terms, parse_terms, read_lexicon_file


def load_lexicon(extra_path: str | None = None) -> list[str]:
    """The shipped lexicon's terms for every language, plus those of `extra_path` (one per
    line, # comments; `[xx]` sections hold language-specific terms, see `word_lists`)."""
    return [t.text for t in _global_terms(extra_path)]


def _global_terms(extra_path: str | None) -> list[Term]:
    terms = parse_terms(resources.files("data_filters").joinpath("toxicity_lexicon.txt").read_text("utf-8"))
    if extra_path:
        terms += read_lexicon_file(extra_path)
    return [t for t in terms if t.language is None]


class Lexicon:
    """Whole-word, case-insensitive matching of terms and phrases.

    Works on the word tokens of `data_filters.text` (shared with the other filters, computed
    once per text) instead of a regex alternation, which costs ~80 us per 600-character text.
    """

    def __init__(self, terms: Sequence[str]):
        self.single: set[str] = set()
        # First word -> (phrase, its words), longest phrase first.
        self.phrases: dict[str, list[tuple[tuple[str, ...], frozenset[str]]]] = {}
        for term in terms:
            toks = words(term)
            if len(toks) == 1:
                self.single.add(toks[0])
            elif toks:
                self.phrases.setdefault(toks[0], []).append((toks, frozenset(toks)))
        for lst in self.phrases.values():
            lst.sort(key=lambda p: len(p[0]), reverse=True)  # report "go kill yourself" over "kill yourself"
        self.vocabulary = frozenset(self.single).union(*(p for lst in self.phrases.values() for _, p in lst))

    def match(self, text: str, wset: frozenset[str] | None = None) -> str | None:
        """The first lexicon term or phrase in `text`, or None. `wset`: the text's word set,
        or the part of it inside `vocabulary` (the same answer, from a smaller set)."""
        if wset is None:
            wset = word_set(text)
        hits = wset & self.single
        # Phrase starts are common words ("you", "i", "go"): a phrase whose other words are
        # not all in the text is ruled out by a subset test before any position search.
        starts = [(w, phrases) for w in wset.intersection(self.phrases)
                  if (phrases := [p for p, pw in self.phrases[w] if pw <= wset])]
        if not starts:
            return min(hits) if hits else None
        # The phrase starting earliest in the text (at one position, the longest phrase).
        # Find the start words' positions with tuple.index, a C loop, instead of walking
        # every word in Python.
        ws = words(text)
        best: tuple[int, tuple[str, ...]] | None = None
        for w, phrases in starts:
            i = -1
            while True:
                try:
                    i = ws.index(w, i + 1, best[0] if best else len(ws))
                except ValueError:
                    break
                phrase = next((p for p in phrases if ws[i:i + len(p)] == p), None)
                if phrase is not None:
                    best = (i, phrase)
                    break
        if best is not None:
            return " ".join(best[1])
        return min(hits) if hits else None


class ScoreBound:
    """A provable upper bound of the profanity_check score of a text from its word set.

    The model is a TF-IDF vectoriser (L2-normalised, non-negative) followed by linear SVMs
    whose sigmoid-calibrated outputs are averaged. For a tf-idf vector x with ||x|| <= 1
    supported on the text's vocabulary terms S, Cauchy-Schwarz gives
    w_k . x <= ||max(w_k, 0) restricted to S||, so each SVM's decision value, and with it
    the (increasing) calibrated probability, is bounded by a sum over the text's terms that
    have a positive weight. Texts whose bound is below the threshold cannot be rejected by
    the classifier, so the vectoriser (the costly part: per-token Python) runs only on the
    others, with exactly the scores it always gave. Built only when the shipped model has
    the structure the argument needs; otherwise `None` and every text is scored.
    """

    # Rounding in sklearn's float64 arithmetic is ~1e-15; the margin keeps the bound sound.
    MARGIN = 1e-9

    def __init__(self, vocabulary: dict[str, int], weights: np.ndarray, intercepts: np.ndarray,
                 slopes: np.ndarray, offsets: np.ndarray):
        positive = np.maximum(weights, 0.0)
        has_positive = positive.max(axis=0) > 0
        self._terms = {t: i for t, i in vocabulary.items() if has_positive[i]}
        self._term_set = frozenset(self._terms)  # set & set walks the smaller side
        self._squares = (positive ** 2).T.copy()  # (vocabulary size, models)
        self._intercepts, self._slopes, self._offsets = intercepts, slopes, offsets
        # sklearn's default token pattern (2+ word characters) applied to the lower-cased text.
        self._token_re = re.compile(r"(?u)\b\w\w+\b")

    @classmethod
    def from_profanity_check(cls, vectorizer, model) -> "ScoreBound | None":
        try:
            p = vectorizer.get_params()
            if (p["analyzer"] != "word" or not p["lowercase"] or p["norm"] != "l2"
                    or p["token_pattern"] != r"(?u)\b\w\w+\b" or p["tokenizer"] is not None
                    or p["preprocessor"] is not None or p["strip_accents"] is not None
                    or tuple(p["ngram_range"]) != (1, 1) or model.method != "sigmoid"
                    or list(model.classes_) != [0, 1]):
                return None
            if p["use_idf"] and not (vectorizer.idf_ > 0).all():
                return None
            weights, intercepts, slopes, offsets = [], [], [], []
            for cc in model.calibrated_classifiers_:
                est = cc.estimator
                if type(est).__name__ not in ("LinearSVC", "LogisticRegression") or len(cc.calibrators) != 1:
                    return None
                weights.append(np.asarray(est.coef_, dtype=np.float64).ravel())
                intercepts.append(float(np.ravel(est.intercept_)[0]))
                slopes.append(float(cc.calibrators[0].a_))
                offsets.append(float(cc.calibrators[0].b_))
        except (AttributeError, KeyError, TypeError, IndexError):
            return None
        slopes_a = np.array(slopes)
        if not (slopes_a < 0).all():  # the calibrated probability must increase with w.x
            return None
        return cls(vectorizer.vocabulary_, np.array(weights), np.array(intercepts), slopes_a,
                   np.array(offsets))

    @property
    def vocabulary(self) -> frozenset[str]:
        """The terms that raise the bound."""
        return self._term_set

    def _positive_terms(self, text: str, ws: frozenset[str] | None = None) -> list[int]:
        """Indices of the positive-weight vocabulary terms among the text's sklearn tokens.

        A token of sklearn's pattern is a maximal run of word characters; a word of
        `data_filters.text.words` is a maximal run of characters that are neither white space
        nor separators (all non-word characters). So every vocabulary term in the word set is
        a token, and the word set misses tokens only inside words holding some other non-word
        character (a symbol, an emoji): those texts are tokenised with sklearn's pattern.
        `ws`, for ASCII text: the word set, or the part of it that holds `vocabulary`'s terms.
        """
        if ws is None or not text.isascii():
            ws = word_set(text)
        if (has_odd_ascii(text) if text.isascii()
                else not all(w.isalnum() or w.replace("_", "a").isalnum() for w in ws)):
            ws = set(self._token_re.findall(text.lower()))
        terms = self._terms
        return [terms[t] for t in self._term_set.intersection(ws)]

    def upper_bounds(self, texts: Sequence[str], word_sets: Sequence[frozenset[str] | None] | None = None) -> np.ndarray:
        """For each text, a number >= its classifier score. `word_sets`: as `_positive_terms`'s `ws`."""
        idx, owner = [], []
        for n, text in enumerate(texts):
            hits = self._positive_terms(text, word_sets[n] if word_sets is not None else None)
            idx.extend(hits)
            owner.extend([n] * len(hits))
        sums = np.zeros((len(texts), self._squares.shape[1]))
        if idx:
            owners, squares = np.array(owner), self._squares[np.array(idx)]
            for k in range(squares.shape[1]):
                sums[:, k] = np.bincount(owners, weights=squares[:, k], minlength=len(texts))
        decision = self._intercepts + np.sqrt(sums)
        probability = 1.0 / (1.0 + np.exp(self._slopes * decision + self._offsets))
        return probability.mean(axis=1) + self.MARGIN


class ToxicityScorer:
    """Scores in [0, 1], one per text; built from a `ToxicityConfig`."""

    def __init__(self, config: ToxicityConfig | None = None):
        self.config = config or ToxicityConfig()
        c = self.config
        use_lexicon = c.use_lexicon or c.classifier == "lexicon"
        global_terms = _global_terms(c.lexicon_path) if use_lexicon else []
        self.lexicon = Lexicon([t.text for t in global_terms]) if use_lexicon else None
        # Terms harmless in some languages ("kys" is a kiss in Danish): checked per match.
        self.not_in = {" ".join(words(t.text)): t.not_in for t in global_terms if t.not_in}
        self.guarded: GuardedLexicon | None = None
        if use_lexicon and c.multilingual:
            extra = read_lexicon_file(c.lexicon_path) if c.lexicon_path else []
            self.guarded = GuardedLexicon.build(
                language_terms(c.languages, use_package=c.use_package_lists, extra=extra))
        self._model = None
        self.bound: ScoreBound | None = None
        if c.classifier == "profanity_check":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-learn version notices on unpickling
                import profanity_check
                from profanity_check import profanity_check as shipped
            self._model = profanity_check.predict_prob
            self.bound = ScoreBound.from_profanity_check(shipped.vectorizer, shipped.model)
        elif c.classifier == "hf":
            self._model = _hf_scorer(c.checkpoint, tuple(c.toxic_labels), c.batch_size)
        # Every word the lexicons and the bound look up. An ASCII turn's words are looked
        # up in it once, and each of them then intersects that small set: a turn's ~100
        # probes into a table of thousands cost ~9 us, and building the turn's word set as
        # a frozenset first ~10 us more.
        self._vocabulary = frozenset().union(
            self.lexicon.vocabulary if self.lexicon else (), self.guarded.vocabulary if self.guarded else (),
            self.bound.vocabulary if self.bound else ())

    def _known_words(self, text: str) -> frozenset[str] | None:
        """The words of an ASCII `text` inside `_vocabulary` (None for other text: the word
        lists split it with more punctuation, see `GuardedLexicon.candidates`)."""
        return self._vocabulary.intersection(words(text)) if text.isascii() else None

    def lexicon_match(self, text: str) -> str | None:
        """The lexicon term that makes `text` toxic, if any: a term for every language
        (unless the text is in a language where the term is harmless), or a term of a
        language the text is detected to be in."""
        hit = self.lexicon_hit(text)
        return hit[0] if hit else None

    def lexicon_hit(self, text: str, known: frozenset[str] | None = None) -> tuple[str, str | None] | None:
        """(term, its language or None for an every-language term), or None. `known`: the
        text's `_known_words`, when already computed."""
        if self.lexicon is None:
            return None
        if known is None:
            known = self._known_words(text)
        term = self.lexicon.match(text, known)
        if term is not None:
            harmless_in = self.not_in.get(term)
            if not harmless_in or _primary(text) not in harmless_in:
                return term, None
        if self.guarded is not None:
            found = self.guarded.candidates(text, known)
            if found:
                # langdetect runs only here, on the few turns that hold a listed word.
                langs = {code for code, p in detect_languages(text)
                         if p >= self.config.min_language_probability}
                for t, tags in found:
                    for language, counts_in in sorted(tags):
                        if counts_in & langs:
                            return t, language
        return None

    def scores_at_least(self, texts: Sequence[str], threshold: float) -> list[float | None]:
        """Like `score`, but None for texts whose score is provably below `threshold`
        (checked with `ScoreBound`, without running the classifier on them)."""
        texts = list(texts)
        if not texts:
            return []
        out: list[float | None] = [None] * len(texts)
        known = [self._known_words(t) for t in texts]
        lexicon_hits = [self.lexicon_hit(t, k) is not None for t, k in zip(texts, known)]
        for i, hit in enumerate(lexicon_hits):
            if hit:
                out[i] = 1.0  # what `score` gives a lexicon match, whatever the classifier says
        todo = [i for i, hit in enumerate(lexicon_hits) if not hit]
        if self._model is None:
            for i in todo:
                out[i] = 0.0
            return out
        if self.bound is not None and todo:
            bounds = self.bound.upper_bounds([texts[i] for i in todo], [known[i] for i in todo])
            todo = [i for i, b in zip(todo, bounds.tolist()) if b >= threshold]
        if todo:
            for i, s in zip(todo, self._model([texts[i] for i in todo])):
                out[i] = float(s)
        return out

    def score(self, texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        if not texts:
            return []
        if self._model is not None:
            scores = [float(s) for s in self._model(texts)]
        else:
            scores = [0.0] * len(texts)
        if self.lexicon is not None:
            for i, text in enumerate(texts):
                if scores[i] < 1.0 and self.lexicon_hit(text):
                    scores[i] = 1.0
        return scores


def _primary(text: str) -> str | None:
    guesses = detect_languages(text)
    return guesses[0][0] if guesses else None


def _hf_scorer(checkpoint: str | None, toxic_labels: tuple[str, ...], batch_size: int):
    if not checkpoint:
        raise ValueError("toxicity.checkpoint: required when toxicity.classifier is 'hf'; "
                         "expected the local path of a text-classification model")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"toxicity.checkpoint: {checkpoint} does not exist; expected a "
                                "local directory holding a transformers text-classification model")
    from transformers import pipeline

    clf = pipeline("text-classification", model=checkpoint, top_k=None, device=-1)
    wanted = {label.lower() for label in toxic_labels}

    def predict(texts: list[str]) -> list[float]:
        out = []
        for result in clf(texts, batch_size=batch_size, truncation=True):
            out.append(sum(r["score"] for r in result if r["label"].lower() in wanted))
        return out

    return predict


@lru_cache(maxsize=1)
def _default_scorer() -> ToxicityScorer:
    return ToxicityScorer()


def score(texts: Sequence[str]) -> list[float]:
    """Toxicity scores in [0, 1] from the default offline classifier plus the lexicon."""
    return _default_scorer().score(texts)


class ToxicityFilter:
    name = "toxicity"

    def __init__(self, config: ToxicityConfig):
        self.config = config
        self.scorer = ToxicityScorer(config)

    def _scored(self, turns: list[Turn]) -> list[int]:
        roles = (MODEL_ROLE, "user") if self.config.apply_to_user_turns else (MODEL_ROLE,)
        return [i for i, t in enumerate(turns) if t.role in roles and t.text.strip()]

    def _threshold(self, text: str) -> float:
        if not self.config.language_thresholds:
            return self.config.threshold
        return self.config.language_thresholds.get(_primary(text), self.config.threshold)

    def batch(self, items: list[tuple[dict, list[Turn]]]) -> list[Decision]:
        # One classifier call for the whole batch: per-call overhead dominates short texts.
        refs, texts = [], []
        for n, (_, turns) in enumerate(items):
            for i in self._scored(turns):
                refs.append((n, i))
                texts.append(turns[i].text)
        c = self.config
        # The bound must hold for the lowest threshold any language gets.
        floor = min([c.threshold, *c.language_thresholds.values()])
        # Turns that provably score below the threshold come back as None, unscored.
        scores = self.scorer.scores_at_least(texts, floor)
        worst: dict[int, tuple[float, int]] = {}
        for (n, i), s, text in zip(refs, scores, texts):
            if s is None or s < floor or (s < 1.0 and s < self._threshold(text)):
                continue
            if n not in worst or s > worst[n][0]:
                worst[n] = (s, i)
        decisions: list[Decision] = [None] * len(items)
        for n, (s, i) in worst.items():
            turns = items[n][1]
            text = turns[i].text
            hit = self.scorer.lexicon_hit(text)
            evidence = {"turn": i, "role": turns[i].role, "score": round(s, 4),
                        "language": _primary(text)}
            if hit:
                evidence["lexicon_term"] = hit[0]
                if hit[1]:
                    evidence["lexicon_language"] = hit[1]
            decisions[n] = Rejection(self.name, "lexicon" if hit and s >= 1.0 else "classifier", evidence)
        return decisions

    def __call__(self, row: dict, turns: list[Turn]) -> Decision:
        return self.batch([(row, turns)])[0]
