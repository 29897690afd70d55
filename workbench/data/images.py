"""Image decoding: validate files, decode each once into a uint8 tensor cache.

Files are decoded as a photo viewer shows them (:func:`to_rgb`): EXIF orientation applied, 16-bit
samples scaled to 8 bits, CMYK and palette images converted, and transparency composited over
:data:`BACKGROUND`. :data:`DECODE_VERSION` is part of every cache key built on decoded pixels, so a
change here never reuses images (or features) decoded the old way.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..cache import cached_tensors, file_fingerprint
from ..io import cache_root, hash_key, read_json, write_json
from .geometry import resize_crop_pil


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


def _decode_or_reason(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    if not Path(path).exists():
        return None, "missing"
    if Path(path).stat().st_size == 0:
        return None, "empty file"
    try:
        return _decode(path, size), None  # convert() loads every pixel: truncated files raise here
    except Exception as e:  # PIL raises many types for corrupt data
        return None, f"{type(e).__name__}: {e}"


def decode_checked(paths, size: int, workers: int = 8, progress: bool = False) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """One pass that both checks and decodes: ``(images of the readable files, [(path, reason), ...])``.

    Checking, then decoding, reads every file twice; this reads it once.
    """
    paths = [str(p) for p in paths]
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    keep, bad = [], []
    with ThreadPoolExecutor(workers) as ex:
        it = ex.map(lambda p: _decode_or_reason(p, size), paths)
        for i, (arr, reason) in enumerate(tqdm(it, total=len(paths), disable=not progress, desc="decode")):
            if reason is None:
                out[i] = torch.from_numpy(arr)
                keep.append(i)
            else:
                bad.append((paths[i], reason))
    return (out[keep] if bad else out), bad


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
