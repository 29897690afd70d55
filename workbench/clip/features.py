"""The one feature cache: image and text embeddings on disk, keyed by everything they depend on.

Image features are stored raw (unnormalised, float32) and keyed by the model name and tag, a digest
of the weights themselves (random-init models share a name but not their weights), the device type
(GPU encoding runs under bf16 autocast), the input geometry, preprocessing and image decoding, and
the files' identity. Matching reads them L2-normalised, the linear probes raw: one entry serves both.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F

from ..cache import cached_tensors, file_fingerprint
from ..data.images import DECODE_VERSION, image_cache
from ..io import hash_key
from .encode import encode_texts, encode_uint8, model_device
from .load import image_size

GEOMETRY = "short-side-bicubic-center-crop"  # workbench.data.geometry


def weights_digest(model, per_tensor: int = 65536) -> str:
    """Cheap fingerprint of the weights: random-init models share a ``model_id`` but not their weights,
    and features must never be reused across them. It hashes the exact bytes of an evenly strided sample
    of each tensor (at most ``per_tensor`` values), so it is the same on every machine and thread count
    (a float sum is not: its rounding follows the threads' split of the reduction)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // per_tensor)].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_key(bundle) -> list:
    return [bundle.model_id, weights_digest(bundle.model), model_device(bundle.model).type]


def image_features(bundle, paths: Sequence, batch_size: int | None = None, normalize: bool = False,
                   progress: bool = False, use_cache: bool = True) -> torch.Tensor:
    """Embeddings (float32, CPU) of image files, one row per path, via the uint8 image cache; raw
    unless ``normalize``. Cached on disk (see the module docstring)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no images to encode")
    model = bundle.model
    size = image_size(model)
    pre = {k: v for k, v in open_clip.get_model_preprocess_cfg(model).items() if k != "size"}
    key = hash_key("image-features-v2", *_model_key(bundle), size, pre, GEOMETRY, DECODE_VERSION, file_fingerprint(paths))

    def compute():
        images = image_cache(paths, size, progress=progress)
        return {"features": encode_uint8(model, images, batch_size=batch_size, normalize=False, progress=progress)}

    f = (cached_tensors("features", key, compute) if use_cache else compute())["features"].float()
    return F.normalize(f, dim=-1) if normalize else f


def text_features(bundle, texts: Sequence[str], batch_size: int = 1024, progress: bool = False,
                  use_cache: bool = True) -> torch.Tensor:
    """L2-normalised text embeddings (float32, CPU), cached on disk keyed by the model and the texts."""
    texts = list(texts)
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:24]
    key = hash_key("text-features-v2", *_model_key(bundle), digest, len(texts))

    def compute():
        return {"features": encode_texts(bundle.model, bundle.tokenizer, texts, batch_size=batch_size, progress=progress)}

    return (cached_tensors("features", key, compute) if use_cache else compute())["features"]
