"""Match stage: each training image gets the top-k descriptions of its own class.

Modules: ``score`` (scoring and the matching run), ``captions`` (77-token captions, GIST's
``captions_top5.json``), ``diagnostics`` (are the matches any good?), ``plots``, ``widgets`` (the
match browser), ``stage`` (what notebook 02_match calls).
"""
from .captions import export_captions_top5, import_captions_top5, split_class_prefix, summarize_texts, truncate_caption
from .diagnostics import (
    class_table,
    descriptions_frame,
    matches_frame,
    matching_metrics,
    usage_table,
    variant_precision,
    weakest,
)
from .plots import plot_match_diagnostics, plot_match_examples
from .score import TEMPERATURE, MatchResult, match_dataset, topk_within_class
from .stage import MatchRun, run

__all__ = [
    "MatchResult", "MatchRun", "TEMPERATURE", "class_table", "descriptions_frame", "export_captions_top5",
    "import_captions_top5", "match_dataset", "matches_frame", "matching_metrics", "plot_match_diagnostics",
    "plot_match_examples", "run", "split_class_prefix", "summarize_texts", "topk_within_class", "truncate_caption",
    "usage_table", "variant_precision", "weakest",
]
