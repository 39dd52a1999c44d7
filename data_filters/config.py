"""Configuration of the filter chain: one typed class per filter, every field documented.

A filter is switched off with `enabled: false` or by setting its section to null. Unknown
keys are errors (a typo must not silently disable a filter).

    quality: {max_chars: 50000}
    pii: {mode: redact, kinds: [email, phone, secret]}
    toxicity: {threshold: 0.9, classifier: profanity_check}
    identity: {name: Gemma, developer: Google DeepMind}
    dedup: {near: true, threshold: 0.8}
    decontaminate: {eval_sets: [evals/gsm8k_test.jsonl], ngram: 13}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from data_filters.pii import ALL_KINDS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this filter (false: skip it).")


class QualityConfig(_Section):
    """Format and quality checks. Invalid rows (missing fields, wrong roles, non-string
    content, invalid JSON or UTF-8) are always rejected, even when this section is off,
    since no other filter can read them."""

    require_model_turn: bool = Field(
        True, description="Reject chat rows with no assistant turn. Set false for prompt-only data.")
    reject_empty_model_turns: bool = Field(
        True, description="Reject rows whose assistant turn is empty or whitespace.")
    max_chars: int | None = Field(
        100_000, description="Reject rows whose turns total more characters than this (null: no limit).")
    max_turns: int | None = Field(
        256, description="Reject rows with more turns than this (null: no limit).")
    min_compression_ratio: float | None = Field(
        0.1, description="Reject a turn of at least `repetition_min_chars` characters that zlib "
        "compresses below this ratio: degenerate loops compress to a few percent, prose and "
        "code to 0.25 or more (null: off).")
    max_duplicate_line_fraction: float | None = Field(
        0.5, description="Reject a turn in which repeated lines make up more than this "
        "share of its non-empty lines (at least 6 lines; null: off).")
    repetition_min_chars: int = Field(
        400, description="Repetition checks apply to turns at least this long.")


class PiiConfig(_Section):
    """Personal information and secrets (see `data_filters.pii`)."""

    mode: Literal["redact", "drop"] = Field(
        "redact", description="redact: replace each span by a typed placeholder such as "
        "<EMAIL> and keep the row; drop: reject the row.")
    kinds: list[str] = Field(
        list(ALL_KINDS), description=f"Kinds to look for, among {list(ALL_KINDS)}.")
    apply_to_system_turns: bool = Field(True, description="Also scan system turns.")
    phone_regions: list[str] = Field(
        [], description="Regions (ISO 3166 alpha-2, e.g. [JP, KR]) whose national phone formats "
        "are looked for in every turn, besides the common regions always tried.")
    phone_regions_from_language: bool = Field(
        True, description="Also look for the national phone formats of the regions that a "
        "turn's detected language suggests (German: DE, AT, CH; Japanese: JP; ...); the "
        "language is detected only for turns holding a number that needs it.")

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, v: list[str]) -> list[str]:
        import phonenumbers

        unknown = [r for r in v if r.upper() not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown region(s) {unknown}; expected ISO 3166 alpha-2 codes "
                             "that libphonenumber supports, such as DE, JP, BR")
        return [r.upper() for r in v]

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        unknown = [k for k in v if k not in ALL_KINDS]
        if unknown:
            raise ValueError(f"unknown PII kind(s) {unknown}; expected some of {list(ALL_KINDS)}")
        return v


class ToxicityConfig(_Section):
    """Toxic or unsafe model outputs (see `data_filters.toxicity`)."""

    classifier: Literal["profanity_check", "lexicon", "hf"] = Field(
        "profanity_check", description="profanity_check: the linear model shipped by the "
        "alt-profanity-check package (offline, CPU); lexicon: the word list alone; hf: a local "
        "transformers text-classification checkpoint named by `checkpoint`.")
    threshold: float = Field(
        0.9, ge=0.0, le=1.0, description="Reject a row when any scored turn reaches this score.")
    use_lexicon: bool = Field(
        True, description="Also score 1.0 for any lexicon match, whatever the classifier says.")
    lexicon_path: str | None = Field(
        None, description="A text file of extra terms, one per line (# comments), added to "
        "the shipped lexicon; terms after a `[xx]` line count only in text detected as "
        "language xx (ISO 639-1), and `term [not: da no]` does not count in those languages.")
    multilingual: bool = Field(
        True, description="Also match the per-language word lists (glin-profanity's, less "
        "everyday words, plus the project's threats and insults; see `data_filters.word_lists`), "
        "each term only in turns whose detected language (langdetect) is the term's.")
    languages: list[str] | None = Field(
        None, description="Languages (ISO 639-1) whose word lists are used; null: all the "
        "lists have (ar cs da de eo es fa fi fr hi hu it ja ko nl no pl pt ru sv th tr zh).")
    use_package_lists: bool = Field(
        True, description="Include glin-profanity's lists; false: the project's per-language "
        "terms only.")
    language_thresholds: dict[str, float] = Field(
        {}, description="Classifier threshold per detected language of the turn, where the "
        "(English-trained) classifier's scores are not comparable; other languages use "
        "`threshold`. Example: {fr: 0.8}.")
    min_language_probability: float = Field(
        0.15, gt=0.0, le=1.0, description="A term of language xx counts when langdetect gives "
        "the turn at least this probability of being in xx.")
    apply_to_user_turns: bool = Field(
        False, description="Also score user turns (default: model turns only).")
    checkpoint: str | None = Field(
        None, description="Local path of a HF text-classification model, for classifier: hf.")
    toxic_labels: list[str] = Field(
        ["toxic", "TOXIC", "LABEL_1", "offensive", "hate"],
        description="For classifier: hf, the labels whose probability is the toxicity score.")
    batch_size: int = Field(64, ge=1, description="Texts per classifier call.")

    @field_validator("languages")
    @classmethod
    def _languages_with_lists(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        # A code without a list (a typo, an upper-case code, a language nobody listed) would
        # otherwise select no terms and switch that language's matching off without a word.
        if v is None:
            return v
        from data_filters.word_lists import list_languages

        supported = list_languages(info.data.get("lexicon_path"))
        unknown = [code for code in v if code not in supported]
        if unknown:
            english = (" English has no per-language list: the every-language lexicon and the "
                       "classifier cover it." if "en" in unknown else "")
            raise ValueError(f"unknown language code(s) {unknown}; expected lower-case ISO 639-1 "
                             f"codes that have a word list: {' '.join(supported)} (or a [xx] "
                             f"section of lexicon_path).{english}")
        return v

    @field_validator("language_thresholds")
    @classmethod
    def _thresholds_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not 0.0 <= x <= 1.0}
        if bad:
            raise ValueError(f"thresholds must lie in [0, 1]; got {bad}")
        return v


class IdentityConfig(_Section):
    """Mistaken self-identification in model turns (see `data_filters.identity`)."""

    name: str = Field("Gemma", description="The assistant name the model may claim.")
    developer: str = Field("Google DeepMind", description="The developer the model may "
                           "claim; each word of it (Google, DeepMind) is allowed on its own.")


class DedupConfig(_Section):
    """Global deduplication; the first row of each group of duplicates is kept."""

    exact: bool = Field(True, description="Drop rows whose normalised text (case, "
                        "whitespace, Unicode form folded) hashes like an earlier row's.")
    near: bool = Field(True, description="Drop near duplicates found by MinHash LSH (datasketch).")
    prompt_only: bool = Field(False, description="Compare prompts only (the turns before the "
                              "first model turn) instead of whole conversations.")
    ngram: int = Field(5, ge=1, description="Word shingle size for MinHash.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Estimated Jaccard similarity "
                             "of shingle sets at or above which two rows are near duplicates.")
    seed: int = Field(1, description="MinHash seed (must be equal across shards).")


class DecontaminateConfig(_Section):
    """Drop training rows sharing a word n-gram with an evaluation set."""

    eval_sets: list[str] = Field(
        [], description="JSONL or JSON files of evaluation examples; every string field "
        "(recursively) is indexed. Name each as `name=path` to choose the name recorded.")
    ngram: int = Field(13, ge=3, description="Word n-gram length (13 as in GPT-3's and "
                       "Gemma's decontamination).")


class FilterConfig(BaseModel):
    """The filter chain: per-row filters run in the order quality, pii, toxicity, identity,
    decontaminate; dedup runs last, globally, over the rows the others kept."""

    model_config = ConfigDict(extra="forbid")

    quality: QualityConfig | None = Field(default_factory=QualityConfig)
    pii: PiiConfig | None = Field(default_factory=PiiConfig)
    toxicity: ToxicityConfig | None = Field(default_factory=ToxicityConfig)
    identity: IdentityConfig | None = Field(default_factory=IdentityConfig)
    decontaminate: DecontaminateConfig | None = Field(default_factory=DecontaminateConfig)
    dedup: DedupConfig | None = Field(default_factory=DedupConfig)
    chunk_size: int = Field(512, ge=1, description="Rows per task sent to a worker process.")

    def active(self, name: str):
        """The section `name` if it is on, else None."""
        section = getattr(self, name)
        return section if section is not None and section.enabled else None


def load_filter_config(data: dict[str, Any] | None, where: str = "filter config") -> FilterConfig:
    """Validate a mapping (for example a recipe's YAML section) into a `FilterConfig`.

    Errors name the key path under `where` and say what was expected.
    """
    try:
        return FilterConfig.model_validate(data or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {path}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("invalid filter configuration:\n" + "\n".join(lines)) from None
