"""The parts of one optimization step: the model on its device in fp32 (master weights; frozen, checkpointed
or compiled as configured), AdamW's parameter groups (no decay on gains, biases and the logit scale; one
group per tower, so their learning rates can be scaled apart), the warm-up + cosine schedule, both
towers in one forward (:class:`Towers`, what DDP wraps) and the configured loss. :class:`TrainStep`
(``trainer.py``) puts them together."""
from __future__ import annotations

import hashlib
import math

import torch
import torch._dynamo as dynamo
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..clip import autocast, output_tokens, text_forward, token_mask
from . import losses
from .config import FinetuneConfig


def lr_at(step: int, total: int, base_lr: float, warmup: float) -> float:
    """Linear warm-up to ``base_lr`` then cosine decay to 0, as a pure function of the step."""
    w = int(round(warmup * total)) if warmup < 1 else int(warmup)
    if step < w:
        return base_lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_seed(seed: int, *keys: int) -> int:
    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _text_params(clip):
    return [p for n, p in clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]


def _decays(name: str, p) -> bool:
    """No weight decay on gains, biases, 1-d params and the logit scale (as open_clip trains)."""
    return not (p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name)


def _tower(name: str) -> str:
    return "image" if name.startswith("visual.") else "shared" if name == "logit_scale" else "text"


def param_groups(clip, weight_decay: float):
    """One optimizer group per (tower, decay): the towers' learning rates can be scaled apart
    (:class:`TrainStep`'s ``lr_scale``); decay as :func:`_decays` says."""
    groups: dict[tuple, list] = {}
    for n, p in clip.named_parameters():
        if p.requires_grad:
            groups.setdefault((_tower(n), _decays(n, p)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "tower": tower}
            for (tower, decay), ps in groups.items()]


def prepare_model(clip, cfg: FinetuneConfig, device: torch.device):
    """Move to device in fp32 (master weights), freeze / checkpoint / compile as configured."""
    clip.to(device=device, dtype=torch.float32).train()
    if cfg.freeze_text:
        for p in _text_params(clip):
            p.requires_grad_(False)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    if cfg.compile:
        # Regional compilation: every block of a tower has the same code, so one compile serves
        # all of them (seconds, not the minutes a whole ViT-L graph takes). One static graph per
        # (tower, batch, text-length bucket): allow more than the default 8, or few-shot runs with
        # their smaller batches would fall back to eager.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(64, getattr(dynamo.config, knob)))
        blocks = list(clip.visual.transformer.resblocks)
        if hasattr(clip, "transformer") and not cfg.freeze_text:
            blocks += list(clip.transformer.resblocks)
        for blk in blocks:
            # static shapes: vision and text blocks share one forward() but differ in sequence length
            # (and width); dynamic=False keeps a specialised graph for each. Text lengths are bucketed
            # (multiples of 8) by the Trainer.
            blk.compile(dynamic=False)
    return clip


def make_optimizer(clip, cfg: FinetuneConfig, device: torch.device):
    return torch.optim.AdamW(param_groups(clip, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=device.type == "cuda")


class Towers(nn.Module):
    """Both encoders in one forward, so DDP sees every parameter use (and the logit scale). With
    ``tokens`` (FILIP) it also returns projected patch and word tokens; the vision tower returns its
    tokens only inside this forward, so validation and every other caller see the plain model."""

    def __init__(self, clip, tokens: bool = False):
        super().__init__()
        self.clip = clip
        self.tokens = tokens

    def forward(self, images, text):
        v = self.clip.visual
        out = {"logit_scale": self.clip.logit_scale.exp()}
        if self.tokens:
            with output_tokens(v):
                pooled, tok = v(images)  # tokens after ln_post, before the projection
            out["image_tokens"] = tok @ v.proj if v.proj is not None else tok
        else:
            pooled = v(images)
        out["image"] = pooled
        if text is not None:  # ids come cut to the length the caller chose (bucketed under compile)
            out["text"], out["text_tokens"] = text_forward(self.clip, text, self.tokens, trim_eot=False)
        return out


def compute_loss(cfg: FinetuneConfig, out: dict, labels, image_ids, text_ids=None, text_features=None):
    """The configured loss on the global batch (features gathered across ranks with gradients)."""
    scale = out["logit_scale"]
    img = F.normalize(out["image"].float(), dim=-1)
    txt = text_features if text_features is not None else F.normalize(out["text"].float(), dim=-1)
    if cfg.loss == "clip":
        img, txt = losses.gather_features(img, txt)
        return losses.clip_loss(img, txt, scale)
    if cfg.loss == "class-aware":
        img, txt = losses.gather_features(img, txt)
        labels, image_ids = losses.gather_labels(labels), losses.gather_labels(image_ids)
        return losses.class_aware_loss(img, txt, scale, labels, image_ids, cfg.class_weight)
    xt = F.normalize(out["image_tokens"].float(), dim=-1)
    yt = F.normalize(out["text_tokens"].float(), dim=-1)
    mask = token_mask(text_ids)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # text ids are not trimmed under DDP + FILIP, so token tensors have equal shapes on every rank
        xt, yt, mask = *losses.gather_features(xt, yt), losses.gather_labels(mask)
    return losses.filip_loss(xt, yt, mask, scale, block_size=cfg.filip_block)


@torch.no_grad()
def frozen_text_features(clip, ids, device, precision, batch=1024):
    out = []
    for i in range(0, len(ids), batch):
        with autocast(device, precision):
            f, _ = text_forward(clip, ids[i : i + batch].to(device))
        out.append(F.normalize(f.float(), dim=-1))
    return torch.cat(out)
