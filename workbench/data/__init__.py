"""Datasets: one table per dataset, the contract every stage reads.

A :class:`Dataset` is a root folder plus a table with one row per image and at least the
columns ``filename`` (relative to ``root``), ``split`` (``train``/``val``/``test``), ``label``
(int, index into ``classnames``) and ``species`` (the class name). Loaders may add columns
(``variant``, attributes) and put dataset-specific extras (part locations, attribute names)
in ``extras``.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from .dataset import REQUIRED_COLUMNS, SPLITS, Dataset
from .shots import VAL_POLICIES, DrawSpec, draw_seed, few_shot, parse_shots, train_images_sha256

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


def load_dataset(name: str, root: str | Path | None = None, **options) -> Dataset:
    """Load a dataset by name (see ``LOADERS``). Errors name what is wrong before any model loads."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    module, fn = LOADERS[name].split(":")
    loader = getattr(importlib.import_module(module), fn)
    sig = inspect.signature(loader)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [p for p in sig.parameters if p != "root"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"dataset {name!r}: unknown option(s) {unknown}; accepted options: {accepted}")
    return loader(root, **options)


__all__ = ["LOADERS", "REQUIRED_COLUMNS", "SPLITS", "VAL_POLICIES", "Dataset", "DrawSpec", "draw_seed", "few_shot",
           "load_dataset", "parse_shots", "train_images_sha256"]
