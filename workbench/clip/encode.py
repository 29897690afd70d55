"""Batched inference: uint8 images and strings in, embeddings (float32, on the CPU) out."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.geometry import resize_crop_tensor
from .load import image_size


@contextmanager
def output_tokens(visual):
    """Within the block, an open_clip vision tower returns ``(pooled, patch tokens)``; restored after."""
    old = getattr(visual, "output_tokens", False)
    visual.output_tokens = True
    try:
        yield visual
    finally:
        visual.output_tokens = old


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for ``precision="bf16"``, or ``"auto"`` on a GPU; float32 otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def default_batch_size(device: torch.device | str) -> int:
    """Inference batch that keeps each device busy: large on a GPU; on a CPU a small batch keeps the
    activations in cache (measured on the tiny ViT, 2 threads: ~950 images/s at 32-96, ~560 at 256)."""
    return 512 if torch.device(device).type == "cuda" else 64


def normalize_images(x: torch.Tensor, model, size: int | None = None) -> torch.Tensor:
    """uint8 ``N x 3 x H x W`` on any device -> float model input: the workbench geometry (short side
    resized, centre crop; :mod:`workbench.data.geometry`), then the model's mean/std.

    Mirrors open_clip's eval transform on tensors, so a decoded uint8 cache feeds the model without PIL.
    """
    cfg = open_clip.get_model_preprocess_cfg(model)
    x = resize_crop_tensor(x.float().div_(255), size or image_size(model))
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int | None = None, normalize: bool = True,
                  progress: bool = False, precision: str = "auto") -> torch.Tensor:
    """Image embeddings (float32, on the CPU) of a uint8 ``N x 3 x H x W`` tensor.

    ``batch_size``: None picks :func:`default_batch_size` for the model's device; ``precision`` as in
    :func:`autocast`."""
    device = model_device(model)
    batch_size = batch_size or default_batch_size(device)
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encode images"):
        x = normalize_images(images[i : i + batch_size].to(device, non_blocking=True), model)
        with autocast(device, precision):
            f = model.encode_image(x)
        f = f.float()
        out.append(F.normalize(f, dim=-1) if normalize else f)  # stays on the device: no sync per batch
    if not out:
        return torch.empty(0, model.text_projection.shape[1] if hasattr(model, "text_projection") else 0)
    return torch.cat(out).cpu()


def encode_uint8(model, images: torch.Tensor, batch_size: int | None = None, normalize: bool = True,
                 progress: bool = False, chunk: int = 2048) -> torch.Tensor:
    """:func:`encode_images` over a large host uint8 cache, in chunks. On CUDA, each chunk is pinned in a
    background thread while the previous one encodes; chunks are small (2048 images, ~300 MB at 224 px)
    so the first, unhidden pin is short."""
    device = model_device(model)
    stage = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    n = len(images)
    out = []
    bar = tqdm(total=n, disable=not progress, desc="encode images", unit="img")
    with ThreadPoolExecutor(1) as ex:
        nxt = ex.submit(stage, images[0:chunk])
        for s in range(0, n, chunk):
            x = nxt.result()
            if s + chunk < n:
                nxt = ex.submit(stage, images[s + chunk : s + 2 * chunk])
            out.append(encode_images(model, x.to(device, non_blocking=True), batch_size, normalize))
            bar.update(len(x))
    bar.close()
    return torch.cat(out) if out else encode_images(model, images, batch_size, normalize)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 1024, normalize: bool = True,
                 progress: bool = False, precision: str = "auto") -> torch.Tensor:
    """Text embeddings (float32, on the CPU) for a list of strings; ``precision`` as in :func:`autocast`."""
    device = model_device(model)
    model.eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="encode texts"):
        tok = tokenizer(list(texts[i : i + batch_size])).to(device)
        with autocast(device, precision):
            f = model.encode_text(tok)
        f = f.float()
        out.append((F.normalize(f, dim=-1) if normalize else f).cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
