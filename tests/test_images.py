"""Images decode as a photo viewer shows them: EXIF orientation, 16-bit, CMYK, palette with transparency,
LA and RGBA. Each fixture is written here and checked against a numpy computation of what it shows."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.cache import cached_tensors, file_fingerprint
from workbench.data import images
from workbench.data.images import BACKGROUND, decode_images, image_cache
from workbench.io import hash_key

N = 8  # square fixtures decoded at their own size: the resize/crop geometry leaves pixels as they are
BG = np.array(BACKGROUND, dtype=np.float64)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def _decoded(path: Path) -> np.ndarray:
    """What the workbench decodes, as H x W x 3 integers."""
    return decode_images([path], N)[0].permute(1, 2, 0).numpy().astype(np.int64)


def _png16_rgb(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _over_background(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(colour * a + BG * (1 - a)).astype(np.int64)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG used to come out solid white: PIL's convert("RGB") clips its values at 255."""
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (N, N)).astype(np.uint16)
    wide[0, 0], wide[0, 1] = 0, 65535
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    got = _decoded(tmp_path / "grey16.png")
    want = np.rint(wide / 257).astype(np.int64)
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=2))
    assert got.min() == 0 and got.max() == 255 and 100 < got.mean() < 155  # not solid white


def test_16_bit_rgb_is_scaled(tmp_path):
    wide = np.random.default_rng(1).integers(0, 65536, (N, N, 3)).astype(np.uint16)
    got = _decoded(_png16_rgb(tmp_path / "rgb16.png", wide))
    assert np.abs(got - np.rint(wide / 257)).max() <= 1  # PIL keeps the high byte: v >> 8 is within 1 of v / 257


# What a viewer shows for each EXIF orientation of the stored pixels a (TIFF/EXIF 2.3, tag 0x0112).
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored across the main diagonal
    6: lambda a: np.rot90(a, -1),  # stored lying on its left side: turn 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored across the other diagonal
    8: lambda a: np.rot90(a, 1),  # turn 90 degrees anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (N, N, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    assert np.array_equal(_decoded(tmp_path / "photo.png"), ORIENTED[orientation](stored).astype(np.int64))


def test_cmyk(tmp_path):
    cmyk = np.random.default_rng(2).integers(0, 256, (N, N, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    want = (255 - c) * (255 - k) / 255  # the naive separation: no ink is white, full black ink is black
    assert np.abs(_decoded(tmp_path / "print.tif") - want).max() <= 1


def test_palette_with_transparency(tmp_path):
    colours = np.array([[10, 20, 30], [200, 30, 40], [20, 180, 60], [90, 90, 250]], dtype=np.uint8)
    alpha = np.array([0, 255, 128, 255], dtype=np.uint8)  # entry 0 transparent, entry 2 half
    index = np.random.default_rng(3).integers(0, 4, (N, N)).astype(np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(colours.ravel().tolist())
    im.save(tmp_path / "icon.png", transparency=alpha.tobytes())
    assert Image.open(tmp_path / "icon.png").mode == "P"
    want = _over_background(colours[index].astype(np.float64), alpha[index])
    got = _decoded(tmp_path / "icon.png")
    assert np.abs(got - want).max() <= 1
    assert np.array_equal(got[index == 0], np.tile(np.array(BACKGROUND), ((index == 0).sum(), 1)))


def test_palette_with_one_transparent_index(tmp_path):
    index = np.random.default_rng(4).integers(0, 3, (N, N)).astype(np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette([0, 0, 0, 250, 0, 0, 0, 0, 250])  # the transparent entry stores black
    im.save(tmp_path / "gif.gif", transparency=0)
    want = np.array([BACKGROUND, (250, 0, 0), (0, 0, 250)])[index]
    assert np.array_equal(_decoded(tmp_path / "gif.gif"), want)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_over_the_background(tmp_path, mode):
    rng = np.random.default_rng(5)
    channels = 1 if mode == "LA" else 3
    colour = rng.integers(0, 256, (N, N, channels)).astype(np.uint8)
    alpha = rng.integers(0, 256, (N, N)).astype(np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([colour, alpha]), mode).save(tmp_path / f"{mode}.png")
    want = _over_background(np.repeat(colour, 3 // channels, axis=2).astype(np.float64), alpha)
    got = _decoded(tmp_path / f"{mode}.png")
    assert np.abs(got - want).max() <= 1
    assert np.array_equal(got[0, 0], BACKGROUND) and np.array_equal(got[0, 1], np.repeat(colour[0, 1], 3 // channels))


def test_images_decoded_the_old_way_are_not_reused(tmp_path, monkeypatch):
    """The decoded-image cache key holds the decode version: an entry the old decoder stored for a
    16-bit PNG (solid white) is never read back."""
    wide = np.full((N, N), 40000, dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(wide).save(path)
    old_key = hash_key("images-v1", N, file_fingerprint([str(path)]))  # the key before decode versions
    cached_tensors("images", old_key, lambda: {"images": torch.full((1, 3, N, N), 255, dtype=torch.uint8)})
    assert int(image_cache([path], N).float().mean().round()) == round(40000 / 257)
    key = images._image_cache_key([str(path)], N)
    monkeypatch.setattr(images, "DECODE_VERSION", images.DECODE_VERSION + 1)
    assert images._image_cache_key([str(path)], N) != key
