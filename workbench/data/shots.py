"""Few-shot training sets, one way: k images per class drawn by seed, or a GIST ``metadata_<k>shot.csv``
taken as a fixed draw. :class:`DrawSpec` is the one rule fine-tuning and evaluation both draw by (shot
files, validation policy, the run's base seed), so the two stages cannot train and probe on different
images; :func:`train_images_sha256` is the digest each checkpoint records of its training images."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .dataset import Dataset
from .gist import apply_shot_file, resolve_file

# How k-shot runs choose their epoch and the probe's weight decay: "full" uses the whole validation split
# (GIST's protocol, and the default); "k_shot" at most k validation images per class, drawn like the
# training ones, so a k-shot figure never rests on more labelled images per class than 2k.
VAL_POLICIES = ("full", "k_shot")


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


def draw_seed(base_seed: int, seed: int) -> int:
    """The seed of draw ``seed`` under the run's top-level ``seed``: ``seed`` itself when the base is 0 (the
    draws every earlier run made), else a hash of both, so ``--set seed=1`` redraws every k-shot set."""
    if int(base_seed) == 0:
        return int(seed)
    h = hashlib.sha256(f"draw\0{int(base_seed)}\0{int(seed)}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def train_images_sha256(ds: Dataset) -> str:
    """sha256 of the sorted training filenames (``Dataset.table["filename"]`` as is), joined by newlines,
    UTF-8: what a checkpoint records of the images it was trained on."""
    names = sorted(ds.table.loc[ds.table["split"] == "train", "filename"].astype(str))
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def _val_draw(ds: Dataset, k: int, seed: int) -> Dataset:
    """At most ``k`` validation images per class (a class with fewer keeps all), drawn by ``seed``."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the training draw is unchanged
    val = ds.table[ds.table["split"] == "val"]
    keep = []
    for _, idx in sorted(val.groupby("label").groups.items()):
        idx = np.sort(np.asarray(idx))
        keep.extend(rng.choice(idx, size=k, replace=False).tolist() if len(idx) > k else idx.tolist())
    others = ds.table.index[ds.table["split"] != "val"].tolist()
    return replace(ds, table=ds.table.loc[sorted(others + keep)].reset_index(drop=True))


@dataclass(frozen=True)
class DrawSpec:
    """How every k-shot set of a run is drawn: ``shot_files`` (k -> a GIST ``metadata_<k>shot.csv``, a fixed
    draw: absolute, or relative to the dataset root or the working directory), ``val_policy``
    (:data:`VAL_POLICIES`) and ``base_seed`` (the run's top-level ``seed``, see :func:`draw_seed`)."""

    shot_files: dict = field(default_factory=dict)
    val_policy: str = "full"
    base_seed: int = 0

    def __post_init__(self):
        if self.val_policy not in VAL_POLICIES:
            raise ValueError(f"val_policy must be one of {list(VAL_POLICIES)}, got {self.val_policy!r}")
        files = {}
        for k, v in dict(self.shot_files or {}).items():
            if parse_shots([k])[0] == "full":
                raise ValueError(f"shot_files: a shot file is for k-shot draws, not {k!r}")
            files[str(int(k))] = str(v)
        object.__setattr__(self, "shot_files", files)

    @classmethod
    def from_params(cls, p) -> DrawSpec:
        return cls(p.get("shot_files") or {}, p.get("val_policy", "full"), int(p.get("seed", 0)))

    def shot_file(self, ds: Dataset, k) -> Path | None:
        f = self.shot_files.get(str(k))
        return None if f is None else resolve_file(ds.name, ds.root, f, f"{k}-shot file (shot_files)")

    def fixed(self, k) -> bool:
        """Full shot and shot-file draws do not depend on the seed: one run each (the first seed)."""
        return k == "full" or str(k) in self.shot_files

    def seeds_for(self, k, seeds) -> list[int]:
        seeds = [int(s) for s in seeds]
        return seeds[:1] if self.fixed(k) else seeds

    def subset(self, ds: Dataset, k, seed: int) -> Dataset:
        """The dataset a (k, seed) run trains, validates and is tested on: k training images per class
        (full: all), validation per :attr:`val_policy`, the test split untouched."""
        if k in ("full", None):
            return ds
        s = draw_seed(self.base_seed, seed)
        sub = few_shot(ds, int(k), s, self.shot_file(ds, k))
        return _val_draw(sub, int(k), s) if self.val_policy == "k_shot" else sub

    def identity(self, ds: Dataset, k) -> dict:
        """What of this rule a (k, seed) draw depends on, for run identities (shot files by content)."""
        f = self.shot_file(ds, k) if k != "full" else None
        return {"shot_file": str(f) if f else None,
                "shot_file_sha256": hashlib.sha256(f.read_bytes()).hexdigest() if f else None,
                "val_policy": self.val_policy if k != "full" else "full", "base_seed": self.base_seed}
