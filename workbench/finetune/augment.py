"""Training augmentation on the device, in batches: random resized crop + horizontal flip + normalise.

Input is a decoded uint8 cache, so no JPEG is decoded during training: the whole images of
``workbench.data.images.whole_image_cache`` (crops sample all of each image, as open_clip and FLYP
train; ``sizes`` gives each image's region of the canvas) or any ``N x 3 x S x S`` batch. Crop boxes
are drawn on the CPU from a seeded generator (the same boxes on any device, and no device sync) and
applied with one ``affine_grid`` + ``grid_sample`` call for the whole batch, so the cost is one
bilinear resample per pixel.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ..clip import channel_constants


def crop_params(
    n: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
    aspect: float | torch.Tensor = 1.0,
    tries: int = 10,
) -> torch.Tensor:
    """``n x 5`` float tensor of crop boxes ``(cx, cy, w, h, sign)`` in fractions of the image's width and
    height.

    Samples like torchvision's ``RandomResizedCrop.get_params`` (area fraction uniform in ``scale``,
    aspect log-uniform in ``ratio``, up to ``tries`` draws until the box fits, else its fallback: the
    whole image, or the central crop of the nearest allowed ratio when the image's own lies outside
    ``ratio``), vectorised over the batch. ``sign`` is -1 for a horizontal flip. ``aspect`` = width /
    height of the source image: one number, or one per box (``n`` values). The random draws do not
    depend on ``aspect``.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
    if torch.is_tensor(aspect):
        aspect = aspect.to(torch.float32).reshape(-1, 1)
    g = generator
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=g)
    logr = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = logr.exp()
    # w, h as fractions of the image width / height; area is a fraction of the image area
    w = torch.sqrt(area * r / aspect)
    h = torch.sqrt(area * aspect / r)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    fw, fh = _fallback(n, aspect, ratio)
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], fw)
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], fh)
    u = torch.rand(n, 2, generator=g)
    centred = (first < 0)[:, None]  # the fallback box is the central one, as torchvision's
    u = torch.where(centred, 0.5, u)
    cx = w / 2 + u[:, 0] * (1 - w)
    cy = h / 2 + u[:, 1] * (1 - h)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return torch.stack([cx, cy, w, h, sign], 1)


def _fallback(n: int, aspect, ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's box when no draw fits: the whole image, cut to the nearest ratio in ``ratio`` when
    the image's own lies outside it (``w``, ``h`` as fractions; 1 for an image inside the range)."""
    a = torch.as_tensor(aspect, dtype=torch.float32).reshape(-1).expand(n)
    w = torch.where(a > ratio[1], ratio[1] / a, torch.ones(n))
    h = torch.where(a < ratio[0], a / ratio[0], torch.ones(n))
    return w, h


@lru_cache(maxsize=None)
def _normalizer(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """``(-mean / std, 1 / (255 std))`` on ``device``, built once per (values, device) like
    :func:`workbench.clip.encode.channel_constants` (no host-device copy per training step)."""
    m, s = channel_constants(mean, std, device)
    with torch.inference_mode(False):
        return -m / s, 1 / (255 * s)


def apply_crops(
    images: torch.Tensor,
    params: torch.Tensor,
    size: int,
    mean=OPENAI_DATASET_MEAN,
    std=OPENAI_DATASET_STD,
    dtype: torch.dtype = torch.float32,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample each uint8 image's box (from :func:`crop_params`) to ``size x size``, flip, normalise.

    ``sizes`` (``n x 2``: (h, w) as shown, on ``images``' device): each image fills only that top-left
    region of its canvas, transposed when h > w (``workbench.data.images.WholeImages``); boxes are then
    fractions of that region, and nothing outside it is read. Bilinear; crops from a cache at the
    model's resolution are never larger than the output, so no antialiasing is needed.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 N x 3 x H x W batch, got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    p = params.to(images.device, torch.float32, non_blocking=True)
    cx, cy, w, h, sign = p.unbind(1)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = w * sign  # output u in [-1, 1] -> input x = 2cx - 1 + w * u (mirrored when sign < 0)
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    bound = None
    if sizes is not None:
        theta, bound = to_canvas(theta, sizes, images.shape[-2:])
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    if bound is not None:
        grid = torch.minimum(grid, bound)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    # (x / 255 - mean) / std as one fused multiply-add
    shift, scale = _normalizer(tuple(mean), tuple(std), x.device)
    x = torch.addcmul(shift, x, scale)
    return x.to(dtype)


EDGE = 1e-3  # pixels: how far inside its last row / column a sample is kept, so padding gets no weight


def to_canvas(theta: torch.Tensor, sizes: torch.Tensor, canvas) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of each image's own region (``sizes``: (h, w) as shown) -> crops of the ``canvas`` (H, W) that
    holds it at the top-left, transposed when h > w: ``(theta, bound)``, the affine maps into the canvas and
    the largest grid coordinates (``n x 1 x 1 x 2``) inside each image's far edges (the near ones are the
    canvas's own, where ``padding_mode="border"`` clamps). Border padding within the image, then, and the
    resample never weighs a pixel outside it. An image that fills the canvas keeps its map bit for bit."""
    n = theta.shape[0]
    hw = sizes.to(theta.device, torch.float32)
    h, w = hw[:, 0], hw[:, 1]
    portrait = h > w
    t = torch.where(portrait.view(n, 1, 1), theta.flip(1), theta)  # portrait: canvas x runs along shown y
    ext = torch.stack([torch.where(portrait, h, w), torch.where(portrait, w, h)], 1)  # (cols, rows) filled
    full = torch.tensor([canvas[1], canvas[0]], dtype=torch.float32, device=theta.device)
    f = ext / full  # an image's normalised [-1, 1] spans [-1, 2f - 1] of the canvas: x -> (x + 1) f - 1
    t = t * f[:, :, None]
    t[:, :, 2] += f - 1
    # pixel e = ext - 1 - EDGE (as grid_sample unnormalises: pixel i's centre at i) in canvas coordinates
    bound = (2 * (ext - 1 - EDGE) + 1) / full - 1
    fills = (~portrait & (h == canvas[0]) & (w == canvas[1])).view(n, 1)
    theta = torch.where(fills.view(n, 1, 1), theta, t)
    bound = torch.where(fills, torch.full_like(bound, float("inf")), bound)
    return theta, bound.view(n, 1, 1, 2)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    mean=OPENAI_DATASET_MEAN,
    std=OPENAI_DATASET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip + Normalize for a uint8 batch on any device.

    Deterministic given ``generator`` (a CPU generator; the draws do not depend on the device).
    """
    aspect = images.shape[-1] / images.shape[-2]
    params = crop_params(images.shape[0], scale, ratio, flip, generator, aspect)
    return apply_crops(images, params, size, mean, std, dtype)


def shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Light augmentation on a uint8 batch, kept uint8: one random shift for the batch (reflect pad by ``pad``
    + crop) and a horizontal flip per image. The tiny CLIP's pretraining recipe (its images are the
    synthetic benchmark's whole squares, so a shift, not a resized crop)."""
    n, _, h, w = x.shape
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = xp[..., dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x.round().clamp(0, 255).to(torch.uint8)
