"""Part regions in model-input pixels, from a dataset's part annotations, and pointing-game queries.

Images reach the model through ``image_cache`` (short side resized to ``S``, centre crop), so
annotations in original-image coordinates go through the same geometry (:mod:`workbench.data.geometry`).

Accepted annotations, looked up in ``Dataset.extras`` (rows matched by ``filename``), first found wins:
- ``part_mask`` + ``parts``: a callable ``filename -> H x W label map`` whose ids index ``parts`` (the
  synthetic benchmark; masks mark visible pixels). ``background``, ``body`` and ``occluder`` are not parts;
- ``part_boxes``: a table with ``filename, part, x0, y0, x1, y1`` (pixels, x1/y1 exclusive);
- ``part_locs``, or ``parts`` as a table (the CUB loader): ``filename, part, x, y[, visible]``
  (keypoints; a disk of ``radius``). CUB's left/right parts merge into one region ("wing", "eye", "leg").
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..data.geometry import map_mask, map_points
from .pointing import PartItem

# CUB's 15 parts -> the word used in captions; left/right pairs merge into one region.
CUB_PART_WORDS = {
    "back": "back", "beak": "beak", "belly": "belly", "breast": "breast", "crown": "crown",
    "forehead": "forehead", "left eye": "eye", "left leg": "leg", "left wing": "wing", "nape": "nape",
    "right eye": "eye", "right leg": "leg", "right wing": "wing", "tail": "tail", "throat": "throat",
}
NOT_PARTS = ("background", "body", "occluder")


def disk(centers, radius: float, size: int) -> torch.Tensor:
    """Union of disks of ``radius`` (pixels) around ``centers`` ``k x 2`` (x, y), on a ``size x size`` grid."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.zeros(size, size, dtype=torch.bool)
    for x, y in torch.as_tensor(centers, dtype=torch.float64).reshape(-1, 2).tolist():
        out |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    return out


def box(xyxy, wh: tuple[int, int], size: int) -> torch.Tensor:
    """A box ``(x0, y0, x1, y1)`` in original pixels -> ``size x size`` bool."""
    m = torch.zeros(wh[1], wh[0], dtype=torch.bool)
    x0, y0, x1, y1 = (int(round(v)) for v in xyxy)
    m[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return map_mask(m, size)


def _image_size(ds, filename: str) -> tuple[int, int]:
    with Image.open(Path(ds.root) / filename) as im:
        return im.size


def _table(obj, name: str, cols: tuple[str, ...]) -> pd.DataFrame:
    df = obj if isinstance(obj, pd.DataFrame) else pd.DataFrame(obj)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"Dataset.extras[{name!r}] lacks columns {missing}; expected {list(cols)}")
    return df


def part_regions(ds, size: int, radius: float | None = None, part_words: dict[str, str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{filename: {part word: size x size bool}}`` for the rows of ``ds`` that have part annotations.

    ``radius`` (keypoints only, model-input pixels) defaults to ``size / 8``. ``part_words`` renames
    (and merges) parts, e.g. CUB's "left wing"/"right wing" -> "wing"; unnamed parts are dropped when given.
    """
    ex = ds.extras or {}
    radius = size / 8 if radius is None else radius
    names = list(ds.table["filename"].astype(str))
    rename = (lambda p: part_words.get(p)) if part_words else (lambda p: p)  # noqa: E731
    out: dict[str, dict[str, torch.Tensor]] = {}

    def add(fn, part, region):
        word = rename(str(part))
        if word is None or not region.any():
            return
        d = out.setdefault(fn, {})
        d[word] = d[word] | region if word in d else region

    if callable(ex.get("part_mask")):
        ids = [(i, p) for i, p in enumerate(ex.get("parts") or []) if p not in NOT_PARTS]
        if not ids:
            raise ValueError("Dataset.extras['part_mask'] needs extras['parts'] (label id -> part name)")
        for fn in names:
            lab = map_mask(ex["part_mask"](fn), size, labels=True)
            for i, part in ids:
                add(fn, part, lab == i)
    elif "part_boxes" in ex:
        df = _table(ex["part_boxes"], "part_boxes", ("filename", "part", "x0", "y0", "x1", "y1"))
        df = df[df["filename"].isin(set(names))]
        for fn, g in df.groupby("filename", sort=False):
            wh = _image_size(ds, fn)
            for r in g.itertuples():
                add(fn, r.part, box((r.x0, r.y0, r.x1, r.y1), wh, size))
    else:
        locs = ex.get("part_locs")
        if locs is None and isinstance(ex.get("parts"), pd.DataFrame):
            locs = ex["parts"]
        if locs is None:
            raise ValueError(
                f"dataset {ds.name!r} has no part annotations: expected Dataset.extras 'part_mask' (+ 'parts'), "
                "'part_boxes', or keypoints in 'part_locs' / 'parts' (e.g. CUB with parts/part_locs.txt)"
            )
        df = _table(locs, "part_locs", ("filename", "part", "x", "y"))
        if part_words is None and set(df["part"]) <= set(CUB_PART_WORDS):  # CUB: merge left/right parts
            rename = CUB_PART_WORDS.get
        df = df[df["filename"].isin(set(names))]
        if "visible" in df.columns:
            df = df[df["visible"].astype(bool)]
        for fn, g in df.groupby("filename", sort=False):
            pts = map_points(g[["x", "y"]].to_numpy(), _image_size(ds, fn), size)
            for part, p in zip(g["part"], pts):
                add(fn, part, disk(p, radius, size))
    return out


def object_regions(ds, size: int, files: list[str], radius: float | None = None) -> torch.Tensor:
    """``len(files) x size x size`` bool: where the bird is, for the random-bird-patch baseline.

    From a label map: every labelled pixel that is not background or an occluder. From boxes or
    keypoints (no silhouette): the union of the image's part regions, a smaller stand-in.
    """
    ex = ds.extras or {}
    if callable(ex.get("part_mask")):
        names = list(ex.get("parts") or [])
        keep = torch.tensor([p not in ("background", "occluder") for p in names])
        return torch.stack([keep[map_mask(ex["part_mask"](fn), size, labels=True).long()] for fn in files])
    regions = part_regions(replace(ds, table=ds.table[ds.table["filename"].astype(str).isin(set(files))]), size, radius)
    empty = torch.zeros(size, size, dtype=torch.bool)
    return torch.stack([torch.stack(list(regions[fn].values())).any(0) if fn in regions else empty for fn in files])


def _value(val) -> str | None:
    """An attribute cell as text, None when empty or missing."""
    return val.strip() if isinstance(val, str) and val.strip() and val.lower() not in ("none", "nan") else None


def part_columns(part: str, row=None, attribute_part: dict[str, str] | None = None) -> list[str]:
    """The columns of a table row that hold a value of ``part``: those mapped to it by ``attribute_part``
    (e.g. ``{"crown_color": "crown"}``), else those named ``<part>_*``."""
    cols = []
    for col, val in (row.items() if row is not None else ()):
        owner = attribute_part.get(col) if attribute_part else (part if str(col).startswith(f"{part}_") else None)
        if owner == part and _value(val) is not None:
            cols.append(col)
    return cols


def part_attributes(part: str, row=None, attribute_part: dict[str, str] | None = None) -> list[str]:
    """Attribute values of ``part`` in a table row (:func:`part_columns`)."""
    return [_value(row[c]) for c in part_columns(part, row, attribute_part)]


def part_text(part: str, row=None, template: str = "a bird with {desc}", attribute_part: dict | None = None,
              noun: str | None = None) -> str:
    """Caption naming ``part`` (as ``noun``, default the part name) with its attribute values,
    e.g. "a bird with a red crown"."""
    noun = noun or part.replace("_", " ")
    desc = " ".join(part_attributes(part, row, attribute_part) + [noun])
    if noun.endswith("s") and not part.endswith("s"):  # a plural noun ("wings") takes no article
        return template.format(desc=desc)
    return template.format(desc=("an " if desc[0].lower() in "aeiou" else "a ") + desc)


def part_items(
    ds,
    size: int,
    parts: list[str] | None = None,
    max_images: int | None = None,
    radius: float | None = None,
    template: str = "a bird with {desc}",
    seed: int = 0,
    part_nouns: dict[str, str] | None = None,
) -> tuple[list[PartItem], list[str]]:
    """Pointing-game queries for up to ``max_images`` annotated images of ``ds`` (a random, seeded pick).

    Each part gets the caption ``template.format(desc=...)`` (e.g. "a bird with a red crown"); its
    map is read at the part's noun, ``part_nouns.get(part, part)`` (e.g. ``{"wing": "wings"}`` when
    the model learnt the plural).

    Returns (items, filenames); ``item.index`` indexes ``filenames`` (decode those with ``image_cache``).
    """
    regions = part_regions(ds, size, radius)
    files = [f for f in ds.table["filename"].astype(str) if f in regions]
    if not files:
        raise ValueError(f"no image of dataset {ds.name!r} ({len(ds.table)} rows) has part annotations")
    if max_images is not None and len(files) > max_images:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), max_images, replace=False))]
    if parts is not None:
        known = {p for f in files for p in regions[f]}
        unknown = sorted(set(parts) - known)
        if unknown:
            raise ValueError(f"unknown parts {unknown}; annotated parts: {sorted(known)}")
    rows = ds.table.set_index(ds.table["filename"].astype(str))
    items = []
    for i, fn in enumerate(files):
        row = rows.loc[fn]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        for part, region in regions[fn].items():
            if parts is None or part in parts:
                noun = (part_nouns or {}).get(part) or part.replace("_", " ")
                word = noun.split()[-1]  # the word the map is read from
                text = part_text(part, row, template, ds.extras.get("attribute_part"), noun)
                items.append(PartItem(i, part, text, word, region))
    return items, files


def query_variants(items: list[PartItem], ds, files: list[str], template: str = "a bird with {desc}",
                   part_nouns: dict[str, str] | None = None, seed: int = 0) -> dict[str, list[tuple[int, PartItem]]]:
    """Word-specificity controls of pointing-game queries: ``{"bare": [...], "wrong_value": [...]}``, each a
    list of ``(k, item)`` with ``k`` the position of the original query in ``items`` (same image, part and
    region, another caption):

    - ``bare``: the part noun alone ("a bird with a crown");
    - ``wrong_value``: every attribute value of the part replaced by another value the same attribute takes
      in ``ds`` (a seeded pick: "a bird with a brown crown" on a yellow crown); parts without attribute
      values, or whose attributes take one value only, have none.
    """
    attribute_part = ds.extras.get("attribute_part")
    rows = ds.table.set_index(ds.table["filename"].astype(str))
    values: dict[str, list[str]] = {}  # the values each attribute column takes, filled as columns are met
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"bare": [], "wrong_value": []}
    for k, it in enumerate(items):
        row = rows.loc[files[it.index]]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        noun = (part_nouns or {}).get(it.part) or it.part.replace("_", " ")
        out["bare"].append((k, PartItem(it.index, it.part, part_text(it.part, None, template, attribute_part, noun),
                                        it.word, it.region)))
        cols = part_columns(it.part, row, attribute_part)
        wrong = row.copy()
        for c in cols:
            if c not in values:
                values[c] = sorted({v for v in map(_value, ds.table[c]) if v is not None})
            others = [v for v in values[c] if v != _value(row[c])]
            if not others:
                break
            wrong[c] = others[int(rng.integers(len(others)))]
        else:
            if cols:
                out["wrong_value"].append((k, PartItem(it.index, it.part, part_text(it.part, wrong, template,
                                                                                    attribute_part, noun), it.word, it.region)))
    return out
