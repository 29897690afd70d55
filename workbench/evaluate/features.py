"""Image features for a whole dataset (encoded once, cached on disk) and the training-set draws
(full, k-shot by seed, or a GIST ``metadata_<k>shot.csv`` as a fixed draw) that index into them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import cached_tensors, file_fingerprint, hash_key
from ..data import Dataset, few_shot


def image_features(bundle, ds: Dataset, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Raw (unnormalised) float32 image embeddings, one row per row of ``ds.table``.

    Images are decoded once through the uint8 image cache, centre-cropped at the model's input size,
    and encoded with :func:`workbench.models.encode_images`. The result is cached keyed by the
    model's weights (``bundle.model_id``), the files' fingerprint and the preprocessing; device type
    is part of the key because GPU encoding runs under bf16 autocast.
    """
    import open_clip

    from ..data.images import image_cache
    from ..models import _model_device, encode_images, image_size

    model = bundle.model
    paths = [str(p) for p in ds.paths()]
    if not paths:
        raise ValueError(f"dataset {ds.name!r} has no images")
    size = image_size(model)
    device = _model_device(model)
    prep = {"size": size, "crop": "center", "cfg": open_clip.get_model_preprocess_cfg(model), "device": device.type}
    key = hash_key("features-v1", bundle.model_id, file_fingerprint(paths), prep)

    def compute():
        images = image_cache(paths, size, progress=progress)
        return {"features": encode_images(model, images, batch_size=batch_size, normalize=False, progress=progress)}

    return cached_tensors("features", key, compute)["features"].float()


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


def load_shot_file(ds: Dataset, path: str | Path, k: int | None = None) -> Dataset:
    """A GIST-style k-shot CSV (columns ``filename, split``; its train rows are the draw) as a Dataset.

    Training rows become the file's training images; val/test stay those of ``ds``. Checks that every
    file is in ``ds`` and, when ``k`` is given, that every class has exactly ``k`` training images.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"few-shot split file not found: {path}")
    table = pd.read_csv(path)
    missing = [c for c in ("filename", "split") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: split file lacks columns {missing}; GIST files have filename, split, label, species")
    names = set(table.loc[table["split"] == "train", "filename"])
    train = ds.table[ds.table["split"] == "train"]
    unknown = names - set(train["filename"])
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} training file(s) are not training images of {ds.name!r}, e.g. {sorted(unknown)[:5]}")
    keep = train[train["filename"].isin(names)]
    if k is not None:
        counts = keep.groupby("label").size().reindex(range(ds.num_classes), fill_value=0)
        bad = counts[counts != k]
        if len(bad):
            raise ValueError(
                f"{path}: a {k}-shot file must keep exactly {k} training images per class; "
                + ", ".join(f"{ds.classnames[i]} has {n}" for i, n in bad.head(10).items())
            )
    others = ds.table[ds.table["split"] != "train"]
    return replace(ds, table=pd.concat([keep, others]).reset_index(drop=True))


@dataclass
class Draw:
    """One training set: positions (into the full table) of its train, val and test rows."""

    shots: str | int
    seed: int
    source: str  # "all", "seed", or the split file's path
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_draw(ds: Dataset, shots, seed: int = 0, shot_file: str | Path | None = None) -> Draw:
    """The training set for ``shots`` (``"full"`` or k) and ``seed``; a ``shot_file`` fixes the draw."""
    if shots == "full":
        sub, source = ds, "all"
    elif shot_file is not None:
        sub, source = load_shot_file(ds, shot_file, int(shots)), str(shot_file)
    else:
        sub, source = few_shot(ds, int(shots), seed), "seed"
    pos = rows_in(ds, sub)
    split = sub.table["split"].to_numpy()
    parts = {s: pos[split == s] for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if len(parts[s]) == 0:
            raise ValueError(f"dataset {ds.name!r} has no {s} images")
    if len(parts["val"]) == 0:
        raise ValueError(f"dataset {ds.name!r} has no val images: the probe's weight decay is chosen on val")
    return Draw(shots, seed, source, parts["train"], parts["val"], parts["test"])


def check_draws(ds: Dataset, shots, seeds, shot_files: dict | None = None) -> list[Draw]:
    """Build every draw the evaluation will use, so a k larger than a class has, a missing or wrong
    split file, or an empty split fails before any model loads."""
    shot_files = {str(k): v for k, v in (shot_files or {}).items()}
    unknown = sorted(set(shot_files) - {str(s) for s in parse_shots(shots)})
    if unknown:
        raise ValueError(f"shot_files has entries for shots {unknown} that are not in shots {list(shots)}")
    if not seeds:
        raise ValueError("seeds is empty")
    return [make_draw(ds, s, int(seed), shot_files.get(str(s))) for s in parse_shots(shots) for seed in seeds]


def parse_shots(shots) -> list:
    """Normalise a shots list: ``"full"`` stays, numbers (or numeric strings) become positive ints."""
    out = []
    for s in shots:
        if s in ("full", None):
            out.append("full")
            continue
        try:
            k = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"shots must be 'full' or positive integers, got {s!r}") from None
        if k < 1:
            raise ValueError(f"shots must be 'full' or positive integers, got {s!r}")
        out.append(k)
    if len(set(map(str, out))) != len(out):
        raise ValueError(f"shots has duplicates: {list(shots)}")
    return out
