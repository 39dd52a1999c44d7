"""Filters for post-training data: PII, toxicity, self-identification, dedup,
decontamination and format/quality checks, with an audit trail of every rejected row.

Usable on its own; knows nothing of recipes:

    from data_filters import FilterConfig, run_filters
    report = run_filters("train.jsonl", "filtered/", FilterConfig(), num_proc=4)
"""

from data_filters.config import FilterConfig, load_filter_config
from data_filters.pipeline import FilterReport, filter_shard, merge_shards, run_filters
from data_filters.rows import Rejection, Rewrite

__all__ = ["FilterConfig", "FilterReport", "Rejection", "Rewrite", "filter_shard",
           "load_filter_config", "merge_shards", "run_filters"]
