"""The one image geometry of the workbench: resize the short side to ``size``, centre-crop a square.

It is CLIP's eval transform, and every image reaches a model through it: the decoded uint8 cache
(PIL), tensors of another size (``workbench.clip.encode.normalize_images``), and the annotations
that must land on the same pixels (part keypoints, boxes and masks for the pointing game).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def crop_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)``: the image is resized to ``new_w x new_h`` (short side ``size``),
    then the ``size x size`` square at ``(left, top)`` is kept."""
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_crop_pil(im: Image.Image, size: int) -> Image.Image:
    """A PIL image resized (bicubic) and centre-cropped to ``size x size``."""
    nw, nh, left, top = crop_box(*im.size, size)
    return im.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size))


def resize_crop_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``N x C x H x W`` in [0, 1] -> ``N x C x size x size`` (bicubic, antialiased, like PIL)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    nw, nh, left, top = crop_box(w, h, size)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    return x[..., top : top + size, left : left + size]


def map_points(xy, wh: tuple[int, int], size: int) -> np.ndarray:
    """Points ``k x 2`` (x, y) in original pixels of a ``w x h`` image -> pixels of the ``size`` crop."""
    nw, nh, left, top = crop_box(wh[0], wh[1], size)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    # the resize rounds each side, so the exact scale differs slightly between x and y
    return xy * np.array([nw / wh[0], nh / wh[1]]) - np.array([left, top])


def map_mask(mask, size: int, labels: bool = False) -> torch.Tensor:
    """An ``H x W`` bool mask (or integer label map, ``labels=True``) -> ``size x size`` (nearest)."""
    m = torch.as_tensor(np.array(mask))
    if m.ndim != 2:
        raise ValueError(f"part mask must be 2-D (H x W); got shape {tuple(m.shape)}")
    m = m.long() if labels else m.bool()
    h, w = m.shape
    if (h, w) != (size, size):
        nw, nh, left, top = crop_box(w, h, size)
        m = F.interpolate(m[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].round().long()
        m = m[top : top + size, left : left + size]
    return m if labels else m.bool()
