"""Figures of the pretrain stage's benchmark: sample images of the synthetic birds with their part masks."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from PIL import Image

from ..data import Dataset
from ..data.synthetic import PARTS


def plot_samples(ds: Dataset, n_species: int = 6, per_species: int = 4, split: str = "train"):
    """Grid of images (rows: species; columns: images, alternating variants) with part outlines."""
    t = ds.table[ds.table["split"] == split]
    labels = sorted(t["label"].unique())[:n_species]
    cmap = ListedColormap(["none", "#999999", "#e41a1c", "#ff7f00", "#000000", "#377eb8", "#4daf4a", "#984ea3", "#a65628"])
    fig, axes = plt.subplots(len(labels), 2 * per_species, figsize=(2 * per_species * 1.1, len(labels) * 1.2), squeeze=False)
    for r, lab in enumerate(labels):
        rows = t[t["label"] == lab].head(per_species)
        for c, row in enumerate(rows.itertuples()):
            img = np.asarray(Image.open(ds.root / row.filename))
            parts = ds.extras["part_mask"](row.filename)
            axes[r, 2 * c].imshow(img)
            axes[r, 2 * c].set_title(row.variant, fontsize=6)
            axes[r, 2 * c + 1].imshow(img, alpha=0.35)
            axes[r, 2 * c + 1].imshow(np.ma.masked_equal(parts, 0), cmap=cmap, vmin=0, vmax=len(PARTS) - 1,
                                      interpolation="nearest", alpha=0.8)
        axes[r, 0].set_ylabel(ds.classnames[lab].replace(" ", "\n"), fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(1, len(PARTS))]
    fig.legend(handles, PARTS[1:], loc="lower center", ncol=len(PARTS) - 1, fontsize=7, frameon=False)
    fig.suptitle("synthetic birds: images and part masks", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig
