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

import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

from data_filters.config import ToxicityConfig
from data_filters.rows import MODEL_ROLE, Decision, Rejection, Turn
from data_filters.text import word_set, words


def load_lexicon(extra_path: str | None = None) -> list[str]:
    """The shipped lexicon's terms, plus those of `extra_path` (one per line, # comments)."""
    texts = [resources.files("data_filters").joinpath("toxicity_lexicon.txt").read_text("utf-8")]
    if extra_path:
        path = Path(extra_path)
        if not path.is_file():
            raise FileNotFoundError(f"toxicity.lexicon_path: {path} does not exist; expected a "
                                    "text file with one term per line")
        texts.append(path.read_text("utf-8"))
    terms = []
    for text in texts:
        for line in text.splitlines():
            line = line.strip().lower()
            if line and not line.startswith("#"):
                terms.append(line)
    return terms


class Lexicon:
    """Whole-word, case-insensitive matching of terms and phrases.

    Works on the word tokens of `data_filters.text` (shared with the other filters, computed
    once per text) instead of a regex alternation, which costs ~80 us per 600-character text.
    """

    def __init__(self, terms: Sequence[str]):
        self.single: set[str] = set()
        self.phrases: dict[str, list[tuple[str, ...]]] = {}
        for term in terms:
            toks = words(term)
            if len(toks) == 1:
                self.single.add(toks[0])
            elif toks:
                self.phrases.setdefault(toks[0], []).append(toks)
        for lst in self.phrases.values():
            lst.sort(key=len, reverse=True)  # report "go kill yourself" over "kill yourself"

    def match(self, text: str) -> str | None:
        """The first lexicon term or phrase in `text`, or None."""
        wset = word_set(text)
        hits = wset & self.single
        starts = wset.intersection(self.phrases)
        if not starts:
            return min(hits) if hits else None
        ws = words(text)
        for i, w in enumerate(ws):
            for phrase in self.phrases.get(w, ()):
                if ws[i:i + len(phrase)] == phrase:
                    return " ".join(phrase)
        return min(hits) if hits else None


class ToxicityScorer:
    """Scores in [0, 1], one per text; built from a `ToxicityConfig`."""

    def __init__(self, config: ToxicityConfig | None = None):
        self.config = config or ToxicityConfig()
        c = self.config
        self.lexicon = Lexicon(load_lexicon(c.lexicon_path)) if (
            c.use_lexicon or c.classifier == "lexicon") else None
        self._model = None
        if c.classifier == "profanity_check":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-learn version notices on unpickling
                import profanity_check
            self._model = profanity_check.predict_prob
        elif c.classifier == "hf":
            self._model = _hf_scorer(c.checkpoint, tuple(c.toxic_labels), c.batch_size)

    def lexicon_match(self, text: str) -> str | None:
        if self.lexicon is None:
            return None
        return self.lexicon.match(text)

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
                if scores[i] < 1.0 and self.lexicon.match(text):
                    scores[i] = 1.0
        return scores


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

    def batch(self, items: list[tuple[dict, list[Turn]]]) -> list[Decision]:
        # One classifier call for the whole batch: per-call overhead dominates short texts.
        refs, texts = [], []
        for n, (_, turns) in enumerate(items):
            for i in self._scored(turns):
                refs.append((n, i))
                texts.append(turns[i].text)
        scores = self.scorer.score(texts)
        worst: dict[int, tuple[float, int]] = {}
        for (n, i), s in zip(refs, scores):
            if s >= self.config.threshold and (n not in worst or s > worst[n][0]):
                worst[n] = (s, i)
        decisions: list[Decision] = [None] * len(items)
        for n, (s, i) in worst.items():
            turns = items[n][1]
            text = turns[i].text
            term = self.scorer.lexicon_match(text)
            evidence = {"turn": i, "role": turns[i].role, "score": round(s, 4)}
            if term:
                evidence["lexicon_term"] = term
            decisions[n] = Rejection(self.name, "lexicon" if term and s >= 1.0 else "classifier", evidence)
        return decisions

    def __call__(self, row: dict, turns: list[Turn]) -> Decision:
        return self.batch([(row, turns)])[0]
