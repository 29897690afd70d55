"""Any folder of class folders: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``.

With split folders, they define the split (``val/`` optional: without it, ``val_fraction``
of each class's training images are carved out). Without them, each class is split by
``val_fraction`` and ``test_fraction`` (:func:`workbench.data.splits.fraction_split`,
deterministic in ``split_seed``). Class names are the folder names, made readable with
``humanize=True`` (``001.Black_footed_Albatross`` -> ``Black footed Albatross``); the folder
name stays in ``class_folder``. Images in subfolders of a class folder count for that class.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .dataset import Dataset
from .gist import finalize
from .layout import DatasetLayoutError, check_layout
from .names import humanize as _humanize
from .splits import carve_val, fraction_split

NAME = "imagefolder"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EXPECTED = """\
<root>/                      data_root
  <class name>/<image>.jpg   one folder per class
or
<root>/
  train/<class name>/<image>.jpg
  val/<class name>/...       optional (else carved from train)
  test/<class name>/..."""


def _scan(folder: Path, extensions) -> dict[str, list[str]]:
    """class folder name -> image paths relative to ``folder``; hidden files and folders skipped."""
    out = {}
    for cdir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            str(f.relative_to(folder)).replace("\\", "/")
            for f in cdir.rglob("*")
            if f.is_file() and f.suffix.lower() in extensions
            and not any(part.startswith(".") for part in f.relative_to(cdir).parts)
        )
        if files:
            out[cdir.name] = files
    return out


def load(
    root,
    metadata=None,
    shots=None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    humanize: bool = True,
    extensions=EXTENSIONS,
    skip_missing: bool = False,
) -> Dataset:
    """Load an image-folder dataset from ``root``. See the module docstring."""
    root = check_layout(NAME, root, [], EXPECTED)
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    split_mode = (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())
    rows = []
    if split_mode:
        for split in ("train", "val", "test"):
            if (root / split).is_dir():
                for cls, files in _scan(root / split, extensions).items():
                    rows += [(f"{split}/{f}", split, cls) for f in files]
    else:
        for cls, files in _scan(root, extensions).items():
            rows += [(f, "train", cls) for f in files]
    if not rows:
        raise DatasetLayoutError(
            f"{NAME}: {root} has no class folders with images ({', '.join(extensions)}).\nExpected layout:\n{EXPECTED}"
        )
    table = pd.DataFrame(rows, columns=["filename", "split", "class_folder"])
    folders = sorted(table["class_folder"].unique())
    no_train = sorted(set(folders) - set(table.loc[table["split"] == "train", "class_folder"]))
    if no_train:
        raise DatasetLayoutError(f"{NAME}: class folder(s) with no training images: {no_train[:10]}")
    classnames = [_humanize(f) if humanize else f for f in folders]
    if len(set(classnames)) < len(classnames):
        raise DatasetLayoutError(f"{NAME}: class folders give duplicate class names {classnames}; pass humanize=False")
    index = {f: i for i, f in enumerate(folders)}
    table["label"] = table["class_folder"].map(index)
    table["species"] = [classnames[l] for l in table["label"]]
    if metadata is None:
        if not split_mode:
            table = fraction_split(table, val=val_fraction, test=test_fraction, seed=split_seed)
        elif not (root / "val").is_dir():
            table = carve_val(table, fraction=val_fraction, seed=split_seed)
    table = table[["filename", "split", "label", "species", "class_folder"]]
    return finalize(
        NAME, root, table, classnames,
        dataset_root=root, metadata=metadata, shots=shots, skip_missing=skip_missing,
    )
