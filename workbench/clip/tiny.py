"""The workbench's own tiny architecture, ``wb-tiny``: open_clip's ViT CLIP (``model_configs/wb-tiny.json``:
64 px, 8-px patches, 4 layers) with a convolutional stem in place of the patchify convolution.

A patchify ViT must learn each small-shape detector once per sub-patch offset, so at 64 px the shapes
that tell species apart (beak, tail, breast streaks a pixel wide) were learnt very slowly, while a small
CNN learns them in a few hundred steps. A stem of stride-2 3x3 convolutions (Xiao et al. 2021, "Early
convolutions help transformers see better") shares its weights across offsets; it outputs the same
8 x 8 grid of patch embeddings, so everything downstream (tokens, attention maps, the pointing game)
is unchanged.
"""
from __future__ import annotations

import math

import torch.nn as nn


class ConvStem(nn.Sequential):
    """3x3 convolutions of stride 2 (GELU between) down to the patch grid, then a 1x1 to the width."""

    def __init__(self, width: int, patch: int, channels=(32, 64, 128)):
        if patch & (patch - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch}")
        layers, cin = [], 3
        for cout in list(channels)[: int(math.log2(patch))]:
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.GELU()]
            cin = cout
        layers.append(nn.Conv2d(cin, width, 1))
        super().__init__(*layers)

    @property
    def weight(self):  # code that reads visual.conv1.weight for the input's device and dtype
        return self[-1].weight


def _conv_stem(model) -> None:
    v = model.visual
    patch = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else v.patch_size
    like = v.conv1.weight  # the stem lives where the patchify conv lived, in its precision
    v.conv1 = ConvStem(v.conv1.out_channels, patch).to(like.device, like.dtype)


# architecture -> what the workbench changes in open_clip's model, before any weights are loaded
ADAPT = {"wb-tiny": _conv_stem}


def adapt(arch: str, model) -> None:
    """Give an open_clip model of a workbench architecture its workbench parts (no-op for the others)."""
    if arch in ADAPT:
        ADAPT[arch](model)
