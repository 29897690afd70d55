"""Figures of the evaluation stage: accuracy bars with bootstrap intervals, the probe's weight-decay sweep."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bootstrap import seed_summary
from .report import _method_order, _shots_order

COLORS = {"zero-shot": "#9e9e9e", "linear-probe": "#4c72b0", "finetune-classname": "#dd8452", "gist": "#55a868"}


def plot_accuracy(rows: list[dict], path: str | Path | None = None, metric: str = "top1", title: str | None = None):
    """Grouped bars (x: shots, one bar per method) at the mean over seeds; each seed drawn as a dot
    with its own 95% bootstrap interval. Zero-shot bars are hatched (they use no training images)."""
    import matplotlib.pyplot as plt

    shots, methods = _shots_order(rows), _method_order(rows)
    summary = {(s["method"], str(s["shots"])): s for s in seed_summary(rows)}
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(shots) * max(1, len(methods)) / 3, 4))
    for j, m in enumerate(methods):
        label = m
        for i, s in enumerate(shots):
            x = i - 0.4 + width * (j + 0.5)
            sm = summary.get((m, s))
            if sm is None:
                continue
            ax.bar(x, sm[f"{metric}_mean"], width * 0.9, color=COLORS.get(m, f"C{j}"), alpha=0.55,
                   hatch="//" if sm["zero_shot"] else None, edgecolor="white", label=label)
            label = None  # one legend entry per method
            runs = [r for r in rows if r["method"] == m and str(r["shots"]) == s]
            offs = np.linspace(-0.25, 0.25, len(runs)) * width if len(runs) > 1 else [0.0]
            for o, r in zip(offs, runs):
                ci = r.get("ci95" if metric == "top1" else "top3_ci95")
                yerr = None if not ci else [[r[metric] - ci[0]], [ci[1] - r[metric]]]
                ax.errorbar(x + o, r[metric], yerr=yerr, fmt="o", ms=3, color="black", elinewidth=0.8, capsize=2)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(shots)), [s if s == "full" else f"{s}-shot" for s in shots])
    ax.set_ylabel(f"test {metric} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"test {metric}: bars = mean over seeds, dots = runs with 95% bootstrap CI", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def plot_sweep(sweep: list[dict], path: str | Path | None = None, title: str = "linear probe: weight-decay sweep"):
    """Validation top-1 against weight decay for one probe fit (``ProbeResult.sweep``)."""
    import matplotlib.pyplot as plt

    wd = [s["weight_decay"] for s in sweep]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.semilogx(wd, [s["val_top1"] for s in sweep], "o-")
    best = max(sweep, key=lambda s: (s["val_top1"], -s["val_loss"]))
    ax.axvline(best["weight_decay"], color="gray", ls="--", lw=0.8)
    ax.set_xlabel("weight decay")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
