"""Figures of the match stage: diagnostics panel and a grid of example images with their captions."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from ..data.images import to_rgb
from ..plots import save_figure
from .diagnostics import class_table, margins, usage_table


def plot_match_diagnostics(records: Sequence[dict], descriptions: Sequence[dict] | None = None,
                           metrics: dict | None = None, path: str | Path | None = None):
    """Four panels: distinct descriptions used per class, description usage histogram, score margins,
    top-1 scores; a fifth with matched-variant precision vs random when ``metrics`` has it."""
    has_vp = bool(metrics) and metrics.get("random_precision") is not None
    fig, axes = plt.subplots(1, 5 if has_vp else 4, figsize=(4.2 * (5 if has_vp else 4), 3.6))
    ct = class_table(records, descriptions)
    use = usage_table(records, descriptions)
    m = margins(records)
    s1 = np.array([r["scores"][0] for r in records if r.get("scores")], dtype=float)

    ax = axes[0]
    x = np.arange(len(ct))
    ax.bar(x, ct["n_descriptions"], color="#d9d9d9", label="available")
    ax.bar(x, ct["distinct_topk"], color="#6baed6", label="used in top-k")
    ax.bar(x, ct["distinct_top1"], color="#08519c", label="used at top-1")
    ax.set_xticks(x if len(ct) <= 25 else [])
    ax.set_xticklabels(ct["class"] if len(ct) <= 25 else [], rotation=90, fontsize=7)
    ax.set_ylabel("descriptions")
    ax.set_title("distinct descriptions per class")
    ax.legend(fontsize=7)

    ax = axes[1]
    top = int(use["n_topk"].max()) if len(use) else 1
    ax.hist([use["n_top1"], use["n_topk"]], bins=min(30, max(top, 1) + 1), label=["top-1", "top-k"],
            color=["#08519c", "#6baed6"])
    ax.set_xlabel("images matched to a description")
    ax.set_ylabel("descriptions")
    ax.set_title("description usage")
    ax.legend(fontsize=7)

    ax = axes[2]
    mm = m[np.isfinite(m)]
    ax.hist(mm, bins=30, color="#31a354")
    ax.set_xlabel("top-1 − top-2 cosine")
    ax.set_title(f"score margins (median {np.median(mm):.4f})" if len(mm) else "score margins (no scores)")

    ax = axes[3]
    ax.hist(s1, bins=30, color="#756bb1")
    if len(s1):
        q = np.quantile(s1, 0.05)
        ax.axvline(q, color="k", ls="--", lw=1, label=f"5% weakest < {q:.3f}")
        ax.legend(fontsize=7)
    ax.set_xlabel("top-1 cosine")
    ax.set_title("best-match scores")

    if has_vp:
        ax = axes[4]
        keys = [("variant_precision", "matched (top-1)"), ("variant_precision_topk", "matched (top-k)"),
                ("random_precision", "random")]
        vals = [metrics.get(key) for key, _ in keys]
        vals = [np.nan if v is None else float(v) for v in vals]  # None: nothing variant-specific was picked
        ax.bar([lab for _, lab in keys], np.nan_to_num(vals), color=["#08519c", "#6baed6", "#bdbdbd"])
        for i, v in enumerate(vals):
            ax.text(i, 0.03, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=8,
                    color="k" if np.isnan(v) or v < 0.08 else "w")
        ci = metrics.get("variant_precision_ci95")
        if ci and not np.isnan(vals[0]):  # Wilson 95% interval: how many picks back the top-1 figure
            # clipped at 0: at a precision of 1 the interval's float upper end can fall a hair below it
            ax.errorbar([0], [vals[0]], yerr=[[max(0.0, vals[0] - ci[0])], [max(0.0, ci[1] - vals[0])]], color="k",
                        capsize=4, lw=1)
        ax.set_ylim(0, 1.05)
        n1 = metrics.get("n_top1_variant_specific")
        ax.set_title("variant precision vs truth" + (f" (n={n1})" if n1 is not None else ""))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, tight=True)


def plot_match_examples(records: Sequence[dict], root: str | Path, n: int = 8, k: int = 3, seed: int = 0,
                        path: str | Path | None = None, images: Sequence[str] | None = None):
    """A grid of ``n`` images (random, one class after another) with their top-``k`` captions and scores."""
    by_image = {r["image"]: r for r in records}
    if images is None:
        rng = np.random.default_rng(seed)
        # spread the examples over classes: shuffle, then take round-robin across classes
        per_class: dict[str, list] = {}
        for i in rng.permutation(len(records)):
            per_class.setdefault(records[i]["class"], []).append(records[i]["image"])
        order, queues = [], list(per_class.values())
        while len(order) < min(n, len(records)):
            for q in queues:
                if q and len(order) < n:
                    order.append(q.pop())
        images = order
    cols = min(4, max(1, len(images)))
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, f in zip(axes.ravel(), images):
        r = by_image[f]
        with Image.open(Path(root) / f) as im:
            ax.imshow(to_rgb(im), interpolation="nearest" if max(im.size) < 128 else "antialiased")
        lines = [f"[{r['class']}] {Path(f).name}"]
        for j, cap in enumerate(r["captions"][:k]):
            sc = f"{r['scores'][j]:.3f} " if r.get("scores") else ""
            body = cap.split(": ", 1)[-1]
            lines.append(textwrap.shorten(f"{j + 1}. {sc}{body}", 90, placeholder=" …"))
        ax.set_title("\n".join(textwrap.fill(x, 44) for x in lines), fontsize=7, loc="left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, tight=True)
