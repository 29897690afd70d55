"""Datasets: one table per dataset, the contract every stage reads.

A :class:`Dataset` is a root folder plus a table with one row per image and at least the
columns ``filename`` (relative to ``root``), ``split`` (``train``/``val``/``test``), ``label``
(int, index into ``classnames``) and ``species`` (the class name). Loaders may add columns
(``variant``, attributes) and put dataset-specific extras (part locations, attribute names)
in ``extras``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("filename", "split", "label", "species")
SPLITS = ("train", "val", "test")

# name -> "module:function"; each loader takes (root, **options) and returns a Dataset.
LOADERS: dict[str, str] = {
    "synthetic": "workbench.data.synthetic:load",
    "cub": "workbench.data.cub:load",
    "flowers": "workbench.data.flowers:load",
    "aircraft": "workbench.data.aircraft:load",
    "fitzpatrick40": "workbench.data.fitzpatrick:load",
    "imagefolder": "workbench.data.imagefolder:load",
    "gist": "workbench.data.gist:load",
}


@dataclass
class Dataset:
    name: str
    root: Path
    table: pd.DataFrame
    classnames: list[str]
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        missing = [c for c in REQUIRED_COLUMNS if c not in self.table.columns]
        if missing:
            raise ValueError(f"dataset {self.name!r}: table lacks columns {missing}")
        bad = sorted(set(self.table["split"]) - set(SPLITS))
        if bad:
            raise ValueError(f"dataset {self.name!r}: unknown split names {bad}; expected {list(SPLITS)}")

    def __len__(self) -> int:
        return len(self.table)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> "Dataset":
        """The rows of one split (``train``, ``val``, ``test``), same classes."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return replace(self, table=self.table[self.table["split"] == name].reset_index(drop=True))

    def subset(self, mask_or_index) -> "Dataset":
        return replace(self, table=self.table.loc[mask_or_index].reset_index(drop=True))

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.table["filename"]]

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy(dtype=np.int64)


def load_dataset(name: str, root: str | Path | None = None, **options) -> Dataset:
    """Load a dataset by name (see ``LOADERS``). Errors name what is wrong before any model loads."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    module, fn = LOADERS[name].split(":")
    loader = getattr(importlib.import_module(module), fn)
    import inspect

    sig = inspect.signature(loader)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [p for p in sig.parameters if p != "root"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"dataset {name!r}: unknown option(s) {unknown}; accepted options: {accepted}")
    return loader(root, **options)


def few_shot(ds: Dataset, k: int | str, seed: int = 0) -> Dataset:
    """Keep exactly ``k`` training images per class (deterministic in ``seed``); val/test unchanged.

    ``k="full"`` returns ``ds`` unchanged. Raises when a class has fewer than ``k`` training images.
    """
    if k in ("full", None):
        return ds
    k = int(k)
    train = ds.table[ds.table["split"] == "train"]
    counts = train.groupby("species").size()
    short = counts[counts < k]
    if len(short):
        raise ValueError(
            f"{k}-shot needs {k} training images per class; these classes have fewer: "
            + ", ".join(f"{c} ({n})" for c, n in short.items())
        )
    rng = np.random.default_rng(seed)
    keep = []
    for _, idx in sorted(train.groupby("label").groups.items()):
        idx = np.sort(np.asarray(idx))
        keep.extend(rng.choice(idx, size=k, replace=False).tolist())
    others = ds.table.index[ds.table["split"] != "train"].tolist()
    return replace(ds, table=ds.table.loc[sorted(keep) + others].reset_index(drop=True))
