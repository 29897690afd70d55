"""Device choice, one way for every stage: ``"auto"`` is the GPU when there is one (under torchrun, this
process's own GPU, ``LOCAL_RANK``), else the CPU; anything else is passed to ``torch.device``."""
from __future__ import annotations

import os

import torch


def auto_device(device: str | torch.device | None = "auto", distributed: bool = False) -> torch.device:
    """The device ``device`` names; ``"auto"`` (or None) picks CUDA when available. ``distributed``: on a GPU,
    the one of this rank (``LOCAL_RANK``), as torchrun assigns them."""
    if device not in (None, "auto"):
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if distributed else torch.device("cuda")


def cuda_wanted(device: str | torch.device | None) -> bool:
    """Would :func:`auto_device` give a GPU for ``device``?"""
    return auto_device(device).type == "cuda"
