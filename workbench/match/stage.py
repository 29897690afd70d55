"""The match stage (``02_match``): its parameter section in; ``matches.jsonl``, ``captions_top5.json``
and ``metrics.json["matching"]`` out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..clip import load_clip
from ..data import Dataset, load_dataset
from ..identity import dataset_identity, descriptions_sha256, weights_identity, with_version
from ..params import Params
from ..runs import locked, read_descriptions, update_metrics
from .captions import export_captions_top5, import_captions_top5
from .diagnostics import matching_metrics
from .score import MatchResult, match_dataset


@dataclass
class MatchRun:
    ds: Dataset
    records: list[dict]  # matches.jsonl rows
    result: MatchResult | None  # None when captions were imported
    descriptions: list[dict] | None
    metrics: dict  # metrics.json["matching"]


@locked
def run(p: Params, ds: Dataset | None = None, descriptions: list[dict] | None = None) -> MatchRun:
    """Match the split's images to their own class's descriptions (``descriptions``: the run's, read
    here when not given) or import GIST captions; then record the diagnostics and export GIST's
    ``captions_top5.json``."""
    ds = ds if ds is not None else load_dataset(p.dataset, p.data_root, **p.dataset_options)
    run_dir = Path(p.run_dir)
    if p.import_captions is None:
        descriptions = descriptions if descriptions is not None else read_descriptions(run_dir)
        bundle = load_clip(p.model, p.pretrained, device=p.device)
        result = match_dataset(ds, descriptions, bundle, k=p.k, batch_size=p.batch_size, summarize=p.summarize,
                               summarize_options=p.summarize_options, split=p.split, center=p.center,
                               skip_bad_images=p.skip_bad_images, run_dir=run_dir, progress=p.progress)
        records = result.records
    else:
        descriptions, result = None, None
        records = import_captions_top5(p.import_captions, ds, run_dir=run_dir)
    metrics = matching_metrics(result if result is not None else records, descriptions, ds.split(p.split).table, k=p.k)
    if result is not None and result.summaries:  # summarize="extractive"/"llm": how many fell back, and why
        metrics["summaries"] = result.summaries
    metrics["identity"] = match_identity(p, ds, descriptions)
    update_metrics(run_dir, "matching", metrics)
    if p.export_captions:
        export_captions_top5(records, run_dir / "captions_top5.json")
    return MatchRun(ds, records, result, descriptions, metrics)


def match_identity(p: Params, ds: Dataset, descriptions: list[dict] | None) -> dict:
    """What ``matches.jsonl`` was made from (fine-tuning checks its descriptions are still the run's)."""
    return with_version({
        **weights_identity(p.model, p.pretrained), **dataset_identity(ds, p.dataset, p.data_root, p.dataset_options),
        "descriptions_sha256": descriptions_sha256(descriptions), "import_captions": p.import_captions,
        "k": p.k, "center": p.center, "summarize": p.summarize, "split": p.split,
    })
