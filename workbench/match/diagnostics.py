"""Are the matches any good? Description usage per class, score margins, weakest matches, and on the
synthetic benchmark the precision of the matched variant against the ground truth.

Everything here reads matches records (``matches.jsonl`` rows) plus description records, so it works
on imported GIST captions as well (score-based figures are then empty).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import pandas as pd

from ..stats import wilson_interval
from .score import MatchResult


def _is_none(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v == ""


def usage_table(records: Sequence[dict], descriptions: Sequence[dict] | None = None) -> pd.DataFrame:
    """One row per description: how many images rank it first (``n_top1``) and in their top-k (``n_topk``).
    With ``descriptions``, descriptions that no image picked are included with zero counts."""
    top1 = Counter(r["description_ids"][0] for r in records if r["description_ids"])
    topk = Counter(d for r in records for d in r["description_ids"])
    if descriptions is not None:
        rows = [{"id": d["id"], "class": d["class"], "text": d["text"]} for d in descriptions]
    else:
        seen = {}
        for r in records:
            for d, t in zip(r["description_ids"], r["descriptions"]):
                seen.setdefault(d, {"id": d, "class": r["class"], "text": t})
        rows = list(seen.values())
    df = pd.DataFrame(rows, columns=["id", "class", "text"])
    df["n_top1"] = [top1.get(i, 0) for i in df["id"]]
    df["n_topk"] = [topk.get(i, 0) for i in df["id"]]
    return df


def class_table(records: Sequence[dict], descriptions: Sequence[dict] | None = None) -> pd.DataFrame:
    """Per class: images, descriptions available, distinct descriptions used at top-1 and in the top-k,
    mean top-1 score and mean margin."""
    use = usage_table(records, descriptions)
    m = margins(records)
    s1 = np.array([r["scores"][0] if r.get("scores") else np.nan for r in records], dtype=float)
    per = pd.DataFrame({"class": [r["class"] for r in records], "top1_score": s1, "margin": m})
    g = per.groupby("class", sort=False)
    out = pd.DataFrame({
        "n_images": g.size(),
        "mean_top1_score": g["top1_score"].mean(),
        "mean_margin": g["margin"].mean(),
    })
    u = use.groupby("class", sort=False)
    out["n_descriptions"] = u.size().reindex(out.index).fillna(0).astype(int)
    out["distinct_top1"] = u["n_top1"].apply(lambda x: int((x > 0).sum())).reindex(out.index).fillna(0).astype(int)
    out["distinct_topk"] = u["n_topk"].apply(lambda x: int((x > 0).sum())).reindex(out.index).fillna(0).astype(int)
    cols = ["n_images", "n_descriptions", "distinct_top1", "distinct_topk", "mean_top1_score", "mean_margin"]
    return out[cols].reset_index()


def margins(records: Sequence[dict]) -> np.ndarray:
    """Top-1 minus top-2 cosine per image (NaN without scores or with a single description)."""
    return np.array([r["scores"][0] - r["scores"][1] if r.get("scores") and len(r["scores"]) > 1 else np.nan
                     for r in records], dtype=float)


def weakest(records: Sequence[dict], n: int = 10) -> pd.DataFrame:
    """The ``n`` images whose best match scores lowest (ties: smaller margin first)."""
    rows = [{"image": r["image"], "class": r["class"], "top1_score": r["scores"][0],
             "margin": (r["scores"][0] - r["scores"][1]) if len(r["scores"]) > 1 else np.nan,
             "caption": r["captions"][0]} for r in records if r.get("scores")]
    if not rows:
        return pd.DataFrame(columns=["image", "class", "top1_score", "margin", "caption"])
    return pd.DataFrame(rows).sort_values(["top1_score", "margin"], kind="stable").head(n).reset_index(drop=True)


def variant_precision(records: Sequence[dict], descriptions: Sequence[dict], table: pd.DataFrame) -> dict | None:
    """Precision of matched variant-specific descriptions against each image's true variant.

    Only descriptions with a ``variant`` (true of one variant, e.g. "male") count; ``None`` ones are
    true of every image and say nothing. ``random_precision`` is the expectation for a uniform pick
    among the class's variant-specific descriptions, averaged over the same images. Also reports the
    share of top-1 picks true of the image (generic ones count as true) against random. None when the
    table has no ``variant`` column or no description is variant-specific.
    """
    if "variant" not in table.columns:
        return None
    img_var = {f: (None if _is_none(v) else str(v)) for f, v in zip(table["filename"], table["variant"])}
    dvar = {d["id"]: (None if _is_none(d.get("variant")) else str(d.get("variant"))) for d in descriptions}
    by_class: dict[str, list] = {}
    for d in descriptions:
        by_class.setdefault(d["class"], []).append(dvar[d["id"]])
    if not any(v is not None for v in dvar.values()):
        return None
    hit1 = n1 = hitk = nk = 0
    rand, true1, rand_true = [], [], []
    for r in records:
        v = img_var.get(r["image"])
        if v is None or not r["description_ids"]:
            continue
        cls_vars = by_class.get(r["class"], [])
        spec = [x for x in cls_vars if x is not None]
        if not spec:
            continue
        rand.append(np.mean([x == v for x in spec]))
        rand_true.append(np.mean([x is None or x == v for x in cls_vars]))
        top = dvar.get(r["description_ids"][0])
        true1.append(top is None or top == v)
        if top is not None:
            n1 += 1
            hit1 += top == v
        for d in r["description_ids"]:
            if dvar.get(d) is not None:
                nk += 1
                hitk += dvar[d] == v
    if not rand:
        return None
    return {
        "variant_precision": hit1 / n1 if n1 else float("nan"),
        "variant_precision_ci95": wilson_interval(hit1, n1),
        "random_precision": float(np.mean(rand)),
        "variant_precision_topk": hitk / nk if nk else float("nan"),
        "true_rate_top1": float(np.mean(true1)),
        "random_true_rate": float(np.mean(rand_true)),
        "n_images_scored": len(rand),
        "n_top1_variant_specific": n1,
    }


def matching_metrics(result_or_records, descriptions: Sequence[dict] | None = None, table: pd.DataFrame | None = None,
                     k: int | None = None) -> dict:
    """The ``metrics.json["matching"]`` section: sizes, usage, margins, variant precision, timing."""
    timing, bad = {}, []
    if isinstance(result_or_records, MatchResult):
        res = result_or_records
        records, descriptions, table = res.records, res.descriptions, res.table
        timing, bad = res.timing, res.bad_images
    else:
        records = list(result_or_records)
    m = margins(records)
    s1 = np.array([r["scores"][0] for r in records if r.get("scores")], dtype=float)
    use = usage_table(records, descriptions)
    ct = class_table(records, descriptions)
    out = {
        "n_images": len(records),
        "n_bad_images": len(bad),
        "k": k if k is not None else max((len(r["description_ids"]) for r in records), default=0),
        "n_descriptions": len(use),
        "share_descriptions_used_topk": float((use["n_topk"] > 0).mean()) if len(use) else float("nan"),
        "share_descriptions_used_top1": float((use["n_top1"] > 0).mean()) if len(use) else float("nan"),
        "mean_distinct_top1_per_class": float(ct["distinct_top1"].mean()) if len(ct) else float("nan"),
        "mean_top1_score": float(s1.mean()) if len(s1) else None,
        "mean_margin": float(np.nanmean(m)) if np.isfinite(m).any() else None,
        "median_margin": float(np.nanmedian(m)) if np.isfinite(m).any() else None,
        "model": records[0].get("model") if records else None,
        "pretrained": records[0].get("pretrained") if records else None,
    }
    if descriptions is not None and table is not None:
        vp = variant_precision(records, descriptions, table)
        if vp:
            out.update(vp)
    if timing:
        out["timing"] = {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in timing.items()}
    # metrics.json is strict JSON: NaN (no scores, nothing variant-specific) becomes null
    return {k_: (None if isinstance(v, float) and not np.isfinite(v) else v) for k_, v in out.items()}


def matches_frame(records: Sequence[dict], k: int = 2) -> pd.DataFrame:
    """A readable table of matches: image, class, then the first ``k`` captions with their cosines."""
    rows = []
    for r in records:
        row = {"image": r["image"], "class": r["class"]}
        for j in range(min(k, len(r["captions"]))):
            row[f"caption_{j + 1}"] = r["captions"][j]
            if r.get("scores"):
                row[f"cos_{j + 1}"] = round(r["scores"][j], 4)
        rows.append(row)
    return pd.DataFrame(rows)


def descriptions_frame(descriptions: Sequence[dict]) -> pd.DataFrame:
    """Descriptions per class (and per variant, when the records carry one)."""
    df = pd.DataFrame([{"class": d["class"], "variant": d.get("variant") or "(any)"} for d in descriptions])
    if df.empty:
        return df
    return df.groupby(["class", "variant"]).size().unstack(fill_value=0)
