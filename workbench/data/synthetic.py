"""Synthetic fine-grained "toy birds" benchmark with ground truth (numpy + PIL only).

Every species shares one body plan (body, crown, beak, eye, wing, breast, tail) and is a vector
of part attributes (:data:`ATTRIBUTES`). Species are grown as a tree: each new species copies an
existing one and changes one or two attributes (at least one visible in both variants), so each
species has a declared neighbour that differs from it in only those attributes. Each species has
two variants: males show the species' crown and breast colours, females a brown crown and a buff
breast, so some descriptions of a species are true of one variant only.

Images are drawn without anti-aliasing, so every pixel of a part mask has exactly the part's
colour before noise. The per-image label map (``masks/…png``, ids in :data:`PARTS`) marks the
*visible* pixels of each part (occluders on top). Output bytes are a function of the options.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from PIL import Image, ImageDraw

from ..io import cache_root, hash_key
from .dataset import Dataset

GENERATOR_VERSION = 2

PARTS = ["background", "body", "crown", "beak", "eye", "wing", "breast", "tail", "occluder"]
PART_ID = {p: i for i, p in enumerate(PARTS)}

COLORS = {
    "red": (200, 30, 30),
    "orange": (235, 130, 20),
    "yellow": (235, 210, 40),
    "green": (40, 150, 50),
    "blue": (40, 70, 200),
    "purple": (130, 50, 160),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    "brown": (120, 75, 35),
    "buff": (225, 200, 150),
}
BODY_COLOR = (165, 150, 125)  # shared by all species: not an attribute
BEAK_COLOR = (70, 60, 50)
EYE_COLOR = (10, 10, 10)

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

DEFAULTS = dict(n_species=12, seed=0, size=64, n_train=30, n_val=10, n_test=100, occlusion=0.3, noise=6.0)
MAX_SPECIES = 60

_BACKGROUNDS = [(170, 200, 230), (180, 210, 160), (220, 205, 170), (190, 190, 190), (200, 175, 195), (150, 185, 170)]
_OCCLUDER_COLORS = [(70, 100, 40), (90, 60, 30), (50, 80, 50), (110, 90, 60)]


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


# ---------------------------------------------------------------- rendering
def _ellipse(cx, cy, rx, ry, rot=0.0, n=28, a0=0.0, a1=2 * math.pi):
    c, s = math.cos(rot), math.sin(rot)
    pts = []
    for k in range(n + 1 if a1 - a0 < 2 * math.pi else n):
        t = a0 + (a1 - a0) * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + c * x - s * y, cy + s * x + c * y))
    return pts


_BEAKS = {
    "short": [(0.70, -0.44), (0.88, -0.35), (0.70, -0.26)],
    "long": [(0.70, -0.40), (1.06, -0.34), (0.70, -0.29)],
    "hooked": [(0.70, -0.46), (0.88, -0.43), (0.97, -0.32), (0.94, -0.20), (0.88, -0.29), (0.70, -0.25)],
}
_TAILS = {
    "short": [(-0.40, 0.00), (-0.70, -0.08), (-0.72, 0.14), (-0.40, 0.22)],
    "long": [(-0.40, 0.00), (-1.00, -0.18), (-1.02, 0.20), (-0.40, 0.22)],
}
_HEAD = (0.50, -0.36, 0.24)


def _bird_shapes(attrs: dict):
    """(part, colour, polygon in bird units) in drawing order; the bird faces right, y down."""
    col = {a: COLORS[attrs[a]] for a in ("crown_color", "wing_color", "breast_color")}
    hx, hy, hr = _HEAD
    shapes = [
        ("tail", BODY_COLOR, _TAILS[attrs["tail_size"]]),
        ("body", BODY_COLOR, _ellipse(0.0, 0.10, 0.55, 0.35)),
        ("body", BODY_COLOR, _ellipse(hx, hy, hr, hr)),
        ("breast", col["breast_color"], _ellipse(0.24, 0.22, 0.30, 0.19)),
    ]
    dark = tuple(int(c * 0.45) for c in col["breast_color"])
    if attrs["breast_pattern"] == "streaked":
        for x in (0.08, 0.20, 0.32):
            shapes.append(("breast", dark, [(x - 0.025, 0.06), (x + 0.025, 0.06), (x + 0.045, 0.33), (x - 0.005, 0.33)]))
    elif attrs["breast_pattern"] == "spotted":
        for x, y in ((0.06, 0.14), (0.20, 0.10), (0.34, 0.15), (0.12, 0.27), (0.27, 0.27), (0.40, 0.24)):
            shapes.append(("breast", dark, _ellipse(x, y, 0.045, 0.045, n=10)))
    shapes += [
        ("wing", col["wing_color"], _ellipse(-0.12, -0.01, 0.40, 0.16, rot=-0.25)),
        ("crown", col["crown_color"], _ellipse(hx, hy, hr, hr, a0=math.pi * 1.0, a1=math.pi * 2.0, n=16)),
        ("beak", BEAK_COLOR, _BEAKS[attrs["beak_shape"]]),
        ("eye", EYE_COLOR, _ellipse(hx + 0.09, hy + 0.02, 0.05, 0.05, n=10)),
    ]
    return shapes


def sample_nuisance(rng: np.random.Generator, size: int, occlusion: float = 0.3, noise: float = 6.0) -> dict:
    """Per-image nuisance: position, scale, flip, background, noise, occluder (JSON-able)."""
    scale = float(rng.uniform(0.38, 0.46))
    nz = {
        "scale": round(scale, 4),
        "x": round(float(0.5 + rng.uniform(-0.05, 0.05)), 4),
        "y": round(float(0.54 + rng.uniform(-0.06, 0.06)), 4),
        "flip": bool(rng.random() < 0.5),
        "background": int(rng.integers(len(_BACKGROUNDS))),
        "bg_jitter": [int(v) for v in rng.integers(-20, 21, size=3)],
        "texture": str(rng.choice(["smooth", "stripes", "speckle"])),
        "texture_seed": int(rng.integers(2**31)),
        "noise": round(float(rng.uniform(0.5, 1.0) * noise), 3),
        "noise_seed": int(rng.integers(2**31)),
        "occluder": None,
    }
    if rng.random() < occlusion:
        kind = str(rng.choice(["branch", "leaf"]))
        nz["occluder"] = {
            "kind": kind,
            "color": int(rng.integers(len(_OCCLUDER_COLORS))),
            "x": round(float(rng.uniform(0.25, 0.75)), 4),
            "y": round(float(rng.uniform(0.25, 0.8)), 4),
            "angle": round(float(rng.uniform(0, math.pi)), 4),
            "r": round(float(rng.uniform(0.04, 0.09) if kind == "branch" else rng.uniform(0.09, 0.15)), 4),
        }
    return nz


def _background(nz: dict, size: int) -> np.ndarray:
    base = np.clip(np.array(_BACKGROUNDS[nz["background"]]) + np.array(nz["bg_jitter"]), 0, 255).astype(np.float32)
    rng = np.random.default_rng(nz["texture_seed"])
    if nz["texture"] == "smooth":
        small = rng.normal(0, 1, (6, 6)).astype(np.float32)
        lo, hi = small.min(), small.max()
        im = Image.fromarray(((small - lo) / (hi - lo + 1e-6) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        tex = (np.asarray(im, np.float32) / 255 - 0.5) * 50
    elif nz["texture"] == "stripes":
        ang, freq = rng.uniform(0, math.pi), rng.uniform(3, 8)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        tex = 14 * np.sin(2 * math.pi * freq * (xx * math.cos(ang) + yy * math.sin(ang)))
    else:
        tex = rng.normal(0, 12, (size, size)).astype(np.float32)
    return base[None, None, :] + tex[..., None]


def render_bird(attrs: dict, nuisance: dict, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: ``(rgb uint8 H x W x 3, label map uint8 H x W)`` (ids in :data:`PARTS`).

    A pure function of its inputs, so two species rendered with the same nuisance differ only in
    the pixels of the parts whose attributes differ.
    """
    bg = np.clip(_background(nuisance, size), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    lab = Image.new("L", (size, size), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    s = nuisance["scale"] * size
    cx, cy = nuisance["x"] * size, nuisance["y"] * size
    sx = -s if nuisance["flip"] else s

    def tr(pts):
        return [(cx + sx * x, cy + s * y) for x, y in pts]

    for part, color, pts in _bird_shapes(attrs):
        q = tr(pts)
        di.polygon(q, fill=tuple(color))
        dl.polygon(q, fill=PART_ID[part])
    occ = nuisance.get("occluder")
    if occ:
        ox, oy, r, a = occ["x"] * size, occ["y"] * size, occ["r"] * size, occ["angle"]
        if occ["kind"] == "branch":  # a bar across the whole image
            dx, dy, L = math.cos(a), math.sin(a), 2 * size
            q = [(ox - L * dx - r * dy, oy - L * dy + r * dx), (ox + L * dx - r * dy, oy + L * dy + r * dx),
                 (ox + L * dx + r * dy, oy + L * dy - r * dx), (ox - L * dx + r * dy, oy - L * dy - r * dx)]
        else:
            q = _ellipse(ox, oy, r, r * 0.55, rot=a)
        di.polygon(q, fill=_OCCLUDER_COLORS[occ["color"]])
        dl.polygon(q, fill=PART_ID["occluder"])
    rgb = np.asarray(img, dtype=np.float32)
    if nuisance["noise"] > 0:
        rgb = rgb + np.random.default_rng(nuisance["noise_seed"]).normal(0, nuisance["noise"], rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), np.asarray(lab, dtype=np.uint8).copy()


def random_birds(n: int, seed: int, size: int = 64, occlusion: float = 0.3, noise: float = 6.0):
    """``n`` birds with independently random attributes (no species): ``(uint8 N x 3 x S x S, [attrs])``.

    Used to pretrain the tiny CLIP on attribute captions; any value an image can show is drawn.
    """
    rng = np.random.default_rng([seed, 202])
    images = np.empty((n, 3, size, size), np.uint8)
    attrs = []
    for i in range(n):
        a = {k: str(rng.choice(v)) for k, v in ATTRIBUTE_VALUES.items()}
        rgb, _ = render_bird(a, sample_nuisance(rng, size, occlusion, noise), size)
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
    opts["occlusion"], opts["noise"] = float(opts["occlusion"]), float(opts["noise"])
    return opts


def config_key(**options) -> str:
    """Cache key of a generation: generator version + resolved options."""
    return hash_key("synthetic", GENERATOR_VERSION, _options(options))


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
                nz = sample_nuisance(rng, size, opts["occlusion"], opts["noise"])
                rgb, lab = render_bird(attrs, nz, size)
                fn = f"images/{folder}/{_slug(s['species'])}_{split}_{j:04d}.png"
                mk = "masks/" + fn[len("images/"):]
                for rel, arr in ((fn, rgb), (mk, lab)):
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(root / rel, format="PNG", optimize=False, compress_level=6)
                rows.append({
                    "filename": fn, "split": split, "label": label, "species": s["species"], "variant": variant,
                    **attrs, "mask": mk, "flip": nz["flip"], "scale": nz["scale"], "x": nz["x"], "y": nz["y"],
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
    cfg = {"generator_version": GENERATOR_VERSION, **opts}
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
    ``occlusion`` (probability of an occluder), ``noise`` (max pixel noise sigma).
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
    clash = {k: (v, stored.get(k)) for k, v in options.items() if stored.get(k) != v}
    if clash:
        raise ValueError(f"synthetic dataset at {root} was generated with other options (given, stored): {clash}")
    return _read(root, {k: stored[k] for k in DEFAULTS})


# ---------------------------------------------------------------- figure
def plot_samples(ds: Dataset, n_species: int = 6, per_species: int = 4, split: str = "train"):
    """Grid of images (rows: species; columns: images, alternating variants) with part outlines."""
    t = ds.table[ds.table["split"] == split]
    labels = sorted(t["label"].unique())[:n_species]
    cmap = ListedColormap(["none", "#999999", "#e41a1c", "#ff7f00", "#000000", "#377eb8", "#4daf4a", "#984ea3", "#a65628"])
    fig, axes = plt.subplots(len(labels), 2 * per_species, figsize=(2 * per_species * 1.1, len(labels) * 1.2), squeeze=False)
    for r, lab in enumerate(labels):
        rows = t[t["label"] == lab].head(per_species)
        for c, row in enumerate(rows.itertuples()):
            img = np.asarray(Image.open(ds.root / row.filename))
            parts = ds.extras["part_mask"](row.filename)
            axes[r, 2 * c].imshow(img)
            axes[r, 2 * c].set_title(row.variant, fontsize=6)
            axes[r, 2 * c + 1].imshow(img, alpha=0.35)
            axes[r, 2 * c + 1].imshow(np.ma.masked_equal(parts, 0), cmap=cmap, vmin=0, vmax=len(PARTS) - 1,
                                      interpolation="nearest", alpha=0.8)
        axes[r, 0].set_ylabel(ds.classnames[lab].replace(" ", "\n"), fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(1, len(PARTS))]
    fig.legend(handles, PARTS[1:], loc="lower center", ncol=len(PARTS) - 1, fontsize=7, frameon=False)
    fig.suptitle("synthetic birds: images and part masks", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig
