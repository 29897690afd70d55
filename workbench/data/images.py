"""Image decoding: validate files, decode each once into a uint8 tensor cache: centre crops for
evaluation (:func:`image_cache`), whole images for training's crops (:func:`whole_image_cache`).

Files are decoded as a photo viewer shows them (:func:`to_rgb`): EXIF orientation applied, 16-bit
samples scaled to 8 bits, CMYK and palette images converted, and transparency composited over
:data:`BACKGROUND`. :data:`DECODE_VERSION` is part of every cache key built on decoded pixels, so a
change here never reuses images (or features) decoded the old way.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..cache import cached_tensors, file_fingerprint
from ..io import cache_root, hash_key, read_json, write_json
from ..progress import progress_bar
from .geometry import crop_box, resize_crop_pil


class BadImagesError(ValueError):
    """Raised with the full list of unreadable images: ``.bad`` is ``[(path, reason), ...]``."""

    def __init__(self, bad: list[tuple[str, str]]):
        self.bad = bad
        lines = "\n".join(f"  {p}: {r}" for p, r in bad)
        super().__init__(
            f"{len(bad)} image file(s) cannot be read:\n{lines}\n"
            "Fix or remove them, or pass skip_bad_images=True to skip and record them."
        )


# Bump when decoding changes what pixels a file gives: it keys the image, check and feature caches.
# 1: Image.convert("RGB") only; 2: to_rgb (EXIF orientation, 16-bit scaling, alpha over BACKGROUND).
DECODE_VERSION = 2
# Transparent pixels are composited over white, as viewers and browsers show them on a page; a fixed
# colour keeps the decode deterministic (PIL's plain convert("RGB") drops alpha, exposing whatever
# colour the transparent pixels happen to store).
BACKGROUND = (255, 255, 255)
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (PNG, TIFF) opens as these


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, the way a photo viewer shows it.

    EXIF orientation is applied (phone photos stand upright); 16-bit greyscale is scaled by 1/257
    (PIL's convert clips it, so a 16-bit PNG came out white); CMYK, palette (with its transparency),
    LA and RGBA become RGB, transparency composited over :data:`BACKGROUND`.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE:
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), im).convert("RGB")
    return im.convert("RGB")


def _decode(path: str, size: int) -> np.ndarray:
    # A square cache (short side resized, centre crop) keeps batches stackable; random crops
    # happen later on the device.
    with Image.open(path) as im:
        im = resize_crop_pil(to_rgb(im), size)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def _decode_or_reason(path: str, *args, decode=_decode) -> tuple:
    """``(decode(path, *args), None)``, or ``(None, why the file cannot be read)``."""
    if not Path(path).exists():
        return None, "missing"
    if Path(path).stat().st_size == 0:
        return None, "empty file"
    try:
        return decode(path, *args), None  # convert() loads every pixel: truncated files raise here
    except Exception as e:  # PIL raises many types for corrupt data
        return None, f"{type(e).__name__}: {e}"


def decode_checked(paths, size: int, workers: int = 8, progress: bool = False) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """One pass that both checks and decodes: ``(images of the readable files, [(path, reason), ...])``.

    Checking, then decoding, reads every file twice; this reads it once.
    """
    paths = [str(p) for p in paths]
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    keep, bad = [], []
    for i, arr, reason in _decode_pool(paths, (size,), _decode, workers, progress):
        if reason is None:
            out[i] = torch.from_numpy(arr)
            keep.append(i)
        else:
            bad.append((paths[i], reason))
    return (out[keep] if bad else out), bad


def _decode_pool(paths: list[str], args: tuple, decode, workers: int, progress: bool):
    """``(i, decode(paths[i], *args) or None, reason or None)`` for each file, in order, decoded in threads."""
    with ThreadPoolExecutor(workers) as ex:
        it = ex.map(lambda p: _decode_or_reason(p, *args, decode=decode), paths)
        for i, (got, reason) in enumerate(progress_bar(it, total=len(paths), disable=not progress, desc="decode", unit="img")):
            yield i, got, reason


def decode_images(paths, size: int, workers: int = 8, progress: bool = False) -> torch.Tensor:
    """Decode images into an ``N x 3 x size x size`` uint8 tensor (short side resized, centre crop).
    Raises :class:`BadImagesError` listing every unreadable file."""
    images, bad = decode_checked(paths, size, workers=workers, progress=progress)
    if bad:
        raise BadImagesError(bad)
    return images


def _image_cache_key(paths: list[str], size: int) -> str:
    return hash_key("images", DECODE_VERSION, size, file_fingerprint(paths))


def image_cache(paths, size: int, progress: bool = False, images: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_images`, cached on disk keyed by the files' identity and ``size``.

    ``images``: already decoded (e.g. by :func:`decode_checked`); stored as the entry when there is none.
    """
    paths = [str(p) for p in paths]
    if images is not None and len(images) != len(paths):
        raise ValueError(f"images has {len(images)} rows for {len(paths)} paths")
    compute = (lambda: {"images": images}) if images is not None else (
        lambda: {"images": decode_images(paths, size, progress=progress)})
    return cached_tensors("images", _image_cache_key(paths, size), compute)["images"]


def image_cache_exists(paths, size: int) -> bool:
    """True when :func:`image_cache` would decode nothing (every file then decoded without error)."""
    return (cache_root() / "images" / f"{_image_cache_key([str(p) for p in paths], size)}.safetensors").exists()


def check_images(paths: list[str], size: int, keep_partial: bool = True) -> list[tuple[str, str]]:
    """Unreadable images as ``(path, reason)``; remembered per file fingerprint so a warm re-run decodes
    nothing. The check decodes each file once and keeps the result as the image cache of the readable
    files, so the encoding step that follows decodes nothing either. ``keep_partial=False``: when some
    files are bad, do not store the others' images (the run stops; the files will likely be fixed)."""
    paths = [str(p) for p in paths]
    if not all(Path(p).is_file() for p in paths):  # fingerprints need stat(); missing files are rare
        return decode_checked(paths, size)[1]  # names the missing ones; nothing to key a cache on
    key = hash_key("image-check", DECODE_VERSION, file_fingerprint(paths))
    path = cache_root() / "image_checks" / f"{key}.json"
    if path.exists():
        return [tuple(x) for x in read_json(path)]
    if image_cache_exists(paths, size):  # decoded before without an error: all readable
        bad = []
    else:
        images, bad = decode_checked(paths, size)
        if keep_partial or not bad:
            reason = dict(bad)
            image_cache([p for p in paths if p not in reason], size, images=images)
    write_json(path, [list(b) for b in bad])
    return bad


# Training crops sample the whole image, as open_clip, FLYP and GIST train (RandomResizedCrop of the
# photo), not its centre square: each image keeps its short side at the model's size S, its long side
# at most TRAIN_MAX_ASPECT x S (a wider image is resized down whole to fit, keeping its aspect).
TRAIN_MAX_ASPECT = 4 / 3
WHOLE_LAYOUT = 1  # bump when the canvas layout below changes: it keys the cache


@dataclass(frozen=True)
class WholeImages:
    """Whole images on one uint8 canvas ``N x 3 x S x W``, the long side along W: image i fills the
    top-left ``sizes[i]`` of its canvas, transposed when portrait (h > w), the rest repeats its edge
    pixels. ``sizes``: ``N x 2`` int32, each image's (h, w) as it is shown. A set of square images
    has ``W == S`` and the very pixels of :func:`image_cache`."""

    images: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> WholeImages:
        return WholeImages(self.images[rows], self.sizes[rows])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.sizes.numel() * self.sizes.element_size()


def whole_size(w: int, h: int, size: int, long_side: int) -> tuple[int, int]:
    """``(new_w, new_h)`` of a ``w x h`` image kept whole: short side ``size`` (rounded as the centre
    crop's resize, so both caches share its pixels), unless the long side then exceeds ``long_side``:
    then the long side is ``long_side``."""
    nw, nh, _, _ = crop_box(w, h, size)
    if max(nw, nh) <= long_side:
        return nw, nh
    f = long_side / max(w, h)
    return (long_side, max(1, round(h * f))) if w >= h else (max(1, round(w * f)), long_side)


def _decode_both(path: str, size: int, long_side: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(centre crop ``3 x size x size``, whole image ``3 x short x long`` (transposed when portrait),
    its (h, w) as shown) of one file, decoded once."""
    with Image.open(path) as im:
        im = to_rgb(im)
        centre = np.asarray(resize_crop_pil(im, size), dtype=np.uint8).transpose(2, 0, 1).copy()
        whole = np.asarray(im.resize(whole_size(*im.size, size, long_side), Image.BICUBIC), dtype=np.uint8)
    h, w = whole.shape[:2]
    return centre, whole.transpose(2, 1, 0) if h > w else whole.transpose(2, 0, 1), (h, w)


def _place(canvas: torch.Tensor, arr: np.ndarray) -> None:
    """``arr`` (3 x h x w) into the top-left of ``canvas``; its edge pixels repeated to the right and below,
    so even a rounding-level read past the edge sees the image's own border."""
    _, h, w = arr.shape
    canvas[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(arr))
    canvas[:, :h, w:] = canvas[:, :h, w - 1 : w]
    canvas[:, h:, :] = canvas[:, h - 1 : h, :]


def decode_whole(paths, size: int, long_side: int, workers: int = 8,
                 progress: bool = False) -> tuple[WholeImages, torch.Tensor]:
    """``(WholeImages, centre crops N x 3 x size x size)`` of ``paths``, each file decoded once. Raises
    :class:`BadImagesError` listing every unreadable file."""
    paths = [str(p) for p in paths]
    canvas = torch.empty((len(paths), 3, size, long_side), dtype=torch.uint8)
    centre = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    sizes = torch.empty((len(paths), 2), dtype=torch.int32)
    bad = []
    for i, got, reason in _decode_pool(paths, (size, long_side), _decode_both, workers, progress):
        if reason is not None:
            bad.append((paths[i], reason))
            continue
        centre[i] = torch.from_numpy(got[0])
        _place(canvas[i], got[1])
        sizes[i] = torch.tensor(got[2])
    if bad:
        raise BadImagesError(bad)
    width = max([size, *sizes.flatten().tolist()])  # the canvas is as wide as its widest image
    return WholeImages(canvas[..., :width].contiguous(), sizes), centre


def _whole_cache_key(paths: list[str], size: int, long_side: int) -> str:
    return hash_key("images-whole", WHOLE_LAYOUT, DECODE_VERSION, size, long_side, file_fingerprint(paths))


def whole_image_cache(paths, size: int, max_aspect: float = TRAIN_MAX_ASPECT, progress: bool = False) -> WholeImages:
    """The training cache: :func:`decode_whole`, cached on disk beside :func:`image_cache` (keyed by the
    files, ``size``, the long-side cap ``round(size * max_aspect)`` and :data:`WHOLE_LAYOUT`). Decoding
    also stores the files' :func:`image_cache` entry, so validation's centre crops decode nothing."""
    paths = [str(p) for p in paths]
    long_side = max(size, round(size * max_aspect))

    def compute():
        whole, centre = decode_whole(paths, size, long_side, progress=progress)
        image_cache(paths, size, images=centre)  # kept unless an entry exists (then the same pixels)
        return {"images": whole.images, "sizes": whole.sizes}

    out = cached_tensors("images", _whole_cache_key(paths, size, long_side), compute)
    return WholeImages(out["images"], out["sizes"])
