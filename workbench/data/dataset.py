"""The dataset contract every stage reads: a root folder plus one table row per image."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("filename", "split", "label", "species")
SPLITS = ("train", "val", "test")


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
