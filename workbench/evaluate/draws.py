"""Image features for a whole dataset (encoded once, cached on disk) and the training-set draws
(full, k-shot by seed, or a GIST ``metadata_<k>shot.csv`` as a fixed draw) that index into them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..clip import image_features
from ..data import Dataset, DrawSpec, parse_shots, train_images_sha256


def dataset_features(bundle, ds: Dataset, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Raw (unnormalised) float32 image embeddings, one row per row of ``ds.table``, from the one
    feature cache (:func:`workbench.clip.image_features`: keyed by the weights themselves, the files
    and the preprocessing)."""
    if not len(ds.table):
        raise ValueError(f"dataset {ds.name!r} has no images")
    return image_features(bundle, ds.paths(), batch_size=batch_size, progress=progress)


def rows_in(full: Dataset, part: Dataset) -> np.ndarray:
    """Positions in ``full.table`` of the rows of ``part.table`` (matched by filename)."""
    index = pd.Index(full.table["filename"])
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"dataset {full.name!r} has duplicate filenames, e.g. {dup}")
    pos = index.get_indexer(part.table["filename"])
    if (pos < 0).any():
        missing = part.table["filename"][pos < 0].head(5).tolist()
        raise ValueError(f"{int((pos < 0).sum())} file(s) are not in dataset {full.name!r}, e.g. {missing}")
    return pos


@dataclass
class Draw:
    """One training set: positions (into the full table) of its train, val and test rows."""

    shots: str | int
    seed: int
    source: str  # "all", "seed", or the split file's path
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_policy: str = "full"
    train_sha256: str = ""  # workbench.data.train_images_sha256 of the training rows


def make_draw(ds: Dataset, shots, seed: int = 0, spec: DrawSpec | None = None) -> Draw:
    """The training set for ``shots`` (``"full"`` or k) and ``seed``, drawn by ``spec`` (the rule
    fine-tuning draws by: shot files, validation policy, base seed)."""
    spec = spec or DrawSpec()
    sub = spec.subset(ds, shots, seed)
    source = "all" if shots == "full" else str(spec.shot_file(ds, shots) or "seed")
    pos = rows_in(ds, sub)
    split = sub.table["split"].to_numpy()
    parts = {s: pos[split == s] for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if len(parts[s]) == 0:
            raise ValueError(f"dataset {ds.name!r} has no {s} images")
    if len(parts["val"]) == 0:
        raise ValueError(f"dataset {ds.name!r} has no val images: the probe's weight decay is chosen on val")
    policy = "full" if shots == "full" else spec.val_policy
    return Draw(shots, seed, source, parts["train"], parts["val"], parts["test"], policy, train_images_sha256(sub))


def check_draws(ds: Dataset, shots, seeds, spec: DrawSpec | None = None) -> list[Draw]:
    """Build every draw the evaluation will use, so a k larger than a class has, a missing or wrong
    split file, or an empty split fails before any model loads."""
    spec = spec or DrawSpec()  # shot files of shots not evaluated here are not read (fine-tuning may use them)
    if not seeds:
        raise ValueError("seeds is empty")
    return [make_draw(ds, s, int(seed), spec) for s in parse_shots(shots) for seed in spec.seeds_for(s, seeds)]
