"""Drawing one synthetic bird (numpy + PIL only): the body plan's parts and colours, the per-image nuisance
(position, scale, flip, background, noise, occluder) and :func:`render_bird`, a pure function of an
attribute dict and a nuisance. It knows nothing of species; :mod:`workbench.data.synthetic` designs them.

Images are drawn without anti-aliasing, so every pixel of a part mask has exactly the part's colour
before noise. The label map marks the *visible* pixels of each part (ids in :data:`PARTS`; occluders
on top).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

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

_BACKGROUNDS = [(170, 200, 230), (180, 210, 160), (220, 205, 170), (190, 190, 190), (200, 175, 195), (150, 185, 170)]
_OCCLUDER_COLORS = [(70, 100, 40), (90, 60, 30), (50, 80, 50), (110, 90, 60)]


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
_EXTENT = ((-1.02, 1.06), (-0.60, 0.45))  # the bird's outline in bird units (tail tip to beak, crown to breast)


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


def sample_nuisance(rng: np.random.Generator, size: int, occlusion: float = 0.3, noise: float = 6.0,
                    pose: float = 0.0) -> dict:
    """Per-image nuisance: position, scale, flip, background, noise, occluder (JSON-able).

    ``pose`` in [0, 1] widens the pose: at 0 the bird sits near the centre at scale 0.38-0.46 and
    upright (generator version 2's draws, byte for byte); at 1 the scale spans 0.30-0.46, the bird
    turns by up to +-20 degrees and moves anywhere that keeps its whole outline in the frame, so where
    a part lies depends on the image (an image-agnostic part-location prior cannot point at it).
    """
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
    if pose:  # drawn after everything else, so pose = 0 keeps the old draws
        if not 0 <= pose <= 1:
            raise ValueError(f"pose must be in [0, 1], got {pose}")
        scale = float(rng.uniform(0.38 - 0.08 * pose, 0.46))
        rot = float(rng.uniform(-1, 1) * pose * math.radians(20))
        # Place the turned bird anywhere its whole outline (_EXTENT) stays in the frame; a bird too
        # large for that (scale 0.46 turned 20 degrees) is centred.
        c, sn, f = math.cos(rot), math.sin(rot), -1.0 if nz["flip"] else 1.0
        xs = [f * scale * (c * x + sn * y) for x in _EXTENT[0] for y in _EXTENT[1]]
        ys = [scale * (-sn * x + c * y) for x in _EXTENT[0] for y in _EXTENT[1]]
        where = []
        for lo, hi in ((-min(xs), 1 - max(xs)), (-min(ys), 1 - max(ys))):
            mid = (lo + hi) / 2
            half = max(0.0, (hi - lo) / 2) * pose
            where.append(round(float(mid + rng.uniform(-half, half)), 4))
        nz.update(scale=round(scale, 4), x=where[0], y=where[1], rotation=round(rot, 4))
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
    c, sn = math.cos(nuisance.get("rotation", 0.0)), math.sin(nuisance.get("rotation", 0.0))

    def tr(pts):  # turn in bird units (positive: head up), then flip, scale and place
        return [(cx + sx * (c * x + sn * y), cy + s * (-sn * x + c * y)) for x, y in pts]

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
