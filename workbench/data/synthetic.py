"""Synthetic fine-grained "toy birds" benchmark with ground truth (numpy + PIL only).

Every species shares one body plan (body, crown, beak, eye, wing, breast, tail) and is a vector
of part attributes (:data:`ATTRIBUTES`). Species are grown as a tree: each new species copies an
existing one and changes one or two attributes (at least one visible in both variants), so each
species has a declared neighbour that differs from it in only those attributes. Each species has
two variants: males show the species' crown and breast colours, females a brown crown and a buff
breast, so some descriptions of a species are true of one variant only.

Here: the species design (:func:`make_species`, :func:`variant_attributes`), the dataset's files
(:func:`generate`, :func:`load`) and :func:`random_birds` for pretraining. Drawing one image is
:mod:`workbench.data.synthetic_render` (:func:`render_bird`, :data:`PARTS`, :data:`COLORS`, re-exported
here); the figure of samples is :func:`workbench.pretrain.plots.plot_samples`. The per-image label map
(``masks/…png``, ids in :data:`PARTS`) marks the *visible* pixels of each part (occluders on top).
Output bytes are a function of the options.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..io import cache_root, hash_key
from .dataset import Dataset
from .synthetic_render import COLORS, PART_ID, PARTS, render_bird, sample_nuisance

GENERATOR_VERSION = 2

# attribute -> values a species may take (male colouring for the variant attributes)
SPECIES_VALUES = {
    "crown_color": ["red", "yellow", "blue", "black", "white", "orange"],
    "wing_color": ["blue", "green", "black", "brown", "red", "purple"],
    "breast_color": ["yellow", "white", "orange", "red"],
    "breast_pattern": ["plain", "streaked", "spotted"],
    "beak_shape": ["short", "long", "hooked"],
    "tail_size": ["short", "long"],
}
ATTRIBUTES = list(SPECIES_VALUES)
VARIANTS = ["male", "female"]
# Attributes the variant overrides, and what females show instead.
FEMALE = {"crown_color": "brown", "breast_color": "buff"}
SHARED = [a for a in ATTRIBUTES if a not in FEMALE]  # visible in both variants
# Every value an image can show, per attribute (for zero-shot retrieval prompts).
ATTRIBUTE_VALUES = {a: SPECIES_VALUES[a] + ([FEMALE[a]] if a in FEMALE else []) for a in ATTRIBUTES}
ATTRIBUTE_PART = {
    "crown_color": "crown",
    "wing_color": "wing",
    "breast_color": "breast",
    "breast_pattern": "breast",
    "beak_shape": "beak",
    "tail_size": "tail",
}

# Name words: none of them is a colour or part word the pretraining captions use.
_ADJ = ["crimson", "azure", "ochre", "sable", "ivory", "jade", "russet", "saffron", "cobalt", "umber",
        "slaty", "tawny", "dusky", "rufous", "cinnamon", "scarlet", "amber", "ashy", "golden", "vermilion"]
_MARK = ["capped", "throated", "backed", "billed", "naped", "rumped", "masked", "collared", "fronted", "bellied"]
_NOUN = ["warbler", "finch", "tanager", "vireo", "sparrow", "thrush", "wren", "flycatcher", "bunting",
         "grosbeak", "oriole", "kinglet", "siskin", "pipit", "shrike", "starling"]

DEFAULTS = dict(n_species=12, seed=0, size=64, n_train=30, n_val=10, n_test=100, occlusion=0.3, noise=6.0,
                pose=1.0)
MAX_SPECIES = 60
# An option missing from a stored config.json: what the generator did before the option existed
# (config.json leaves ``pose`` out at 0, so those datasets keep their bytes and cache key).
ABSENT_MEANS = {"pose": 0.0}


# ---------------------------------------------------------------- species
def make_species(n_species: int = 12, seed: int = 0) -> pd.DataFrame:
    """The species table: ``label, species, neighbour, differs_in`` and one column per attribute.

    Attribute columns hold the male colouring; :func:`variant_attributes` gives what each variant
    shows. ``differs_in`` lists (``;``-joined) the attributes in which a species differs from
    ``neighbour``; at least one of them is visible in both variants and no two species share
    their shared-attribute values, so females stay distinguishable too.
    """
    if not 2 <= n_species <= MAX_SPECIES:
        raise ValueError(f"n_species must be between 2 and {MAX_SPECIES}, got {n_species}")
    rng = np.random.default_rng([seed, 101])
    first = {a: str(rng.choice(v)) for a, v in SPECIES_VALUES.items()}
    species, parent, diffs = [first], [None], [[]]
    tries = 0
    while len(species) < n_species:
        tries += 1
        if tries > 100_000:  # pragma: no cover - the attribute space is far larger than MAX_SPECIES
            raise RuntimeError("could not grow enough distinct species")
        # Grow mostly from recent species: a long chain spreads over more attribute values.
        p = int(rng.integers(max(0, len(species) - 3), len(species)))
        changed = [str(a) for a in rng.choice(ATTRIBUTES, size=1 + int(rng.random() < 0.5), replace=False)]
        if not set(changed) & set(SHARED):  # females must differ too
            continue
        child = dict(species[p])
        for a in changed:
            child[a] = str(rng.choice([v for v in SPECIES_VALUES[a] if v != child[a]]))
        shared = tuple(child[a] for a in SHARED)
        if any(tuple(s[a] for a in SHARED) == shared for s in species):
            continue
        species.append(child)
        parent.append(p)
        diffs.append(sorted(changed, key=ATTRIBUTES.index))
    # The root's neighbour is its first child.
    child0 = parent.index(0)
    parent[0], diffs[0] = child0, diffs[child0]
    names = _species_names(n_species, rng)
    rows = []
    for i, s in enumerate(species):
        rows.append({"label": i, "species": names[i], **s, "neighbour": names[parent[i]], "differs_in": ";".join(diffs[i])})
    return pd.DataFrame(rows)


def _species_names(n: int, rng) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = f"{rng.choice(_ADJ)}-{rng.choice(_MARK)} {rng.choice(_NOUN)}"
        if name not in names:
            names.append(str(name))
    return names


def variant_attributes(species_row, variant: str) -> dict:
    """The attribute values an image of this species and variant shows."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected {VARIANTS}")
    attrs = {a: species_row[a] for a in ATTRIBUTES}
    if variant == "female":
        attrs.update(FEMALE)
    return attrs


# ---------------------------------------------------------------- random birds
def random_birds(n: int, seed: int, size: int = 64, occlusion: float = 0.3, noise: float = 6.0, pose: float = 0.0):
    """``n`` birds with independently random attributes (no species): ``(uint8 N x 3 x S x S, [attrs])``.

    Used to pretrain the tiny CLIP on attribute captions; any value an image can show is drawn. The
    shipped weights' birds are drawn at the benchmark's default pose spread (the recipe's ``pose``).
    """
    rng = np.random.default_rng([seed, 202])
    images = np.empty((n, 3, size, size), np.uint8)
    attrs = []
    for i in range(n):
        a = {k: str(rng.choice(v)) for k, v in ATTRIBUTE_VALUES.items()}
        rgb, _ = render_bird(a, sample_nuisance(rng, size, occlusion, noise, pose), size)
        images[i] = rgb.transpose(2, 0, 1)
        attrs.append(a)
    return images, attrs


# ---------------------------------------------------------------- dataset files
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.title()).strip("_")


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown synthetic dataset option(s) {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    for k in ("n_species", "seed", "size", "n_train", "n_val", "n_test"):
        if int(opts[k]) != opts[k] or opts[k] < 0:
            raise ValueError(f"synthetic option {k} must be a non-negative integer, got {opts[k]!r}")
        opts[k] = int(opts[k])
    if opts["size"] < 16:
        raise ValueError(f"synthetic option size must be >= 16 pixels, got {opts['size']}")
    if opts["n_train"] < 1:
        raise ValueError("synthetic option n_train must be >= 1")
    opts["occlusion"], opts["noise"], opts["pose"] = float(opts["occlusion"]), float(opts["noise"]), float(opts["pose"])
    if not 0 <= opts["pose"] <= 1:
        raise ValueError(f"synthetic option pose must be in [0, 1], got {opts['pose']}")
    return opts


def config_key(**options) -> str:
    """Cache key of a generation: generator version + resolved options."""
    return hash_key("synthetic", GENERATOR_VERSION, _recorded(_options(options)))


def _recorded(opts: dict) -> dict:
    """The options as keys and ``config.json`` record them: one at its :data:`ABSENT_MEANS` value is left
    out, so datasets made before that option existed keep their key and bytes."""
    return {k: v for k, v in opts.items() if not (k in ABSENT_MEANS and v == ABSENT_MEANS[k])}


def generate(root: str | Path, **options) -> Path:
    """Write the dataset into ``root`` (must not exist yet): images, masks, metadata, config.

    Written into a temporary sibling folder and renamed at the end, so a half-written dataset
    is never seen; if another process finished first, its copy is kept.
    """
    opts = _options(options)
    root = Path(root)
    if (root / "config.json").exists():
        raise FileExistsError(f"{root} already holds a generated dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        _write(tmp, opts)
        try:
            os.rename(tmp, root)  # fails if root exists non-empty (another writer won)
        except OSError:
            if root.exists() and not any(root.iterdir()):
                root.rmdir()
                os.rename(tmp, root)
            elif not (root / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write(root: Path, opts: dict) -> None:
    size = opts["size"]
    sp = make_species(opts["n_species"], opts["seed"])
    counts = {"train": opts["n_train"], "val": opts["n_val"], "test": opts["n_test"]}
    rows, boxes = [], []
    for split_i, (split, n) in enumerate(counts.items()):
        for _, s in sp.iterrows():
            label = int(s["label"])
            folder = f"{label + 1:03d}.{_slug(s['species'])}"
            for j in range(n):
                variant = VARIANTS[j % 2]
                attrs = variant_attributes(s, variant)
                rng = np.random.default_rng([opts["seed"], 303, split_i, label, j])
                nz = sample_nuisance(rng, size, opts["occlusion"], opts["noise"], opts["pose"])
                rgb, lab = render_bird(attrs, nz, size)
                fn = f"images/{folder}/{_slug(s['species'])}_{split}_{j:04d}.png"
                mk = "masks/" + fn[len("images/"):]
                for rel, arr in ((fn, rgb), (mk, lab)):
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(root / rel, format="PNG", optimize=False, compress_level=6)
                rows.append({
                    "filename": fn, "split": split, "label": label, "species": s["species"], "variant": variant,
                    **attrs, "mask": mk, "flip": nz["flip"], "scale": nz["scale"], "x": nz["x"], "y": nz["y"],
                    **({"rotation": nz["rotation"]} if opts["pose"] else {}),
                    "occluded": nz["occluder"] is not None, "texture": nz["texture"],
                })
                for pid, part in enumerate(PARTS[1:], start=1):
                    ys, xs = np.nonzero(lab == pid)
                    if len(xs):
                        boxes.append({"filename": fn, "part": part, "x0": int(xs.min()), "y0": int(ys.min()),
                                      "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1, "pixels": int(len(xs)),
                                      "cx": round(float(xs.mean()) + 0.5, 3), "cy": round(float(ys.mean()) + 0.5, 3)})
    table = pd.DataFrame(rows)
    table.insert(0, "ID", np.arange(1, len(table) + 1))
    table.insert(1, "CLASS", table["label"] + 1)  # GIST's metadata.csv layout: ID, CLASS, filename, split, label, species
    table.to_csv(root / "metadata.csv", index=False, lineterminator="\n")
    pd.DataFrame(boxes).to_csv(root / "parts.csv", index=False, lineterminator="\n")
    sp.to_csv(root / "species.csv", index=False, lineterminator="\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(sp["species"])))
    cfg = {"generator_version": GENERATOR_VERSION, **_recorded(opts)}
    (root / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _read(root: Path, opts: dict) -> Dataset:
    table = pd.read_csv(root / "metadata.csv", keep_default_na=False)
    table = table.drop(columns=[c for c in ("ID", "CLASS") if c in table.columns])
    sp = pd.read_csv(root / "species.csv", keep_default_na=False)
    boxes = pd.read_csv(root / "parts.csv")
    masks = dict(zip(table["filename"], table["mask"]))

    def part_mask(filename: str, part: str | None = None) -> np.ndarray:
        """Label map (ids in ``extras["parts"]``) of an image, or a bool mask of one part's visible pixels."""
        if filename not in masks:
            raise KeyError(f"no image {filename!r} in the synthetic dataset at {root}")
        lab = np.asarray(Image.open(root / masks[filename]))
        if part is None:
            return lab
        if part not in PART_ID:
            raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
        return lab == PART_ID[part]

    extras = {
        "parts": list(PARTS),
        "part_mask": part_mask,
        "part_boxes": boxes,
        "attributes": {a: list(v) for a, v in ATTRIBUTE_VALUES.items()},
        "attribute_part": dict(ATTRIBUTE_PART),
        "variants": list(VARIANTS),
        "species_table": sp,
        "neighbours": {r.species: (r.neighbour, r.differs_in.split(";")) for r in sp.itertuples()},
        "colors": {k: list(v) for k, v in COLORS.items()},
        "config": opts,
    }
    return Dataset("synthetic", root, table, list(sp["species"]), extras)


def default_root(**options) -> Path:
    return cache_root() / "synthetic" / config_key(**options)


def load(root: str | Path | None = None, **options) -> Dataset:
    """The synthetic dataset. ``root=None``: generated once into ``cache_root()/synthetic/<key>``.

    With a ``root``: generated there if it holds no dataset yet, else read; options given
    explicitly must then agree with the stored ``config.json``. Options (see :data:`DEFAULTS`):
    ``n_species, seed, size, n_train, n_val, n_test`` (images per class and split),
    ``occlusion`` (probability of an occluder), ``noise`` (max pixel noise sigma), ``pose`` (0 to 1: how
    far position, scale and rotation vary; :func:`~workbench.data.synthetic_render.sample_nuisance`).
    """
    if root is None:
        root = default_root(**options)
    root = Path(root).expanduser()
    if not (root / "config.json").exists():
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"{root} is not empty and holds no synthetic dataset (config.json missing)")
        generate(root, **options)
    stored = json.loads((root / "config.json").read_text())
    _options(options)  # validate names and values
    stored = {**ABSENT_MEANS, **stored}
    clash = {k: (v, stored.get(k)) for k, v in options.items() if stored.get(k) != v}
    if clash:
        raise ValueError(f"synthetic dataset at {root} was generated with other options (given, stored): {clash}")
    return _read(root, {k: stored[k] for k in DEFAULTS})
