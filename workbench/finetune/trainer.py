"""The one training loop: contrastive training of a CLIP model, shared by fine-tuning and by the
pretraining of the tiny synthetic CLIP.

:class:`TrainStep` is one optimization step: fp32 master weights with bf16 autocast on GPU, fused
AdamW with no decay on gains, biases and the logit scale, warm-up + cosine schedule, gradient
clipping, the logit scale clamped as CLIP trains, optional regional ``torch.compile`` and DDP.
:class:`Trainer` adds fine-tuning's data: (image, text) pairs drawn per step from the uint8 image
cache, augmented on the device. :func:`train_run` adds per-epoch validation that picks the
checkpoint, atomic checkpoints that resume exactly, and a stop on a non-finite loss.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch._dynamo as dynamo
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..clip import autocast, image_size, output_tokens, text_forward, token_mask, uses_bf16
from ..identity import differences, mismatch
from ..io import append_jsonl, iter_jsonl
from . import losses
from .attention import attention_context
from .augment import apply_crops, crop_params
from .checkpoint import gather_rng, load_state, restore_rng, resume_state, rewrite_log, save_state, save_weights, state_step
from .config import FinetuneConfig
from .memory import place_images, training_need

STATE_FILE = "resume.safetensors"  # next to best.safetensors in each run's checkpoint folder


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; the last good checkpoint on disk is kept."""


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


@torch.no_grad()
def _frozen_text_features(clip, ids, device, precision, batch=1024):
    out = []
    for i in range(0, len(ids), batch):
        with autocast(device, precision):
            f, _ = text_forward(clip, ids[i : i + batch].to(device))
        out.append(F.normalize(f.float(), dim=-1))
    return torch.cat(out)


class Trainer(TrainStep):
    """Fine-tuning on (image, text) pairs: pair i is image ``pair_rows[i]`` of the uint8 cache with
    ``texts[i]`` and class ``pair_labels[i]``. Batches are a pure function of (seed, step), so a
    resumed run needs no sampler state."""

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
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"image cache is {tuple(images.shape[-2:])}, the model takes {self.size} x {self.size}")
        super().__init__(clip, cfg, device, self.steps_per_epoch * cfg.epochs, tokens=cfg.loss == "filip")
        self.pair_rows, self.pair_labels = pair_rows.long(), pair_labels.long()
        self.ids = tokenizer(list(texts))
        self.eot = self.ids.argmax(-1)
        # FILIP under DDP gathers token tensors, which need equal shapes on every rank: no trimming
        self.trim = not (cfg.loss == "filip" and self.world > 1)
        self.text_feats = None
        if cfg.freeze_text and cfg.loss != "filip":
            self.text_feats = _frozen_text_features(clip, self.ids, self.device, cfg.precision)
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

    def batch(self, step: int) -> dict:
        """This rank's share of global batch ``step``: augmented images on the device, text ids, labels."""
        cfg, B, b, r = self.cfg, self.B, self.b, self.rank
        idx = self._pairs(step)
        # crop boxes are drawn for the global batch, so DDP ranks see what one process would
        g = torch.Generator().manual_seed(step_seed(cfg.seed, 1, step))
        boxes = crop_params(B, cfg.crop_scale, flip=cfg.flip, generator=g)
        idx, boxes = idx[r * b : (r + 1) * b], boxes[r * b : (r + 1) * b]
        rows = self.pair_rows[idx]
        src = self.images[rows.to(self.images.device, non_blocking=True)]
        x = apply_crops(src.to(self.device, non_blocking=True), boxes, self.size, self.mean, self.std)
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


class TrainRun:
    """One fine-tuning run around a :class:`Trainer`: resume, validate every epoch, keep the best
    weights, write the resume state, log losses (checked finite first) and summarise."""

    def __init__(self, tr: Trainer, validate, out_dir, log_path, run: str, meta: dict | None, progress: bool,
                 identity: dict | None = None):
        self.tr, self.cfg, self.run_name, self.identity = tr, tr.cfg, run, identity
        self.validate_fn = validate if tr.cfg.validate else None
        self.lead = tr.rank == 0
        out_dir = Path(out_dir) if out_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.state_path = out_dir / STATE_FILE if out_dir else None
        self.best_path = out_dir / "best.safetensors" if out_dir else None
        self.meta = dict(meta or {})
        self.progress = progress
        self.step0, self.history, self.best = 0, [], {"epoch": None, "val_top1": -1.0}
        self.pending: list = []  # (step, epoch, lr, loss, grad norm) not yet checked: flushed with one sync
        self.epoch_loss: dict[int, list[float]] = {}  # epoch -> [sum, count] of logged losses (collapse check)
        self.bar = None

    def restore(self, resume: bool) -> None:
        """Continue from the resume state when asked and present (it must be this run's), else start over."""
        tr = self.tr
        if resume and self.state_path is not None and self.state_path.exists():
            st = load_state(self.state_path)
            self.check_identity(st)
            if st["fingerprint"] != self.cfg.fingerprint() or st["pairs"] != tr.n:
                raise ValueError(
                    f"run {self.run_name}: {self.state_path} was written with other settings or data ({st['config']}, "
                    f"{st['pairs']} pairs); pass resume=False to start over, or use another run directory"
                )
            tr.clip.load_state_dict(st["model"])
            try:
                tr.opt.load_state_dict(st["optimizer"])
            except ValueError as e:  # e.g. written before the optimizer's groups were split by tower
                raise ValueError(f"run {self.run_name}: the optimizer state in {self.state_path} does not fit this "
                                 f"version's optimizer ({e}); pass resume=False to start the run over") from e
            self.step0, self.history, self.best = st["step"], json.loads(st["history"]), json.loads(st["best"])
            restore_rng(st["rng"], tr.rank, tr.device)
            if self.lead:
                rewrite_log(self.log_path, self.run_name, self.step0)
                self.count_losses(r for r in iter_jsonl(self.log_path) if r.get("run") == self.run_name and "loss" in r)
        elif self.lead:
            rewrite_log(self.log_path, self.run_name, -1)

    def check_identity(self, st: dict) -> None:
        """A resume state made under another identity (weights, data, draw, captions, settings) is never
        continued or reused: the error names each setting that differs, with both values."""
        if self.identity is None:
            return
        recorded = json.loads(st["identity"]) if isinstance(st.get("identity"), str) else st.get("identity")
        how = (f"Its checkpoints are kept. To train this run under the new settings, pass resume=False "
               f"(`--set finetune.resume=false`; it overwrites {self.state_path.parent}), or use another run name "
               "(--name).")
        if recorded is None:
            raise mismatch(f"run {self.run_name}: {self.state_path}", [("identity", None, "recorded")],
                           "It was written before run identities were recorded, so what it was trained on is "
                           "unknown. " + how)
        diffs = differences(recorded, self.identity)
        if diffs:
            raise mismatch(f"run {self.run_name}: {self.state_path}", diffs, how)

    def save_state(self, step: int) -> None:
        """Write the resume state (rank 0), with every rank's RNG (all ranks take part in gathering it)."""
        if self.state_path is None:
            return
        tr = self.tr
        rng = gather_rng(tr.device, tr.world)
        if self.lead:
            save_state(self.state_path, resume_state(tr.clip, tr.opt, self.cfg, step, tr.n, tr.total, self.history,
                                                     self.best, rng, self.identity))

    def validate(self, epoch: int, step: int) -> None:
        """Score the model (rank 0); a new best is written to ``best.safetensors`` at once."""
        if self.validate_fn is None:
            return
        if self.lead:
            r = self.validate_fn(self.tr.clip)
            self.tr.clip.train()
            row = {"run": self.run_name, "epoch": epoch, "step": step, **r}
            self.history.append(row)
            if self.log_path:
                append_jsonl(self.log_path, row)
            if r["val_top1"] > self.best["val_top1"]:
                self.best.update(epoch=epoch, step=step, **r)
                if self.best_path is not None:
                    save_weights(self.best_path, self.tr.clip,
                                 {**self.meta, "run": self.run_name, "epoch": epoch, "val_top1": r["val_top1"]})
        if self.tr.world > 1:
            dist.barrier()

    def flush(self) -> None:
        """Check the pending losses (one sync) and log them; a non-finite one stops the run."""
        if not self.pending:
            return
        vals = torch.stack([torch.stack([l.float(), g.float()]) for *_, l, g in self.pending]).tolist()
        rows = []
        for (s, e, lr, _, _), (loss, gnorm) in zip(self.pending, vals):
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                self.pending.clear()
                if self.lead and self.log_path and rows:
                    append_jsonl(self.log_path, rows)
                self._stop_nonfinite(s, e, loss, gnorm)
            rows.append({"run": self.run_name, "epoch": e, "step": s, "loss": loss, "lr": lr, "grad_norm": gnorm})
        self.pending.clear()
        self.count_losses(rows)
        if self.lead and self.log_path:
            append_jsonl(self.log_path, rows)
        self.bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")

    def count_losses(self, rows) -> None:
        for r in rows:
            acc = self.epoch_loss.setdefault(r["epoch"], [0.0, 0])
            acc[0] += r["loss"]
            acc[1] += 1

    def _stop_nonfinite(self, step: int, epoch: int, loss: float, gnorm: float):
        last = "none written yet"
        if self.state_path is not None and self.state_path.exists():
            last = f"{self.state_path} (step {state_step(self.state_path)})"
        what, v = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
        raise NonFiniteLossError(
            f"run {self.run_name}: the {what} became {v} at step {step} (epoch {epoch}); training stopped. "
            f"The last good checkpoint is kept: {last}. "
            "Lower the learning rate, keep gradient clipping on, or check the captions."
        )

    def loop(self) -> tuple[int, bool, float]:
        """Train from ``step0`` to the end (or ``max_steps``): ``(steps done, interrupted, training seconds)``;
        validation and checkpoint writes are not training time."""
        tr, cfg, spe = self.tr, self.cfg, self.tr.steps_per_epoch
        t_train, done, ckpt_now, stop = 0.0, self.step0, False, False
        t0 = time.perf_counter()
        for step in range(self.step0, tr.total):
            loss, gnorm = tr.train_step(step)
            done = step + 1
            self.pending.append((done, step // spe + 1, lr_at(step, tr.total, cfg.lr, cfg.warmup), loss, gnorm))
            self.bar.update(1)
            end_of_epoch = done % spe == 0
            ckpt_now = end_of_epoch or bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            stop = cfg.max_steps is not None and cfg.max_steps <= done < tr.total
            if ckpt_now or stop or done % cfg.log_every == 0:
                self.flush()  # syncs: losses so far are known finite before any checkpoint is written
            if ckpt_now or stop:
                t_train += time.perf_counter() - t0
                if end_of_epoch:
                    self.validate(done // spe, done)
                if ckpt_now:
                    self.save_state(done)
                t0 = time.perf_counter()
            if stop:
                return done, True, t_train
        self.flush()
        if done > self.step0 and not ckpt_now:
            t_train += time.perf_counter() - t0
        return done, False, t_train

    def run(self, resume: bool) -> dict:
        self.restore(resume)
        if self.step0 == 0:
            self.validate(0, 0)
        self.bar = tqdm(total=self.tr.total, initial=self.step0, disable=not (self.progress and self.lead),
                        desc=self.run_name, leave=False)
        done, interrupted, t_train = self.loop()
        self.bar.close()
        return self.summary(done, interrupted, t_train)

    def summary(self, done: int, interrupted: bool, t_train: float) -> dict:
        tr, best = self.tr, self.best
        losses = [s / n for _, (s, n) in sorted(self.epoch_loss.items()) if n]
        if best["epoch"] is None:  # no validation: the last weights are the result
            best.update(epoch=done // tr.steps_per_epoch, step=done, val_top1=None)
            if self.lead and self.best_path is not None and not interrupted:
                save_weights(self.best_path, tr.clip, {**self.meta, "run": self.run_name, "epoch": best["epoch"]})
        return {
            "run": self.run_name,
            "status": "interrupted" if interrupted else "done",
            "steps": done,
            "total_steps": tr.total,
            "pairs": tr.n,
            "batch_size": tr.B,
            "best_epoch": best["epoch"],
            "val_top1": best.get("val_top1"),
            "val_zeroshot_top1": best.get("val_zeroshot_top1"),
            "history": self.history,
            # mean loss of the first and the last epoch trained, and of uniform scores (ln batch): a
            # last epoch still at chance is a collapsed run (workbench.finetune.health)
            "loss_first_epoch": losses[0] if losses else None,
            "loss_last_epoch": losses[-1] if losses else None,
            "loss_chance": math.log(tr.B),
            "train_s": t_train,
            "pairs_per_s": (done - self.step0) * tr.B / t_train if t_train > 0 else None,
            "path": str(self.best_path) if self.best_path else None,
            "attention": tr.attention,  # the GPU attention kernel ("auto" resolved), "default" on CPU
        }


def train_run(clip, tokenizer, cfg: FinetuneConfig, images: torch.Tensor, pair_rows: torch.Tensor, texts: list[str],
              pair_labels: torch.Tensor, validate: Callable[[nn.Module], dict] | None = None,
              out_dir: str | Path | None = None, log_path: str | Path | None = None, run: str = "run",
              device: str | torch.device = "cpu", resume: bool = True, progress: bool = False,
              meta: dict | None = None, identity: dict | None = None) -> dict:
    """Fine-tune ``clip`` on (image, text) pairs; returns the run's summary.

    ``images``: uint8 cache (N x 3 x S x S, S = the model's input size); pair i is image
    ``pair_rows[i]`` with ``texts[i]`` and class ``pair_labels[i]``. ``validate(clip)`` returns a dict
    with ``val_top1`` (and more), called before training and after every epoch; the best epoch's
    weights go to ``out_dir/best.safetensors`` (the starting weights compete too).
    ``out_dir/resume.safetensors`` holds the resume state (model, optimizer, schedule, each rank's RNG,
    step, history), written atomically at every epoch end and every ``cfg.checkpoint_every`` steps, only
    after the losses up to it were checked finite. ``identity`` (``workbench.identity``): what the run
    trains on, recorded in the resume state; a state recorded under another identity is refused.
    """
    tr = Trainer(clip, tokenizer, cfg, images, pair_rows, texts, pair_labels, device)
    return TrainRun(tr, validate, out_dir, log_path, run, meta, progress, identity).run(resume)
