"""`filter`: the data_filters chain as a recipe stage, with the audit trail in the manifest."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from data_filters.config import FilterConfig
from data_filters.pipeline import run_filters
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage


class FilterStageConfig(StageConfig, FilterConfig):
    """Filter rows for personal information, toxic model turns, wrong self-identification,
    evaluation overlap and duplicates; every row ends kept (maybe redacted) or rejected with a reason."""

    # Added after run directories were made with this stage (StageConfig.hash_form).
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {
        "pii.phone_regions": [], "pii.phone_regions_from_language": True, "toxicity.language_thresholds": {},
        "toxicity.languages": None, "toxicity.min_language_probability": 0.15, "toxicity.multilingual": True,
        "toxicity.use_package_lists": True}

    dataset: str = Field(description="Rows to filter (JSONL): ${datasets.NAME}, ${stages.NAME.dataset} or a path.")
    num_proc: int = Field(1, ge=1, description="Worker processes for the per-row filters (dedup is global, in the parent).")


@register_stage("filter", FilterStageConfig, outputs=("dataset", "rejected", "data_card"))
def run_filter(cfg: FilterStageConfig, ctx: StageContext) -> StageResult:
    """Filter a dataset; writes kept.jsonl, rejected.jsonl and a data card."""
    chain = FilterConfig.model_validate(cfg.model_dump(exclude={"dataset", "num_proc"}))
    report = run_filters(cfg.dataset, ctx.stage_dir, chain, num_proc=cfg.num_proc)
    if report.kept_rows + report.rejected_rows != report.input_rows:
        raise StageError(f"audit invariant broken: kept {report.kept_rows} + rejected {report.rejected_rows} "
                         f"!= input {report.input_rows}")
    metrics = {"input_rows": report.input_rows, "kept_rows": report.kept_rows, "rejected_rows": report.rejected_rows,
               "redacted_rows": report.redacted_rows}
    for name, reasons in report.rejected_by.items():
        metrics[f"rejected/{name}"] = sum(reasons.values())
        for reason, n in reasons.items():
            metrics[f"rejected/{name}/{reason}"] = n
    for kind, n in report.redactions.items():
        metrics[f"redacted/{kind}"] = n
    return StageResult(outputs={"dataset": report.kept_path, "rejected": report.rejected_path,
                                "data_card": report.data_card_path}, metrics=metrics)
