"""FGVC-Aircraft (2013b): 10,000 images, 100 variants / 70 families / 41 manufacturers.

Splits: the official train/val/test files (3334/3333/3333), which GIST uses too. ``level``
picks the class granularity (``variant`` as in the paper, ``family`` or ``manufacturer``);
the other levels become columns when their files are present. Class order is that of
``data/variants.txt`` (``families.txt``, ``manufacturers.txt``). ``Dataset.root`` is
``<root>/data/images`` and filenames are ``<image_id>.jpg``.

The images carry a copyright banner about 20 px tall along the bottom; it is kept.
"""
from __future__ import annotations

import pandas as pd

from .dataset import Dataset
from .gist import finalize
from .layout import DatasetLayoutError, check_layout, read_table

NAME = "aircraft"
LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
SPLITS = ("train", "val", "test")
EXPECTED = """\
fgvc-aircraft-2013b/           data_root: the folder extracted from fgvc-aircraft-2013b.tar.gz
  data/
    variants.txt               one variant name per line (class order)
    images_variant_train.txt   <image_id> <variant>
    images_variant_val.txt
    images_variant_test.txt
    images/<image_id>.jpg
    families.txt, images_family_{train,val,test}.txt              optional (level=family)
    manufacturers.txt, images_manufacturer_{train,val,test}.txt   optional (level=manufacturer)"""


def _required(level: str) -> list[str]:
    return ["data/images/", f"data/{LEVELS[level]}"] + [f"data/images_{level}_{s}.txt" for s in SPLITS]


def _read_level(root, level: str) -> dict[str, str]:
    out = {}
    for s in SPLITS:
        rel = f"data/images_{level}_{s}.txt"
        out.update(read_table(NAME, root / rel, [("image_id", str), (level, str)], rel))
    return out


def load(root, metadata=None, shots=None, level: str = "variant", skip_missing: bool = False) -> Dataset:
    """Load FGVC-Aircraft from ``root``. See the module docstring."""
    if level not in LEVELS:
        raise ValueError(f"{NAME}: level must be one of {list(LEVELS)}, got {level!r}")
    root = check_layout(NAME, root, _required(level), EXPECTED)
    classnames = [l.strip() for l in (root / "data" / LEVELS[level]).read_text(encoding="utf-8").splitlines() if l.strip()]
    index = {c: i for i, c in enumerate(classnames)}
    rows = []
    for s in SPLITS:
        rel = f"data/images_{level}_{s}.txt"
        for image_id, cls in read_table(NAME, root / rel, [("image_id", str), (level, str)], rel):
            if cls not in index:
                raise DatasetLayoutError(f"{NAME}: {rel} names class {cls!r}, which is not in data/{LEVELS[level]}")
            rows.append((image_id, f"{image_id}.jpg", s, index[cls], cls))
    table = pd.DataFrame(rows, columns=["image_id", "filename", "split", "label", "species"])
    if table["image_id"].duplicated().any():
        raise DatasetLayoutError(f"{NAME}: some image ids appear in more than one split file")
    # The other annotation levels, when shipped, as extra columns (never named "variant":
    # that column means synthetic ground truth elsewhere in the workbench).
    for other in LEVELS:
        if other != level and all((root / f"data/images_{other}_{s}.txt").is_file() for s in SPLITS):
            table[f"aircraft_{other}"] = table["image_id"].map(_read_level(root, other))
    return finalize(
        NAME, root / "data" / "images", table, classnames,
        dataset_root=root, metadata=metadata, shots=shots, skip_missing=skip_missing,
    )
