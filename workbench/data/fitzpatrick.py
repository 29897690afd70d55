"""Fitzpatrick40: 40 skin conditions selected and cleaned by GIST from Fitzpatrick17k.

The images and ``fitzpatrick17k.csv`` come from the Fitzpatrick17k release (images saved as
``<md5hash>.jpg``, as its download script does). The selection (which images, split, label,
species; GIST: 2115/222/272 over 40 conditions) is GIST's ``metadata.csv``, required:
``metadata=`` names it (default ``metadata.csv`` in the root). Fitzpatrick17k's columns
(``fitzpatrick_scale``, ``three_partition_label``, ``url``, ...) are kept in the table.
``Dataset.root`` is the images folder.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .dataset import Dataset
from .gist import finalize
from .layout import DatasetLayoutError, check_layout

NAME = "fitzpatrick40"
EXPECTED = """\
fitzpatrick17k/              data_root
  fitzpatrick17k.csv         the Fitzpatrick17k table: md5hash, label, fitzpatrick_scale, ...
  images/<md5hash>.jpg       the downloaded images
  metadata.csv               GIST's Fitzpatrick40 selection: filename, split, label, species
  metadata_{1,3,5}shot.csv   optional k-shot files"""


def load(
    root,
    metadata="metadata.csv",
    shots=None,
    csv: str = "fitzpatrick17k.csv",
    images: str = "images",
    extension: str = ".jpg",
    skip_missing: bool = False,
) -> Dataset:
    """Load Fitzpatrick40 from ``root``. See the module docstring."""
    if metadata is None:
        raise DatasetLayoutError(
            f"{NAME}: the Fitzpatrick40 selection is a metadata file; set dataset_options.metadata "
            f"(GIST's metadata.csv).\nExpected layout:\n{EXPECTED}"
        )
    required = [csv, f"{images}/"]
    m = Path(metadata).expanduser()
    if not m.is_absolute() and not (Path.cwd() / m).is_file():
        required.append(str(metadata))  # reported together with the rest of the layout
    root = check_layout(NAME, root, required, EXPECTED)
    df = pd.read_csv(root / csv)
    missing = [c for c in ("md5hash", "label") if c not in df.columns]
    if missing:
        raise DatasetLayoutError(f"{NAME}: {csv} lacks column(s) {missing}; it has {list(df.columns)}")
    if df["md5hash"].duplicated().any():
        df = df.drop_duplicates("md5hash")
    df["label"] = df["label"].astype(str).str.strip()
    classnames = sorted(df["label"].unique())
    index = {c: i for i, c in enumerate(classnames)}
    table = df.drop(columns=["label"]).assign(
        filename=df["md5hash"].astype(str) + extension,
        split="train",  # replaced by the metadata file's split
        label=df["label"].map(index),
        species=df["label"],
    )
    return finalize(
        NAME, root / images, table.reset_index(drop=True), classnames,
        dataset_root=root, metadata=metadata, shots=shots, skip_missing=skip_missing,
    )
