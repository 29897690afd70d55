"""GIST metadata CSVs as split definitions, for any loader, and as a dataset of their own.

GIST releases per dataset a ``metadata.csv`` with columns ``filename, split, label, species``
(plus leftover pandas index columns such as ``Unnamed: 0``, ignored here) and k-shot files
``metadata_{1,3,5}shot.csv`` that keep exactly k training images per class. Every loader takes
``metadata=<csv>``: the CSV then decides which images are used, their split, label and class
name. Filenames are matched to the loader's by their longest common path suffix, so
``jpg/image_00001.jpg`` in a CSV finds ``image_00001.jpg`` in the dataset and vice versa.
"""
from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from .dataset import Dataset
from .layout import DatasetLayoutError, check_images_exist, check_layout, missing_images_message

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

EXPECTED = """\
<root>/                      folder the CSV's filenames are relative to (or its images= subfolder)
  metadata.csv               columns: filename, split (train/val/test), label (0..C-1), species
  metadata_{1,3,5}shot.csv   optional k-shot files, same columns"""


def resolve_file(name: str, root, path, what: str = "metadata file") -> Path:
    """An absolute ``path`` as is; a relative one under ``root`` first, then the working directory."""
    p = Path(path).expanduser()
    tried = [p] if p.is_absolute() else ([Path(root) / p] if root is not None else []) + [Path.cwd() / p]
    for t in tried:
        if t.is_file():
            return t
    looked = "\n".join(f"  {t}" for t in tried)
    raise DatasetLayoutError(f"{name}: {what} {path} not found; looked in:\n{looked}")


def shot_file(metadata: Path, k) -> Path:
    """GIST's name for the k-shot file next to ``metadata``: ``metadata.csv`` -> ``metadata_5shot.csv``."""
    metadata = Path(metadata)
    return metadata.with_name(f"{metadata.stem}_{int(k)}shot{metadata.suffix}")


def read_metadata(path, name: str = "gist") -> pd.DataFrame:
    """Read and validate a GIST metadata CSV; splits normalised to train/val/test."""
    path = Path(path)
    df = pd.read_csv(path)
    df.columns = [str(c).strip() for c in df.columns]
    # GIST's files were saved with pandas' index several times over: drop those columns.
    df = df.loc[:, [c for c in df.columns if c and not c.startswith("Unnamed")]]
    missing = [c for c in ("filename", "split") if c not in df.columns]
    if missing:
        raise DatasetLayoutError(
            f"{name}: {path.name} lacks column(s) {missing}; it has {list(df.columns)}. "
            "A GIST metadata file has columns filename, split, label, species."
        )
    if ("label" in df.columns) != ("species" in df.columns):
        raise DatasetLayoutError(f"{name}: {path.name} must have both 'label' and 'species' columns, or neither.")
    if df.empty:
        raise DatasetLayoutError(f"{name}: {path.name} has no rows")
    df["filename"] = df["filename"].astype(str).str.strip()
    split = df["split"].astype(str).str.strip().str.lower()
    bad = sorted(set(split) - set(SPLIT_NAMES))
    if bad:
        raise DatasetLayoutError(f"{name}: {path.name} has unknown split values {bad}; expected train, val, test.")
    df["split"] = split.map(SPLIT_NAMES)
    dup = df["filename"][df["filename"].duplicated()].unique().tolist()
    if dup:
        raise DatasetLayoutError(f"{name}: {path.name} lists {len(dup)} filename(s) more than once, e.g. {dup[:3]}")
    if "label" in df.columns:
        df["species"] = df["species"].astype(str).str.strip()
        for a, b in (("label", "species"), ("species", "label")):
            n = df.groupby(a)[b].nunique()
            if (n > 1).any():
                ex = n[n > 1].index[0]
                raise DatasetLayoutError(
                    f"{name}: {path.name}: {a} {ex!r} has several {b} values "
                    f"{sorted(map(str, df.loc[df[a] == ex, b].unique()))}; each label needs exactly one species."
                )
    return df


def _keys(filename: str) -> list[str]:
    """Match keys for a filename, most specific first: each path suffix, then the bare stem."""
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    return ["/".join(parts[i:]) for i in range(len(parts))] + ["stem:" + PurePosixPath(parts[-1]).stem]


def match_filenames(dataset_names, csv_names) -> np.ndarray:
    """Row position in ``dataset_names`` for each of ``csv_names`` (-1 when none or ambiguous)."""
    exact = {f: i for i, f in enumerate(dataset_names)}
    index: dict[str, int] = {}
    for i, f in enumerate(dataset_names):
        for k in _keys(f):
            index[k] = -2 if k in index and index[k] != i else i  # -2: ambiguous key
    out = np.full(len(csv_names), -1, dtype=np.int64)
    for j, f in enumerate(csv_names):
        if f in exact:
            out[j] = exact[f]
            continue
        for k in _keys(f):
            if index.get(k, -2) >= 0:
                out[j] = index[k]
                break
    return out


def _unmatched_error(name, path, dataset_names, csv_names, pos, image_root) -> DatasetLayoutError:
    bad = [csv_names[j] for j in np.flatnonzero(pos < 0)]
    ex = "\n".join(f"  {b}" for b in bad[:5])
    return DatasetLayoutError(
        f"{name}: {len(bad)} of {len(csv_names)} filenames in {Path(path).name} are not in the dataset, e.g.:\n{ex}\n"
        f"The dataset's filenames look like {dataset_names[0]!r} (relative to {image_root})."
    )


def apply_metadata(name: str, table: pd.DataFrame, classnames: list[str], meta: pd.DataFrame, path, image_root=None):
    """Restrict ``table`` to the CSV's images; take split (and label/species when given) from it.

    Returns ``(table, classnames)``. Row order stays the dataset's. The CSV's filename is kept
    in ``metadata_filename``; the loader's own label and class name in ``source_label`` and
    ``source_species`` when the CSV brings its own.
    """
    names = table["filename"].tolist()
    pos = match_filenames(names, meta["filename"].tolist())
    if (pos < 0).any():
        raise _unmatched_error(name, path, names, meta["filename"].tolist(), pos, image_root)
    if len(np.unique(pos)) < len(pos):
        raise DatasetLayoutError(f"{name}: several filenames in {Path(path).name} match the same dataset image.")
    order = np.argsort(pos, kind="stable")
    out = table.iloc[pos[order]].reset_index(drop=True)
    m = meta.iloc[order].reset_index(drop=True)
    out["split"] = m["split"].to_numpy()
    out["metadata_filename"] = m["filename"].to_numpy()
    if "label" in m.columns:
        out["source_label"], out["source_species"] = out["label"], out["species"]
        labels = sorted(m["label"].unique())
        remap = {l: i for i, l in enumerate(labels)}
        out["label"] = m["label"].map(remap).to_numpy()
        out["species"] = m["species"].to_numpy()
        first = m.drop_duplicates("label").set_index("label")["species"]
        classnames = [str(first[l]) for l in labels]
        # The CSV's classes should be the dataset's classes under other names; flag mix-ups.
        if (out.groupby("label")["source_label"].nunique() > 1).any():
            warnings.warn(f"{name}: labels in {Path(path).name} do not map one-to-one onto the dataset's own classes")
    else:
        present = sorted(out["label"].unique())
        remap = {l: i for i, l in enumerate(present)}
        out["label"] = out["label"].map(remap)
        classnames = [classnames[l] for l in present]
    out["label"] = out["label"].astype(np.int64)
    return out, classnames


def finalize(
    name: str,
    image_root,
    table: pd.DataFrame,
    classnames: list[str],
    extras: dict[str, Any] | None = None,
    *,
    dataset_root=None,
    metadata=None,
    shots=None,
    skip_missing: bool = False,
) -> Dataset:
    """Common tail of every loader: apply a GIST metadata CSV, check the images exist, build the Dataset."""
    extras = dict(extras or {})
    dataset_root = Path(dataset_root if dataset_root is not None else image_root)
    extras["dataset_root"] = str(dataset_root)
    if metadata is not None:
        base = resolve_file(name, dataset_root, metadata)
        if shots not in (None, "full"):
            resolve_file(name, dataset_root, shot_file(base, shots), f"{shots}-shot file")  # fail early, naming it
        table, classnames = apply_metadata(name, table, classnames, read_metadata(base, name), base, image_root)
        extras["metadata"] = str(base)
        extras["shot_files"] = {k: str(shot_file(base, k)) for k in (1, 3, 5) if shot_file(base, k).is_file()}
    elif shots not in (None, "full"):
        raise DatasetLayoutError(
            f"{name}: shots={shots} reads GIST's k-shot file; give its metadata file too "
            f"(dataset_options.metadata=metadata.csv, with metadata_{shots}shot.csv next to it)."
        )
    missing = check_images_exist(image_root, table["filename"].tolist())
    if missing:
        if not skip_missing:
            raise DatasetLayoutError(missing_images_message(name, Path(image_root), missing))
        table = table[~table["filename"].isin(set(missing))].reset_index(drop=True)
        extras["skipped"] = [(f, "missing") for f in missing]
    # The contract's columns first, then whatever the loader adds.
    cols = ["filename", "split", "label", "species"]
    table = table[cols + [c for c in table.columns if c not in cols]].reset_index(drop=True)
    table["label"] = table["label"].astype(np.int64)
    ds = Dataset(name=name, root=Path(image_root), table=table, classnames=list(classnames), extras=extras)
    return apply_shot_file(ds, int(shots)) if shots not in (None, "full") else ds


def apply_shot_file(ds: Dataset, shot_file, k: int | None = None) -> Dataset:
    """Keep the training images a GIST k-shot CSV lists (a fixed draw); val/test unchanged.

    ``shot_file``: the CSV's path, or k to use ``ds.extras['shot_files'][k]`` (the files next to the
    metadata the dataset was loaded with). With ``k``, every class must keep exactly k images.
    """
    if isinstance(shot_file, (int, np.integer)) or str(shot_file).isdigit():
        files = ds.extras.get("shot_files", {})
        k = int(shot_file) if k is None else k
        if int(shot_file) not in files:
            raise DatasetLayoutError(
                f"{ds.name}: no {shot_file}-shot file known; load the dataset with a GIST metadata file that has "
                f"metadata_{shot_file}shot.csv next to it, or pass the file's path."
            )
        shot_file = files[int(shot_file)]
    path = Path(shot_file)
    if not path.is_file():
        raise DatasetLayoutError(f"{ds.name}: few-shot split file not found: {path}")
    meta = read_metadata(path, ds.name)
    train_names = meta.loc[meta["split"] == "train", "filename"].tolist()
    train = ds.table["split"] == "train"
    names = ds.table["filename"].tolist()
    pos = match_filenames(names, train_names)
    outside = [f for f, p in zip(train_names, pos) if p < 0 or not train.iloc[p]]
    if outside:
        raise ValueError(f"{path}: {len(outside)} training file(s) are not training images of {ds.name!r}, "
                         f"e.g. {outside[:5]}")
    keep = ~train
    keep.iloc[pos] = True
    out = ds.subset(keep.to_numpy())
    if k is not None:
        counts = out.table[out.table["split"] == "train"].groupby("label").size()
        counts = counts.reindex(range(ds.num_classes), fill_value=0)
        bad = counts[counts != k]
        if len(bad):
            raise ValueError(
                f"{path}: a {k}-shot file must keep exactly {k} training images per class; "
                + ", ".join(f"{ds.classnames[i]} has {n}" for i, n in bad.head(10).items())
            )
    return out


def _find_image_root(root: Path, first: str) -> Path:
    """``root`` or the direct subfolder of it (e.g. ``images/``) holding the CSV's first file."""
    if (root / first).is_file():
        return root
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / first).is_file():
            return sub
    return root  # finalize() then lists the missing files


def load(root, metadata="metadata.csv", images: str | None = None, shots=None, skip_missing: bool = False) -> Dataset:
    """Any dataset described by a GIST metadata CSV alone.

    ``root``: the dataset folder; ``images``: its subfolder the CSV's filenames are relative to
    (``None``: root itself, or the subfolder where the first file is found); ``metadata``: the
    CSV (relative to root, or absolute); ``shots``: keep the training images of ``metadata_{k}shot.csv``.
    """
    root = check_layout("gist", root, [], EXPECTED)
    path = resolve_file("gist", root, metadata)
    if shots not in (None, "full"):
        resolve_file("gist", root, shot_file(path, shots), f"{shots}-shot file")  # fail early, naming it
    meta = read_metadata(path, "gist")
    if "label" not in meta.columns:
        raise DatasetLayoutError(f"gist: {path.name} needs 'label' and 'species' columns to define the classes.")
    labels = sorted(meta["label"].unique())
    remap = {l: i for i, l in enumerate(labels)}
    first = meta.drop_duplicates("label").set_index("label")["species"]
    table = meta.copy()
    table["label"] = table["label"].map(remap)
    image_root = root / images if images is not None else _find_image_root(root, table["filename"].iloc[0])
    ds = finalize("gist", image_root, table, [str(first[l]) for l in labels], dataset_root=root, skip_missing=skip_missing)
    ds.extras["metadata"] = str(path)
    ds.extras["shot_files"] = {k: str(shot_file(path, k)) for k in (1, 3, 5) if shot_file(path, k).is_file()}
    return apply_shot_file(ds, int(shots)) if shots not in (None, "full") else ds
