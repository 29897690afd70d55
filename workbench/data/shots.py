"""Few-shot training sets, one way: k images per class drawn by seed, or a GIST ``metadata_<k>shot.csv``
taken as a fixed draw. Validation and test rows are never touched."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .dataset import Dataset
from .gist import apply_shot_file


def parse_shots(shots) -> list:
    """Normalise shots (one value or a list): ``"full"`` stays, numbers (or numeric strings) become
    positive ints; duplicates are an error."""
    out = []
    for s in [shots] if isinstance(shots, (str, int)) else shots:
        if s in ("full", None):
            out.append("full")
            continue
        try:
            k = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"shots must be 'full' or positive integers, got {s!r}") from None
        if k < 1 or str(s).strip() != str(k):
            raise ValueError(f"shots must be 'full' or positive integers, got {s!r}")
        out.append(k)
    if len(set(map(str, out))) != len(out):
        raise ValueError(f"shots has duplicates: {list(shots)}")
    return out


def few_shot(ds: Dataset, k: int | str, seed: int = 0, shot_file: str | Path | int | None = None) -> Dataset:
    """Keep exactly ``k`` training images per class; val/test unchanged. ``k="full"`` returns ``ds``.

    The draw is deterministic in ``seed``; ``shot_file`` (a GIST k-shot CSV, or ``k`` to use the one
    the dataset was loaded with) fixes it instead. Raises when a class has fewer than ``k`` images.
    """
    if k in ("full", None):
        return ds
    k = int(k)
    if shot_file is not None:
        return apply_shot_file(ds, shot_file, k)
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
