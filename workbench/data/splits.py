"""Deterministic splits for datasets that ship without a validation (or any) split.

Both functions work per class, on the class's rows sorted by filename, with a NumPy generator
seeded by ``seed``: the same files and seed give the same split on every machine, and the
split does not depend on the run's training seed. Every class keeps at least one training image.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _per_class_order(table: pd.DataFrame, mask: pd.Series, seed: int):
    """Yield ``(label, shuffled row index)`` for the rows in ``mask``, classes in label order."""
    rng = np.random.default_rng(seed)
    sub = table[mask].sort_values(["label", "filename"], kind="stable")
    groups = sub.groupby("label").indices  # label -> positions in `sub`
    for label in sorted(groups):
        rows = sub.index.to_numpy()[groups[label]]
        yield label, rows[rng.permutation(len(rows))]


def carve_val(table: pd.DataFrame, per_class: int | None = None, fraction: float | None = None, seed: int = 0) -> pd.DataFrame:
    """Move ``per_class`` (or ``round(fraction * n)``) training images of each class to ``val``.

    Returns a copy of ``table``; other splits are untouched.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("carve_val: give exactly one of per_class or fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise ValueError(f"carve_val: fraction must be in [0, 1), got {fraction}")
    if per_class is not None and per_class < 0:
        raise ValueError(f"carve_val: per_class must be >= 0, got {per_class}")
    out = table.copy()
    val = []
    for _, rows in _per_class_order(out, out["split"] == "train", seed):
        n = per_class if per_class is not None else int(round(fraction * len(rows)))
        val.extend(rows[: min(n, len(rows) - 1)])  # keep one training image per class
    out.loc[val, "split"] = "val"
    return out


def fraction_split(table: pd.DataFrame, val: float, test: float, seed: int = 0) -> pd.DataFrame:
    """Assign ``split`` per class: ``round(test * n)`` test, ``round(val * n)`` val, the rest train."""
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"split fractions need val >= 0, test >= 0 and val + test < 1; got val={val}, test={test}")
    split = pd.Series("train", index=table.index, dtype=object)
    for _, rows in _per_class_order(table, pd.Series(True, index=table.index), seed):
        n_test = min(int(round(test * len(rows))), len(rows) - 1)
        n_val = min(int(round(val * len(rows))), len(rows) - 1 - n_test)
        split[rows[:n_test]] = "test"
        split[rows[n_test : n_test + n_val]] = "val"
    return table.assign(split=split)
