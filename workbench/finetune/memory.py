"""Where the uint8 image cache lives while a model trains: on the GPU when it fits next to everything
training will still allocate there, else in host memory (each batch is then indexed on the host and
copied over; pinning the cache would not help, since indexing a pinned tensor returns pageable memory).

The estimate errs high. Per transformer layer and token, training keeps for the backward pass the fp32
residual stream at both layer norms (8 bytes x width) and, in the compute dtype (2 bytes under bf16
autocast, 4 in fp32), the inputs of the qkv projection, q, k, v, the attention output twice (the kernel's
and the output projection's input), the second layer norm's output and both MLP activations: 7 x width +
2 x MLP width values. Fused attention keeps nothing that grows with tokens squared. Gradients, AdamW's
two moments and autocast's bf16 weight copies add 14 bytes per trainable parameter, and 25% on the
activations covers allocator fragmentation and backward temporaries. A cache left on the host costs one
pageable copy per batch (about 1% of a ViT-L step); one placed wrongly costs the run."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.images import WholeImages


@dataclass(frozen=True)
class Tower:
    """The shape of a transformer tower: sequence length, width, depth, MLP width."""

    tokens: int
    width: int
    layers: int
    mlp: int


def _tower(transformer, tokens: int) -> Tower:
    blocks = transformer.resblocks
    return Tower(tokens, transformer.width, len(blocks), blocks[0].mlp.c_fc.out_features)


def towers(clip) -> list[Tower] | None:
    """The vision and text towers of an open_clip ViT CLIP (text at its full context length, the most a
    batch can run); None for other architectures (their cache stays on the host)."""
    try:
        v = clip.visual
        vision = _tower(v.transformer, v.grid_size[0] * v.grid_size[1] + 1)
        text_root = clip if hasattr(clip, "transformer") else clip.text
        return [vision, _tower(text_root.transformer, text_root.context_length)]
    except AttributeError:
        return None


def activation_bytes(shapes: list[Tower], batch: int, elem_bytes: int, checkpointing: bool) -> int:
    """Activations kept for backward by ``batch`` samples (see the module docstring)."""
    total = 0
    for t in shapes:
        per_layer = t.tokens * (8 * t.width + elem_bytes * (7 * t.width + 2 * t.mlp))
        if checkpointing:  # each block keeps its fp32 input; one block's activations exist at a time
            total += t.layers * t.tokens * 4 * t.width + per_layer
        else:
            total += t.layers * per_layer
    return total * batch


def training_bytes(shapes: list[Tower], trainable: int, batch: int, elem_bytes: int, checkpointing: bool) -> int:
    """What training will still allocate on the device once the fp32 weights are there."""
    return int(1.25 * activation_bytes(shapes, batch, elem_bytes, checkpointing)) + 14 * trainable


def cache_fits(cache_bytes: int, free_bytes: int, need_bytes: int | None) -> bool:
    """Whether the image cache and training's own needs both fit in the free device memory."""
    return need_bytes is not None and cache_bytes + need_bytes <= free_bytes


def training_need(clip, batch: int, bf16: bool, checkpointing: bool, text_trains: bool) -> int | None:
    """:func:`training_bytes` for ``clip`` at this rank's ``batch``; None when its shape is not known.
    ``text_trains``: False when the text tower runs without gradients (frozen), keeping no activations."""
    shapes = towers(clip)
    if shapes is None:
        return None
    trainable = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    return training_bytes(shapes if text_trains else shapes[:1], trainable, batch, 2 if bf16 else 4, checkpointing)


def place_images(images, device: torch.device, need_bytes: int | None):
    """The uint8 cache (a tensor, or :class:`~workbench.data.images.WholeImages`: its canvas and sizes) on
    the GPU when it fits beside ``need_bytes`` (indexing there costs nothing), else as it is, in host memory."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if not cache_fits(cache_bytes(images), free, need_bytes):
        return images
    if isinstance(images, WholeImages):
        return WholeImages(images.images.to(device), images.sizes.to(device))
    return images.to(device)


def cache_bytes(images) -> int:
    """Device bytes the cache takes: a whole-image cache counts its whole canvas (up to 4/3 of the squares)."""
    return images.nbytes if isinstance(images, WholeImages) else images.numel() * images.element_size()
