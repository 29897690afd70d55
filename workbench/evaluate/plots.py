"""Figures of the evaluation stage: accuracy bars with bootstrap intervals, the probe's weight-decay sweep."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..plots import save_figure
from .paired import LABELS
from .report import _method_order, _shots_order, seed_summary

COLORS = {"zero-shot": "#9e9e9e", "linear-probe": "#4c72b0", "finetune-classname": "#dd8452", "gist": "#55a868",
          "waffle": "#937860", "random-own-class": "#8172b3", "oracle": "#c44e52"}


def plot_accuracy(rows: list[dict], path: str | Path | None = None, metric: str = "top1", title: str | None = None):
    """Grouped bars (x: shots, one bar per method) at the mean over seeds; each seed drawn as a dot
    with its own 95% bootstrap interval. Zero-shot bars are hatched (they use no training images);
    a white diamond on them marks zero-shot scored by descriptions, when the rows carry it."""
    shots, methods = _shots_order(rows), _method_order(rows)
    summary = {(s["method"], str(s["shots"])): s for s in seed_summary(rows)}
    width = 0.8 / max(1, len(methods))
    desc_label = "zero-shot by descriptions"
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
            desc = runs[0].get(f"desc_{metric}") if sm["zero_shot"] else None
            if desc is not None:  # zero-shot scored by descriptions, drawn on the class-name bar
                ax.plot(x, desc, "D", ms=5, mfc="white", mec="black", label=desc_label)
                desc_label = None
    # Legend in a band above 100%, where no bar reaches.
    ax.legend(fontsize=8, ncol=min(5, len(methods) + 1), loc="upper center", frameon=False, handlelength=1.2)
    ax.set_xticks(range(len(shots)), [s if s == "full" else f"{s}-shot" for s in shots])
    ax.set_ylabel(f"test {metric} accuracy (%)")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title or f"test {metric}: bars = mean over seeds, dots = runs with 95% bootstrap CI", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sweep(rows: list[dict], path: str | Path | None = None):
    """Validation top-1 against weight decay, one panel per shots value, one line per method (its
    first seed's fit); the chosen value is marked. Uses the ``sweep`` that probe rows carry."""
    rows = [r for r in rows if r.get("sweep")]
    if not rows:
        raise ValueError("no probe rows with a weight-decay sweep to plot")
    shots, methods = _shots_order(rows), _method_order(rows)
    fig, axes = plt.subplots(1, len(shots), figsize=(3.2 * len(shots), 2.8), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], shots):
        for j, m in enumerate(methods):
            runs = sorted((r for r in rows if r["method"] == m and str(r["shots"]) == s), key=lambda r: r["seed"])
            if not runs:
                continue
            r = runs[0]
            wd = [w["weight_decay"] for w in r["sweep"]]
            ax.semilogx(wd, [w["val_top1"] for w in r["sweep"]], "o-", ms=3, color=COLORS.get(m, f"C{j}"),
                        label=f"{m} (s{r['seed']})")
            ax.plot([r["weight_decay"]], [r["val_top1"]], "k*", ms=8)
        ax.set_title(s if s == "full" else f"{s}-shot", fontsize=9)
        ax.set_xlabel("weight decay")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val top-1 (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("linear probe: weight-decay sweep on val (* = chosen)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_comparisons(comps: list[dict], path: str | Path | None = None):
    """Forest plot of the paired differences: one line per (shots, pair), the difference in top-1 with its
    95% interval, zero marked; intervals clear of zero are drawn dark. Pairs against zero-shot get a
    panel of their own: on one axis their tens of points would squash the differences between the
    trained methods, which are the ones the paper's claims are about."""
    if not comps:
        raise ValueError("no comparisons to plot")
    panels = [("between trained methods", [c for c in comps if c["b"] != "zero-shot"]),
              ("against zero-shot", [c for c in comps if c["b"] == "zero-shot"])]
    panels = [(t, cs) for t, cs in panels if cs]
    rows = [len(cs) for _, cs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 0.3 * sum(rows) + 1.1 * len(panels)), squeeze=False,
                             gridspec_kw={"height_ratios": rows})
    for ax, (title, cs) in zip(axes[:, 0], panels):
        _forest(ax, cs, f"paired comparisons {title} (dark: interval clear of zero)")
    axes[-1, 0].set_xlabel("difference in test top-1 (points), paired 95% bootstrap interval")
    fig.tight_layout()
    return save_figure(fig, path)


def _forest(ax, comps: list[dict], title: str) -> None:
    order = sorted(comps, key=lambda c: (str(c["shots"]) != "full", int(c["shots"]) if c["shots"] != "full" else 0))
    y = np.arange(len(order))[::-1]
    for yi, c in zip(y, order):
        lo, hi = c["ci95"]
        clear = lo > 0 or hi < 0
        ax.errorbar(c["diff"], yi, xerr=[[c["diff"] - lo], [hi - c["diff"]]], fmt="o", ms=4, capsize=2,
                    color="black" if clear else "#999999")
        ax.text(1.01, yi, f"p = {c['p']:.3g}", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    shots = [c["shots"] if c["shots"] == "full" else f"{c['shots']}-shot" for c in order]
    ax.set_yticks(y, [f"{s}: {LABELS.get(c['a'], c['a'])} − {LABELS.get(c['b'], c['b'])}" for s, c in zip(shots, order)],
                  fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
