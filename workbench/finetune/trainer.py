"""The one training loop: contrastive training of a CLIP model, shared by fine-tuning and by the
pretraining of the tiny synthetic CLIP.

:class:`TrainStep` is one optimization step: fp32 master weights with bf16 autocast on GPU, fused
AdamW with no decay on gains, biases and the logit scale, warm-up + cosine schedule, gradient
clipping, the logit scale clamped as CLIP trains, optional regional ``torch.compile`` and DDP (its
parts: ``step.py``). :class:`Trainer` adds fine-tuning's data: (image, text) pairs drawn per step from
the uint8 image cache (whole images: crops sample all of each), augmented on the device.
:func:`train_run` adds, through :class:`~workbench.finetune.run.TrainRun`, per-epoch validation that
picks the checkpoint, atomic checkpoints that resume exactly (``runstate.py``), and a stop on a
non-finite loss (``steplog.py``). Every name of those modules a caller used is importable from here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn as nn

from ..clip import autocast, image_size, uses_bf16
from ..data.images import WholeImages
from .attention import attention_context
from .augment import apply_crops, crop_params
from .config import FinetuneConfig
from .memory import place_images, training_need
from .run import TrainRun
from .runstate import STATE_FILE
from .step import (
    Towers,
    _decays,
    compute_loss,
    frozen_text_features,
    lr_at,
    make_optimizer,
    param_groups,
    prepare_model,
    rank_world,
    step_seed,
)
from .steplog import NonFiniteLossError

__all__ = ["STATE_FILE", "FinetuneConfig", "NonFiniteLossError", "TrainRun", "TrainStep", "Towers", "Trainer",
           "compute_loss", "lr_at", "make_optimizer", "param_groups", "prepare_model", "rank_world", "step_seed",
           "train_run"]


class TrainStep:
    """One optimization step of a CLIP model, whatever feeds it: the model on its device (compiled,
    wrapped in DDP when distributed), the optimizer, the schedule. :meth:`step` does no host-device
    sync, so consecutive steps queue up on the GPU."""

    def __init__(self, clip, cfg: FinetuneConfig, device, total_steps: int, tokens: bool = False,
                 distributed: bool = True, lr_scale: Callable[[int, str], float] | None = None):
        self.clip, self.cfg, self.device, self.total = clip, cfg, torch.device(device), total_steps
        self.rank, self.world = rank_world() if distributed else (0, 1)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        prepare_model(clip, cfg, self.device)
        self.towers = Towers(clip, tokens=tokens)
        self.net = self.towers
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.towers, device_ids=ids)
        self.opt = make_optimizer(clip, cfg, self.device)
        # the gradient norm over decayed parameters first, then the others (the order it was summed in before
        # the groups were split by tower: same order, same rounding)
        named = [(n, p) for n, p in clip.named_parameters() if p.requires_grad]
        self.params = [p for n, p in named if _decays(n, p)] + [p for n, p in named if not _decays(n, p)]
        self.lr_scale = lr_scale  # (step, tower) -> multiplier of the scheduled learning rate
        self.attention_ctx, self.attention = attention_context(clip, cfg, self.device)

    def step(self, step: int, images: torch.Tensor, text: torch.Tensor | None, loss_fn: Callable) -> tuple:
        """One step on a batch; ``loss_fn(towers_output)`` gives the loss. Returns (loss, grad norm) as
        device tensors (no sync)."""
        cfg = self.cfg
        lr = lr_at(step, self.total, cfg.lr, cfg.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr * (self.lr_scale(step, g["tower"]) if self.lr_scale is not None else 1.0)
        with self.attention_ctx():
            with autocast(self.device, cfg.precision):
                out = self.net(images, text)
            loss = loss_fn(out)  # in float32, outside autocast (bf16 logits lose the ranking)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))  # as CLIP training does
        return loss.detach(), gnorm.detach()


class Trainer(TrainStep):
    """Fine-tuning on (image, text) pairs: pair i is image ``pair_rows[i]`` of the uint8 cache with
    ``texts[i]`` and class ``pair_labels[i]``. The cache: whole images (:class:`WholeImages`, what the
    stage trains on: crops sample all of each image) or ``N x 3 x S x S`` squares. Batches are a pure
    function of (seed, step), so a resumed run needs no sampler state."""

    def __init__(self, clip, tokenizer, cfg: FinetuneConfig, images, pair_rows, texts, pair_labels, device="cpu"):
        self.n = n = len(pair_rows)
        world = rank_world()[1]
        if n < 2:
            raise ValueError(f"{n} training pair(s); a contrastive loss needs at least 2")
        if not (len(texts) == len(pair_labels) == n):
            raise ValueError(f"pairs disagree: {n} image rows, {len(texts)} texts, {len(pair_labels)} labels")
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
        if n < world * 2:
            raise ValueError(f"{n} training pairs cannot be split over {world} processes")
        # Equal batches (one shape for compile and DDP) of at most batch_size that cover the epoch:
        # 240 pairs at batch_size 128 -> 2 steps of 120, not 1 step that drops 112 pairs.
        self.steps_per_epoch = math.ceil(n / min(cfg.batch_size, n))
        self.B = (n // self.steps_per_epoch) // world * world
        self.b = self.B // world
        self.size = image_size(clip)
        self.sizes = images.sizes if isinstance(images, WholeImages) else None  # (h, w) per image, on the host
        canvas = images.images if self.sizes is not None else images
        h, w = canvas.shape[-2:]
        if h != self.size or w < self.size or (self.sizes is None and w != self.size):  # a canvas may be wider
            raise ValueError(f"image cache is {tuple(canvas.shape[-2:])}, the model takes {self.size} x {self.size}")
        self.epochs = cfg.epochs_for(self.steps_per_epoch)  # cfg.epochs, raised to cover cfg.steps
        super().__init__(clip, cfg, device, self.steps_per_epoch * self.epochs, tokens=cfg.loss == "filip")
        self.pair_rows, self.pair_labels = pair_rows.long(), pair_labels.long()
        self.ids = tokenizer(list(texts))
        self.eot = self.ids.argmax(-1)
        # FILIP under DDP gathers token tensors, which need equal shapes on every rank: no trimming
        self.trim = not (cfg.loss == "filip" and self.world > 1)
        self.text_feats = None
        if cfg.freeze_text and cfg.loss != "filip":
            self.text_feats = frozen_text_features(clip, self.ids, self.device, cfg.precision)
        # weights are on the device; activations and optimizer state at this batch must fit beside the cache
        need = training_need(clip, self.b, uses_bf16(self.device, cfg.precision), cfg.grad_checkpointing,
                             text_trains=not cfg.freeze_text)
        self.images = place_images(images, self.device, need)
        pp = open_clip.get_model_preprocess_cfg(clip)
        self.mean, self.std = pp.get("mean"), pp.get("std")
        self._perm, self._perm_epoch = None, -1

    def _text_length(self, idx: torch.Tensor) -> int:
        L = self.ids.shape[1]
        if self.trim:
            L = int(self.eot[idx].max()) + 1  # CPU tensor: no device sync
            if self.cfg.compile:  # few distinct lengths -> few recompiles
                L = min(self.ids.shape[1], -(-L // 8) * 8)
        return L

    def _text(self, idx: torch.Tensor) -> tuple:
        if self.text_feats is not None:
            return None, self.text_feats[idx.to(self.text_feats.device)]
        return self.ids[idx, : self._text_length(idx)].to(self.device, non_blocking=True), None

    def _pairs(self, step: int) -> torch.Tensor:
        """The pairs of global batch ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:  # a pure function of (seed, epoch): resume needs no sampler state
            g = torch.Generator().manual_seed(step_seed(self.cfg.seed, 0, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[i * self.B : (i + 1) * self.B]

    def text_length(self, step: int) -> int | None:
        """Length of the text ids batch ``step`` runs on this rank (trimmed; bucketed under compile), or None
        when text features are precomputed. Host-side only, so a benchmark can compile every length a run
        will meet before it starts timing."""
        if self.text_feats is not None:
            return None
        return self._text_length(self._pairs(step)[self.rank * self.b : (self.rank + 1) * self.b])

    def _aspect(self, rows: torch.Tensor):
        """Width / height of each image as shown (crop boxes keep their own aspect in it)."""
        if self.sizes is None:
            return 1.0
        hw = self.sizes[rows].float()
        return hw[:, 1] / hw[:, 0]

    def _crops(self, rows: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The augmented images of cache ``rows`` (boxes from :func:`crop_params`), on the device."""
        cache = self.images
        if self.sizes is None:
            src, sizes = cache[rows.to(cache.device, non_blocking=True)], None
        else:
            on = rows.to(cache.images.device, non_blocking=True)
            src, sizes = cache.images[on], cache.sizes[on].to(self.device, non_blocking=True)
        return apply_crops(src.to(self.device, non_blocking=True), boxes, self.size, self.mean, self.std, sizes=sizes)

    def batch(self, step: int) -> dict:
        """This rank's share of global batch ``step``: augmented images on the device, text ids, labels."""
        cfg, B, b, r = self.cfg, self.B, self.b, self.rank
        idx = self._pairs(step)
        # crop boxes are drawn for the global batch, so DDP ranks see what one process would; each box keeps
        # its own image's aspect
        g = torch.Generator().manual_seed(step_seed(cfg.seed, 1, step))
        boxes = crop_params(B, cfg.crop_scale, flip=cfg.flip, generator=g, aspect=self._aspect(self.pair_rows[idx]))
        idx, boxes = idx[r * b : (r + 1) * b], boxes[r * b : (r + 1) * b]
        rows = self.pair_rows[idx]
        x = self._crops(rows, boxes)
        text, tf = self._text(idx)
        return {
            "images": x,
            "text": text,
            "text_features": tf,
            "labels": self.pair_labels[idx].to(self.device, non_blocking=True),
            "image_ids": rows.to(self.device, non_blocking=True),
        }

    def train_step(self, step: int):
        """One optimizer step on batch ``step``; returns (loss, grad norm) as device tensors (no sync)."""
        d = self.batch(step)

        def loss_fn(out):
            return compute_loss(self.cfg, out, d["labels"], d["image_ids"], d["text"], d["text_features"])

        return self.step(step, d["images"], d["text"], loss_fn)


def train_run(clip, tokenizer, cfg: FinetuneConfig, images: WholeImages | torch.Tensor, pair_rows: torch.Tensor, texts: list[str],
              pair_labels: torch.Tensor, validate: Callable[[nn.Module], dict] | None = None,
              out_dir: str | Path | None = None, log_path: str | Path | None = None, run: str = "run",
              device: str | torch.device = "cpu", resume: bool = True, progress: bool = False,
              meta: dict | None = None, identity: dict | None = None) -> dict:
    """Fine-tune ``clip`` on (image, text) pairs; returns the run's summary.

    ``images``: uint8 cache, S = the model's input size: whole images (:class:`WholeImages`, canvas
    ``N x 3 x S x W``; what the stage trains on) or ``N x 3 x S x S`` squares; pair i is image
    ``pair_rows[i]`` with ``texts[i]`` and class ``pair_labels[i]``. ``validate(clip)`` returns a dict
    with ``val_top1`` (and more), called before training and after every epoch (or, with
    ``cfg.validate_every``, every that many steps and after the last); the best validation's weights go to
    ``out_dir/best.safetensors`` (the starting weights compete too). The run trains
    ``cfg.epochs_for(steps_per_epoch)`` whole epochs: ``cfg.epochs``, more when ``cfg.steps`` asks for more steps.
    ``out_dir/resume.safetensors`` holds the resume state (model, optimizer, schedule, each rank's RNG,
    step, history), written atomically at every epoch end, every validation and every ``cfg.checkpoint_every`` steps, only
    after the losses up to it were checked finite. ``identity`` (``workbench.identity``): what the run
    trains on, recorded in the resume state; a state recorded under another identity is refused.
    """
    tr = Trainer(clip, tokenizer, cfg, images, pair_rows, texts, pair_labels, device)
    return TrainRun(tr, validate, out_dir, log_path, run, meta, progress, identity).run(resume)
