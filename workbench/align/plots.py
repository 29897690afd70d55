"""Alignment figures: per-word overlays on one shared colour scale, FILIP's argmax-token map,
before/after fine-tuning, and pointing-game bars. Saved as ``run_dir/figures/align_<what>.png``.

Maps on a figure share one labelled scale: per-map min-max would make a word that is absent from
the image look as hot as one that is present.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import Normalize

from ..plots import save_figure

SIM_LABEL = "cosine similarity (word token · patch)"


def _img(image) -> np.ndarray:
    x = torch.as_tensor(image)
    if x.ndim == 3 and x.shape[0] == 3:
        x = x.permute(1, 2, 0)
    x = x.cpu().numpy()
    return x if x.dtype == np.uint8 else np.clip(x, 0, 1)


def shared_norm(maps, vmin: float | None = None, vmax: float | None = None) -> Normalize:
    """One colour scale spanning all ``maps`` (NaN ignored)."""
    vals = torch.cat([torch.as_tensor(m, dtype=torch.float32).flatten() for m in maps])
    vals = vals[~vals.isnan()]
    lo = vals.min().item() if vmin is None else vmin
    hi = vals.max().item() if vmax is None else vmax
    return Normalize(lo, hi if hi > lo else lo + 1e-6)


def overlay(ax, image, m, norm: Normalize, cmap: str = "inferno", alpha: float = 0.6, title: str | None = None):
    """Show ``image`` with the ``gh x gw`` map ``m`` over it (one cell per patch, no smoothing)."""
    img = _img(image)
    h, w = img.shape[:2]
    ax.imshow(img)
    im = ax.imshow(torch.as_tensor(m).float().numpy(), cmap=cmap, norm=norm, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return im


def _grid(n: int, ncols: int, nrows: int | None = None, size: float = 1.8, extra_w: float = 1.0, title_h: float = 0.4):
    """``nrows x ncols`` panels of ``size`` inches, ``title_h`` inches above each row for panel titles,
    room for a suptitle on top and a colour bar (``extra_w``) on the right."""
    ncols = max(1, min(ncols, n))
    nrows = nrows or -(-n // ncols)
    w, h = size * ncols + extra_w + 0.3, (size + title_h) * nrows + 0.4
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False)
    # fixed margins instead of constrained layout: several times faster to draw for big grids
    fig.subplots_adjust(left=0.3 / w, right=1 - extra_w / w, top=1 - (0.4 + title_h) / h, bottom=0.05 / h,
                        wspace=0.08, hspace=title_h / size)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_word_maps(image, maps: dict[str, torch.Tensor], title: str = "", label: str = SIM_LABEL, ncols: int = 6, norm: Normalize | None = None):
    """The image, then one overlay per word, all on one colour scale with a labelled colour bar."""
    norm = norm or shared_norm(list(maps.values()))
    fig, axes = _grid(len(maps) + 1, ncols)
    axes.flat[0].imshow(_img(image))
    axes.flat[0].set_title("image", fontsize=9)
    axes.flat[0].axis("off")
    im = None
    for ax, (word, m) in zip(axes.flat[1:], maps.items()):
        peak = torch.as_tensor(m).float().nan_to_num(nan=float("-inf")).max().item()
        im = overlay(ax, image, m, norm, title=f"{word}\nmax {peak:.2f}")
    _side_colorbar(fig, im, label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _side_colorbar(fig, im, label: str):
    w = fig.get_figwidth()
    cax = fig.add_axes([1 - 0.75 / w, 0.12, 0.12 / w, 0.7])
    fig.colorbar(im, cax=cax, label=label)


def plot_argmax_tokens(image, argmax: torch.Tensor, pieces: list[str], highlight: list[int] = (), title: str = ""):
    """FILIP's word-patch plot: each patch shows the index of its most similar token.

    Class-name tokens (``highlight`` positions) are drawn in red with a red frame; the legend maps
    indices to word pieces.
    """
    img = _img(image)
    h, w = img.shape[:2]
    gh, gw = argmax.shape
    ph, pw = h / gh, w / gw
    used = sorted(set(argmax.flatten().tolist()))
    cmap = matplotlib.colormaps["tab20"]
    colour = {t: cmap(i % 20) for i, t in enumerate(used)}
    fig, (ax, lax) = plt.subplots(1, 2, figsize=(7.5, 4.2), gridspec_kw={"width_ratios": [3, 1.4]})
    ax.imshow(img, extent=(0, w, h, 0))
    highlight = set(highlight)
    for i in range(gh):
        for j in range(gw):
            t = int(argmax[i, j])
            hot = t in highlight
            ax.add_patch(matplotlib.patches.Rectangle((j * pw, i * ph), pw, ph, facecolor=colour[t], alpha=0.35, edgecolor="red" if hot else "none", lw=1.5 if hot else 0))
            ax.text((j + 0.5) * pw, (i + 0.5) * ph, str(t), ha="center", va="center", fontsize=7,
                    color="red" if hot else "white", fontweight="bold" if hot else "normal")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "most similar token per patch", fontsize=9)
    lax.axis("off")
    lines = [(t, pieces[t].removesuffix("</w>")) for t in range(len(pieces))]
    for k, (t, p) in enumerate(lines):
        hot = t in highlight
        lax.text(0, 1 - k / max(len(lines), 18), f"{t:>2} {p}" + ("  (class)" if hot else "") + ("" if t in used else "  ·"),
                 transform=lax.transAxes, fontsize=7, family="monospace", color="red" if hot else "black",
                 fontweight="bold" if t in used else "normal", va="top")
    lax.set_title("tokens (bold: chosen by a patch)", fontsize=8)
    return fig


def plot_before_after(image, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], words: list[str] | None = None,
                      label: str = SIM_LABEL, title: str = "", ncols: int = 7):
    """Pretrained (upper row of each pair) vs fine-tuned (lower row) maps per word, one colour scale
    for all panels; long captions wrap into several row pairs of ``ncols`` words."""
    words = words or [w for w in before if w in after]
    if not words:
        raise ValueError("no word common to both sets of maps")
    norm = shared_norm([before[w] for w in words] + [after[w] for w in words])
    ncols = min(ncols, len(words))
    pairs = -(-len(words) // ncols)
    fig, axes = _grid(2 * pairs * ncols, ncols, nrows=2 * pairs, title_h=0.25)
    im = None
    for k, w in enumerate(words):
        r, c = 2 * (k // ncols), k % ncols
        im = overlay(axes[r, c], image, before[w], norm, title=w)
        overlay(axes[r + 1, c], image, after[w], norm)
        if c == 0:
            axes[r, c].set_ylabel("pretrained", fontsize=9)
            axes[r + 1, c].set_ylabel("fine-tuned", fontsize=9)
    for k in range(len(words), pairs * ncols):  # empty cells of the last pair
        axes[2 * (k // ncols), k % ncols].axis("off")
        axes[2 * (k // ncols) + 1, k % ncols].axis("off")
    _side_colorbar(fig, im, label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_method_maps(image, maps: dict[str, torch.Tensor], title: str = ""):
    """One overlay per method (the default dense map, similarity, rollout, relevance), each with its own labelled scale:
    the methods' units differ, so a shared scale across them would mean nothing."""
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.0), squeeze=False, layout="constrained")
    for ax, (name, m) in zip(axes.flat, maps.items()):
        im = overlay(ax, image, m, shared_norm([m]), title=name)
        label = "rollout weight" if name.startswith("rollout") else "relevance" if name.startswith("relevance") else "cosine"
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_query_grid(rows: list[tuple], method: str, title: str = ""):
    """The maps of one method for a few images, several part queries each, with the queried part's
    outline: ``rows`` of ``(image, [(caption, word, map, region S x S bool), ...])``. Each row shares one
    colour scale (a query the model does not see stays dark against the others)."""
    ncols = 1 + max(len(q) for _, q in rows)
    fig, axes = _grid(len(rows) * ncols, ncols, nrows=len(rows), size=2.0, extra_w=0.2, title_h=0.45)
    for r, (image, queries) in enumerate(rows):
        overlay(axes[r, 0], image, torch.full((1, 1), float("nan")), Normalize(0, 1), title="image")
        norm = shared_norm([m for _, _, m, _ in queries])
        for c, (caption, word, m, region) in enumerate(queries, start=1):
            ax = axes[r, c]
            overlay(ax, image, m, norm, title=f"{word}\n{caption}" if len(caption) < 34 else f"{word}\n{caption[:31]}...")
            ax.contour(torch.as_tensor(region).float().numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.title.set_fontsize(7)
        for c in range(1 + len(queries), ncols):
            axes[r, c].axis("off")
    fig.suptitle(title or f"{method}: the named part outlined", fontsize=10)
    return fig


def plot_pointing(results: dict[str, dict[str, dict]], title: str = "pointing game"):
    """Bars per method and model (pretrained / fine-tuned; the baselines that read no alignment, e.g. the
    part-location prior, as ``baseline``) with each one's chance level as a tick."""
    methods = list(results)
    models = [m for m in ("pretrained", "finetuned", "baseline") if any(m in results[k] for k in methods)]
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.2))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs = np.arange(len(methods)) + (i - (len(models) - 1) / 2) * width
        s = [results[m].get(model, {}).get("score", np.nan) for m in methods]
        c = [results[m].get(model, {}).get("chance", np.nan) for m in methods]
        ci = [results[m].get(model, {}).get("score_ci95") or (v, v) for m, v in zip(methods, s)]
        ax.bar(xs, s, width * 0.9, label=model,
               yerr=[[v - lo for v, (lo, _) in zip(s, ci)], [hi - v for v, (_, hi) in zip(s, ci)]], capsize=3)
        o = [results[m].get(model, {}).get("other_parts") for m in methods]
        ax.scatter(xs, c, marker="_", s=300, color="black", zorder=3, label="chance" if i == 0 else None)
        ax.scatter(xs, [np.nan if v is None else v for v in o], marker="x", color="dimgray", zorder=3,
                   label="hit on another part (control)" if i == 0 else None)
    def label(m):
        r = next(iter(results[m].values()), {})
        if r.get("image_agnostic"):
            return f"{m}\n(no image-text alignment)"
        return m if r.get("word_specific", True) else f"{m}\n(same map for every caption)"

    ax.set_xticks(np.arange(len(methods)), [label(m) for m in methods])
    ax.set_ylim(0, 1)
    ax.set_ylabel("hit rate (hottest patch in part)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, run_dir: str | Path, what: str) -> Path:
    """Save as ``run_dir/figures/align_<what>.png``; returns the path."""
    path = Path(run_dir) / "figures" / f"align_{what}.png"
    save_figure(fig, path, dpi=100, tight=True)
    return path
