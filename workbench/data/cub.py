"""CUB-200-2011: 200 bird species, 11,788 images, with part locations and attribute labels.

Splits: the official train/test split, with ``val_per_class`` training images per class
(default 3, chosen by :func:`workbench.data.splits.carve_val` with ``split_seed``) moved to
val. That gives GIST's counts, 5394/600/5794, though not GIST's exact images: pass GIST's
``metadata.csv`` as ``metadata=`` for those (and ``shots=1|3|5`` for its k-shot files).

``Dataset.root`` is ``<root>/images`` and filenames are as in ``images.txt``
(``001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``), the keys GIST's
``captions_top5.json`` uses. Class names are human-readable as in GIST's ``species`` column
("Black footed Albatross"); the folder name stays in the ``class_folder`` column.

Extras: ``parts`` (one row per image and part: image_id, filename, part_id, part, x, y,
visible; pixel coordinates in the original image), ``part_names``, ``bounding_boxes``,
``attributes`` / ``attribute_certainty`` (image_id x attribute name, int8),
``attribute_names``, ``class_attributes`` (class x attribute, percent of images).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import cached_tensors, file_fingerprint
from ..io import hash_key
from .dataset import Dataset
from .gist import finalize
from .layout import DatasetLayoutError, check_layout, read_table
from .names import humanize
from .splits import carve_val

NAME = "cub"
REQUIRED = ["images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "images/"]
EXPECTED = """\
CUB_200_2011/                    data_root: the folder extracted from CUB_200_2011.tgz
  images.txt                     <image_id> <class folder>/<file>.jpg
  classes.txt                    <class_id> <NNN.Class_name>
  image_class_labels.txt         <image_id> <class_id>
  train_test_split.txt           <image_id> <1 train | 0 test>
  images/<NNN.Class_name>/<file>.jpg
  bounding_boxes.txt             optional: <image_id> <x> <y> <width> <height>
  parts/parts.txt                optional: <part_id> <part name>
  parts/part_locs.txt            optional: <image_id> <part_id> <x> <y> <visible>
  attributes/image_attribute_labels.txt   optional: <image_id> <attribute_id> <is_present> <certainty_id> <time>
  attributes.txt                 optional, here or one level up: <attribute_id> <attribute name>"""


def _check_ids(name, what, ids_have, ids_need):
    missing = sorted(set(ids_need) - set(ids_have))
    if missing:
        raise DatasetLayoutError(f"{name}: {what} has no entry for {len(missing)} image id(s), e.g. {missing[:5]}")


def load(
    root,
    metadata=None,
    shots=None,
    val_per_class: int = 3,
    split_seed: int = 0,
    attributes: bool = True,
    parts: bool = True,
    skip_missing: bool = False,
) -> Dataset:
    """Load CUB-200-2011 from ``root`` (the ``CUB_200_2011`` folder). See the module docstring."""
    root = check_layout(NAME, root, REQUIRED, EXPECTED)
    images = read_table(NAME, root / "images.txt", [("image_id", int), ("path", str)])
    classes = read_table(NAME, root / "classes.txt", [("class_id", int), ("class_name", str)])
    labels = dict(read_table(NAME, root / "image_class_labels.txt", [("image_id", int), ("class_id", int)]))
    is_train = dict(read_table(NAME, root / "train_test_split.txt", [("image_id", int), ("is_training_image", int)]))
    ids = [i for i, _ in images]
    _check_ids(NAME, "image_class_labels.txt", labels, ids)
    _check_ids(NAME, "train_test_split.txt", is_train, ids)

    classes.sort()
    class_index = {cid: i for i, (cid, _) in enumerate(classes)}
    unknown = sorted({labels[i] for i in ids} - set(class_index))
    if unknown:
        raise DatasetLayoutError(f"{NAME}: image_class_labels.txt uses class id(s) {unknown[:5]} missing from classes.txt")
    folders = [c for _, c in classes]
    classnames = [humanize(c) for c in folders]
    label = np.array([class_index[labels[i]] for i in ids], dtype=np.int64)
    table = pd.DataFrame(
        {
            "image_id": ids,
            "filename": [p for _, p in images],
            "split": ["train" if is_train[i] == 1 else "test" for i in ids],
            "label": label,
            "species": [classnames[l] for l in label],
            "class_folder": [folders[l] for l in label],
        }
    )
    if metadata is None:
        table = carve_val(table, per_class=val_per_class, seed=split_seed)

    extras = {}
    if (root / "bounding_boxes.txt").is_file():
        cols = [("image_id", int), ("x", float), ("y", float), ("width", float), ("height", float)]
        extras["bounding_boxes"] = pd.DataFrame(read_table(NAME, root / "bounding_boxes.txt", cols), columns=[c for c, _ in cols])
    if parts and (root / "parts" / "parts.txt").is_file() and (root / "parts" / "part_locs.txt").is_file():
        extras.update(_read_parts(root, dict(zip(ids, table["filename"]))))
    if attributes:
        extras.update(_read_attributes(root, classnames))
    return finalize(
        NAME, root / "images", table, classnames, extras,
        dataset_root=root, metadata=metadata, shots=shots, skip_missing=skip_missing,
    )


def _read_parts(root: Path, filenames: dict[int, str]) -> dict:
    names = dict(read_table(NAME, root / "parts" / "parts.txt", [("part_id", int), ("part", str)], "parts/parts.txt"))
    cols = ["image_id", "part_id", "x", "y", "visible"]
    try:  # 15 rows per image: pandas, not Python
        df = pd.read_csv(root / "parts" / "part_locs.txt", sep=r"\s+", header=None, names=cols, engine="c")
        df = df.astype({"image_id": np.int64, "part_id": np.int64, "x": float, "y": float, "visible": float})
    except Exception as e:  # malformed text or missing fields (NaN to int)
        raise DatasetLayoutError(f"{NAME}: parts/part_locs.txt cannot be parsed ('<image_id> <part_id> <x> <y> <visible>'): {e}") from None
    df["visible"] = df["visible"].astype(bool)
    df.insert(1, "filename", df["image_id"].map(filenames))
    df.insert(3, "part", df["part_id"].map(names))
    return {"parts": df, "part_names": [names[k] for k in sorted(names)]}


def _read_attributes(root: Path, classnames: list[str]) -> dict:
    labels_path = root / "attributes" / "image_attribute_labels.txt"
    if not labels_path.is_file():
        return {}
    # The tarball puts attributes.txt next to CUB_200_2011/, not inside it.
    names = {}
    for cand in (root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt"):
        if cand.is_file():
            names = dict(read_table(NAME, cand, [("attribute_id", int), ("attribute", str)], "attributes.txt"))
            break
    # ~3.7M rows take seconds to parse and every stage loads the dataset: parse once, cache.
    key = hash_key("cub-attributes-v1", file_fingerprint([labels_path]))
    t = cached_tensors("datasets", key, lambda: _parse_attribute_labels(labels_path))
    image_ids, present, certainty = (t[k].numpy() for k in ("image_ids", "present", "certainty"))
    n_attr = present.shape[1]
    if names and max(names) > n_attr:
        pad = np.zeros((len(image_ids), max(names) - n_attr), dtype=np.int8)
        present, certainty, n_attr = np.hstack([present, pad]), np.hstack([certainty, pad]), max(names)
    attr_names = [names.get(a, f"attribute_{a}") for a in range(1, n_attr + 1)]
    idx = pd.Index(image_ids, name="image_id")
    out = {
        "attribute_names": attr_names,
        "attributes": pd.DataFrame(present, index=idx, columns=attr_names),
        "attribute_certainty": pd.DataFrame(certainty, index=idx, columns=attr_names),
    }
    cont = root / "attributes" / "class_attribute_labels_continuous.txt"
    if cont.is_file():
        mat = np.loadtxt(cont, ndmin=2)
        if mat.shape == (len(classnames), n_attr):
            out["class_attributes"] = pd.DataFrame(mat, index=classnames, columns=attr_names)
    return out


def _parse_attribute_labels(path: Path) -> dict:
    """``image_attribute_labels.txt`` -> image ids and dense (image x attribute) int8 matrices."""
    # A few rows of the released file carry an extra field: read 6 columns, use the first four.
    df = None
    for sep in (" ", r"\s+"):  # single spaces in the release; the one-char separator is faster
        try:
            df = pd.read_csv(path, sep=sep, header=None, names=range(6), engine="c").iloc[:, :4]
            if not df.isna().any().any():
                break
        except Exception as e:  # pandas raises several types for malformed text
            err = e
    else:
        detail = err if df is None else "rows with fewer than 4 fields"
        raise DatasetLayoutError(f"{NAME}: attributes/image_attribute_labels.txt cannot be parsed: {detail}")
    df = df.astype(np.int64)
    image_ids = np.sort(df[0].unique())
    row = np.searchsorted(image_ids, df[0].to_numpy())
    n_attr = int(df[1].max())
    present = np.zeros((len(image_ids), n_attr), dtype=np.int8)
    certainty = np.zeros((len(image_ids), n_attr), dtype=np.int8)
    present[row, df[1].to_numpy() - 1] = df[2].to_numpy()
    certainty[row, df[1].to_numpy() - 1] = df[3].to_numpy()
    return {"image_ids": torch.from_numpy(image_ids), "present": torch.from_numpy(present),
            "certainty": torch.from_numpy(certainty)}
