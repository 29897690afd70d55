"""Tables and the token-length figure shown by notebooks/01_describe.ipynb."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..clip.text import get_tokenizer, token_lengths
from ..plots import save_figure
from .summarize import summarize


def counts_table(records: Sequence[dict], classnames: Sequence[str]) -> pd.DataFrame:
    """Per class: descriptions, distinct prompt variants, mean words; classes with none included."""
    df = pd.DataFrame(list(records), columns=["class", "text", "prompt_id", "variant"])
    df["words"] = df["text"].str.split().str.len()
    g = df.groupby("class")
    out = pd.DataFrame({
        "descriptions": g.size(),
        "prompts": g["prompt_id"].nunique(),
        "mean_words": g["words"].mean().round(1),
    })
    if df["variant"].notna().any():  # synthetic ground truth: descriptions true of one variant only
        for v in sorted(df["variant"].dropna().unique()):
            out[f"only_{v}"] = df[df["variant"] == v].groupby("class").size()
    out = out.reindex(list(classnames))
    for c in out.columns:
        if c != "mean_words":
            out[c] = out[c].fillna(0).astype(int)
    out.index.name = "class"
    return out


def examples(records: Sequence[dict], per_class: int = 2, classes: int = 5) -> pd.DataFrame:
    """The first ``per_class`` descriptions of the first ``classes`` classes."""
    df = pd.DataFrame(list(records))
    if df.empty:
        return df
    keep = list(dict.fromkeys(df["class"]))[:classes]
    df = df[df["class"].isin(keep)].groupby("class", sort=False).head(per_class)
    return df[["class", "prompt_id", "text"]].reset_index(drop=True)


def length_stats(records: Sequence[dict], tokenizer="tiny", stats: dict | None = None) -> pd.DataFrame:
    """Token lengths (CLIP tokenizer, start/end included) of each description and of its extractive
    summary; ``stats`` receives :func:`~workbench.describe.summarize.summarize`'s counts (fallbacks, why)."""
    tok = get_tokenizer(tokenizer)
    texts = [r["text"] for r in records]
    summaries = summarize(texts, [r["class"] for r in records], tokenizer=tok, stats=stats)
    return pd.DataFrame({
        "class": [r["class"] for r in records],
        "description_tokens": token_lengths(texts, tok),
        "summary_tokens": token_lengths(summaries, tok),
        "summary": summaries,
    })


def plot_token_lengths(lengths: pd.DataFrame, limit: int = 77, path: str | Path | None = None):
    """Histogram of description and summary lengths in CLIP tokens, with the context limit marked."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    hi = max(limit + 5, int(lengths[["description_tokens", "summary_tokens"]].to_numpy().max(initial=0)) + 5)
    bins = np.arange(0, hi + 4, 4)
    ax.hist(lengths["description_tokens"], bins=bins, alpha=0.6, label="descriptions")
    ax.hist(lengths["summary_tokens"], bins=bins, alpha=0.6, label="summaries (extractive)")
    ax.axvline(limit, color="k", ls="--", lw=1)
    ax.text(limit, ax.get_ylim()[1] * 0.95, f" {limit}-token context", va="top", fontsize=8)
    over = int((lengths["description_tokens"] > limit).sum())
    ax.set(xlabel="CLIP tokens (incl. start/end)", ylabel="count",
           title=f"Description lengths: {over} of {len(lengths)} exceed {limit} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def outcomes(metrics: dict) -> pd.DataFrame:
    """Validation outcomes per reason: rejected / retried / dropped (record backends: dropped only)."""
    cols = {k: metrics[k] for k in ("rejected", "retried", "dropped") if isinstance(metrics.get(k), dict)}
    return pd.DataFrame(cols).rename_axis("reason")


def token_summary(lengths: pd.DataFrame, limit: int = 77) -> dict:
    """Length figures for metrics.json["describe"]["tokens"]."""
    d, s = lengths["description_tokens"], lengths["summary_tokens"]
    if not len(d):
        return {}
    return {"limit": limit, "description_median": float(d.median()), "description_max": int(d.max()),
            "descriptions_over_limit": int((d > limit).sum()), "summary_median": float(s.median()),
            "summary_max": int(s.max())}


def explorer(records: Sequence[dict], classnames: Sequence[str]):
    """ipywidgets dropdown: a class's descriptions with their prompt ids."""
    import ipywidgets as w  # optional UI dependency: loaded only when a widget is built
    from IPython.display import display

    df = pd.DataFrame(list(records))
    out = w.Output()

    def show(change=None):
        out.clear_output()
        with out:
            display(df[df["class"] == dd.value][["prompt_id", "text"]].reset_index(drop=True))

    dd = w.Dropdown(options=list(classnames), description="class")
    dd.observe(show, names="value")
    show()
    return w.VBox([dd, out])


__all__ = ["counts_table", "examples", "outcomes", "length_stats", "plot_token_lengths", "token_summary", "explorer"]
