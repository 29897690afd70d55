"""Oxford Flowers-102: 8,189 images of 102 flower species.

Splits: the official ``setid.mat`` (1020 train / 1020 val / 6149 test). GIST used its own
split (4093/1633/2463): pass its ``metadata.csv`` as ``metadata=``. Class names come from
the list shipped with the package (``flowers102_classes.txt``, the names used by CLIP and
torchvision, lower case) unless ``classnames=<text file, one per line>`` or a metadata CSV
with a ``species`` column gives others; the classes are the labels that occur in
``imagelabels.mat``, in list order. ``Dataset.root`` is ``<root>/jpg``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.io import loadmat

from .dataset import Dataset
from .gist import finalize, resolve_file
from .layout import DatasetLayoutError, check_layout

NAME = "flowers"
CLASSNAMES_FILE = Path(__file__).with_name("flowers102_classes.txt")
REQUIRED = ["jpg/", "imagelabels.mat", "setid.mat"]
EXPECTED = """\
flowers-102/                 data_root: the folder holding the three downloads
  jpg/image_00001.jpg ...    from 102flowers.tgz
  imagelabels.mat            'labels': class (1..102) of image i
  setid.mat                  'trnid', 'valid', 'tstid': image numbers per split"""
SPLIT_KEYS = {"trnid": "train", "valid": "val", "tstid": "test"}


def read_classnames(path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load(root, metadata=None, shots=None, classnames=None, skip_missing: bool = False) -> Dataset:
    """Load Flowers-102 from ``root``. See the module docstring."""

    root = check_layout(NAME, root, REQUIRED, EXPECTED)
    labels = loadmat(root / "imagelabels.mat", squeeze_me=True).get("labels")
    setid = loadmat(root / "setid.mat", squeeze_me=True)
    missing = [k for k in SPLIT_KEYS if k not in setid]
    if labels is None or missing:
        what = (["'labels' in imagelabels.mat"] if labels is None else []) + [f"'{k}' in setid.mat" for k in missing]
        raise DatasetLayoutError(f"{NAME}: missing {', '.join(what)}\nExpected layout:\n{EXPECTED}")
    labels = np.atleast_1d(labels).astype(np.int64) - 1  # 1-based in the .mat file
    names = read_classnames(resolve_file(NAME, root, classnames, "class-name file") if classnames else CLASSNAMES_FILE)
    if labels.min() < 0 or labels.max() >= len(names):
        raise DatasetLayoutError(f"{NAME}: imagelabels.mat has labels 1..{labels.max() + 1} but there are {len(names)} class names")

    rows = []
    for key, split in SPLIT_KEYS.items():
        for i in np.atleast_1d(setid[key]).astype(np.int64):
            if not 1 <= i <= len(labels):
                raise DatasetLayoutError(f"{NAME}: setid.mat '{key}' lists image {i}, but imagelabels.mat has {len(labels)} images")
            rows.append((int(i), f"image_{i:05d}.jpg", split, int(labels[i - 1])))
    table = pd.DataFrame(rows, columns=["image_id", "filename", "split", "label"]).sort_values("image_id", kind="stable")
    if table["image_id"].duplicated().any():
        raise DatasetLayoutError(f"{NAME}: setid.mat lists some images in more than one split")
    # Classes are the labels that occur (all 102 in the real release), in list order.
    present = sorted(table["label"].unique())
    table["species"] = [names[l] for l in table["label"]]
    table["label"] = table["label"].map({l: i for i, l in enumerate(present)})
    return finalize(
        NAME, root / "jpg", table.reset_index(drop=True), [names[l] for l in present],
        dataset_root=root, metadata=metadata, shots=shots, skip_missing=skip_missing,
    )
