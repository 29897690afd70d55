"""Run identity: what made an output that a rerun or a later stage reuses.

An identity is a flat dict of named, readable values (model and pretrained tag, a digest of the
weights file when it is local, the dataset, its root, options and table, the draw, the input texts'
digest, the stage's own settings, the package version) and its :func:`digest`. Whoever reuses an
output compares the identity it was recorded with against the one it would compute now:
:func:`differences` names each setting that differs with both values, and :func:`mismatch` turns that
into the error a user reads. Cheap settings that do not change results (log intervals, compile, the
attention kernel) stay out. The package version is recorded but does not block reuse: a change of
code that changes results bumps a version of its own that is part of a key (``DECODE_VERSION``,
the synthetic generator's version, which changes the dataset table's digest).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import __version__

# recorded, compared for information only (see the module docstring)
INFORMATIONAL = ("version",)


def digest(identity: dict) -> str:
    """A short, stable digest of an identity (16 hex digits)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def texts_sha256(texts: Iterable[str]) -> str:
    """sha256 of texts in their order, newline-separated (a caption's own newlines are escaped)."""
    return hashlib.sha256("\n".join(json.dumps(str(t)) for t in texts).encode("utf-8")).hexdigest()


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime within a process)."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _local_weights(model: str, pretrained: str | None) -> list[Path]:
    """The local files the weights come from: a checkpoint path, the package's own file, a local-dir folder."""
    from .clip.load import resolve_name
    from .clip.weights import package_weights

    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:")).expanduser()
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not pretrained:
        return []
    shipped = package_weights(resolve_name(model), pretrained)
    if shipped is not None:
        return [shipped]
    path = Path(pretrained).expanduser()
    return [path] if (os.sep in pretrained or path.suffix) and path.is_file() else []


def weights_identity(model: str, pretrained: str | None) -> dict:
    """``model``, ``pretrained`` and, when the weights are local files, ``weights_sha256`` (hub tags name
    immutable releases; a local file can be overwritten under the same name)."""
    files = _local_weights(model, pretrained)
    sha = None
    if files:
        sha = file_sha256(files[0]) if len(files) == 1 else hashlib.sha256(
            "".join(f"{p.name}\0{file_sha256(p)}\n" for p in files).encode()).hexdigest()
    return {"model": model, "pretrained": pretrained, "weights_sha256": sha}


def table_sha256(table: pd.DataFrame) -> str:
    """sha256 of a dataset table's rows (filename, split, label), in order."""
    rows = table[["filename", "split", "label"]].astype(str).agg("\t".join, axis=1)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def dataset_identity(ds, dataset: str, data_root: str | None, options: dict | None) -> dict:
    """The dataset as configured (name, root, options) and as loaded (its table's digest)."""
    root = str(Path(data_root).expanduser().resolve()) if data_root else None
    return {"dataset": dataset if isinstance(dataset, str) else ds.name, "data_root": root,
            "dataset_options": dict(options or {}), "dataset_sha256": table_sha256(ds.table)}


def descriptions_sha256(records: Iterable[dict] | None) -> str | None:
    """Digest of a run's descriptions (id, class, text; order-free), None when there are none."""
    if records is None:
        return None
    return texts_sha256(sorted(json.dumps([r.get("id"), r.get("class"), r.get("text")], default=str) for r in records))


def matches_sha256(records: Iterable[dict] | None) -> str | None:
    """Digest of match records (image, captions; order-free), None when there are none."""
    if records is None:
        return None
    return texts_sha256(sorted(json.dumps([r.get("image"), r.get("captions")], default=str) for r in records))


def columns_sha256(table: pd.DataFrame, columns: Iterable[str]) -> str:
    """sha256 of a table's rows (filename and ``columns``), in order: inputs :func:`table_sha256` leaves out,
    such as the synthetic images' true attributes the oracle captions are written from."""
    rows = table[["filename", *columns]].astype(str).agg("\t".join, axis=1)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def caption_source_identity(method: str, version: int, **inputs) -> dict:
    """The ``caption_source`` entry of a fine-tuning run's identity for a caption source of
    :mod:`workbench.finetune.sources`: its name, its code version and a digest (or value) of each input
    it writes captions from, so changing any of them retires the run's checkpoints."""
    return {"method": method, "version": version, **inputs}


def with_version(identity: dict) -> dict:
    return {**identity, "version": __version__}


def differences(recorded: dict, current: dict, ignore: Iterable[str] = INFORMATIONAL) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every key that differs, ``ignore``d keys aside."""
    skip = set(ignore)
    keys = [k for k in dict.fromkeys([*recorded, *current]) if k not in skip]
    return [(k, recorded.get(k), current.get(k)) for k in keys
            if json.dumps(recorded.get(k), sort_keys=True, default=str) != json.dumps(current.get(k), sort_keys=True, default=str)]


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


class IdentityMismatch(ValueError):
    """An output was made under another identity; ``.diffs`` lists ``(key, recorded, current)``."""

    def __init__(self, message: str, diffs: list):
        super().__init__(message)
        self.diffs = diffs


def mismatch(what: str, diffs: list[tuple[str, Any, Any]], how: str) -> IdentityMismatch:
    """The error for reusing ``what`` made under other settings: each differing setting with both values."""
    lines = "\n".join(f"  {k}: made with {_short(a)}, this run has {_short(b)}" for k, a, b in diffs)
    return IdentityMismatch(f"{what} was made with other settings:\n{lines}\n{how}", diffs)
