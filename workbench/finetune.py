"""Contrastive fine-tuning of CLIP on matched captions (GIST) or class names (FLYP-style baseline).

One run = (method, shots, seed). :func:`train_run` is the loop: fp32 master weights, bf16 autocast
on GPU, fused AdamW, warm-up + cosine, gradient clipping, on-device augmentation from the uint8
image cache, per-epoch validation that picks the checkpoint (never the test split), atomic
checkpoints that resume exactly, and a stop on a non-finite loss. :func:`finetune_all` trains every
run of a stage and writes ``checkpoints/index.json``, ``train_log.jsonl`` and ``metrics.json``.
Under ``torchrun`` the same loop runs DDP with features gathered across ranks (:func:`main`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .augment import apply_crops, crop_params
from .io import append_jsonl, atomic_write_bytes, read_json, read_jsonl, update_metrics, write_json, write_jsonl

METHODS = ("gist", "finetune-classname")
CLASSNAME_TEMPLATE = "a photo of a {}."
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "{}.")


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; the last good checkpoint on disk is kept."""


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (defaults: the CPU demo with the tiny model)."""

    method: str = "gist"  # "gist" (matched captions) or "finetune-classname" ("a photo of a <class>.")
    loss: str = "clip"  # "clip", "class-aware" or "filip"
    captions_per_image: int = 4  # GIST trains on 4 of the top-5 captions, each its own pair
    epochs: int = 3
    batch_size: int = 128  # global batch (split across ranks under DDP)
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.1  # warm-up steps; < 1 means a fraction of all steps
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    compile: bool = False  # torch.compile each transformer block (fast to compile, same kernels)
    grad_checkpointing: bool = False
    freeze_text: bool = False
    class_weight: float = 1.0  # class-aware loss: target weight of same-class (other image) pairs
    filip_block: int = 64  # FILIP: block size of the token-similarity computation
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area range
    flip: bool = True
    seed: int = 0
    validate: bool = True  # zero-shot + probe on val after every epoch; picks the checkpoint
    checkpoint_every: int = 0  # also write the resume state every N steps (0: at epoch ends only)
    log_every: int = 10  # steps between loss flushes (one device sync each)
    max_steps: int | None = None  # stop early (as if interrupted) after this many steps in total

    def __post_init__(self):
        self.betas, self.crop_scale = tuple(self.betas), tuple(self.crop_scale)
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.loss in losses.LOSSES, f"loss must be one of {losses.LOSSES}, got {self.loss!r}"),
            (self.captions_per_image >= 1, "captions_per_image must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (a contrastive loss needs negatives)"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0"),
            (self.precision in ("auto", "bf16", "fp32"), f"precision must be auto/bf16/fp32, got {self.precision!r}"),
            (self.warmup >= 0 and self.grad_clip >= 0, "warmup and grad_clip must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def fingerprint(self) -> str:
        """What must match for a checkpoint to resume this run exactly."""
        skip = {"validate", "checkpoint_every", "log_every", "max_steps"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name(method: str, shots, seed: int) -> str:
    return f"{method}-{shots}-s{seed}"


# ----------------------------------------------------------------------------- model forward
def _plain_causal_text(clip) -> bool:
    return (
        hasattr(clip, "token_embedding")
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", "argmax") == "argmax"
    )


def encode_text(clip, ids: torch.Tensor, tokens: bool = False):
    """Text features (and projected per-token features) for ids trimmed to any length >= the EOT.

    CLIP's text tower is causal and pools at the EOT (argmax id), so positions after the longest
    caption's EOT never influence the result: trimming them saves up to ~3x text compute.
    """
    if not _plain_causal_text(clip):
        if tokens:
            raise ValueError("FILIP loss needs a plain open_clip CLIP text tower (token features)")
        return clip.encode_text(ids), None
    n, L = ids.shape
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(ids).to(cast) + clip.positional_embedding[:L].to(cast)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:L, :L])
    x = clip.ln_final(x)
    proj = clip.text_projection
    project = (lambda t: proj(t)) if isinstance(proj, nn.Linear) else (lambda t: t @ proj)
    pooled = project(x[torch.arange(n, device=x.device), ids.argmax(-1)])
    return pooled, (project(x) if tokens else None)


class Towers(nn.Module):
    """Both encoders in one forward, so DDP sees every parameter use (and the logit scale)."""

    def __init__(self, clip, tokens: bool = False):
        super().__init__()
        self.clip = clip
        self.tokens = tokens
        if tokens:
            clip.visual.output_tokens = True  # visual(x) -> (pooled, tokens after ln_post)

    def forward(self, images, text):
        v = self.clip.visual
        out = {"logit_scale": self.clip.logit_scale.exp()}
        if self.tokens:
            pooled, tok = v(images)
            out["image_tokens"] = tok @ v.proj if v.proj is not None else tok
        else:
            pooled = v(images)
        out["image"] = pooled
        if text is not None:
            out["text"], out["text_tokens"] = encode_text(self.clip, text, self.tokens)
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
    xt = F.normalize(out["image_tokens"], dim=-1)
    yt = F.normalize(out["text_tokens"], dim=-1)
    mask = losses.text_token_mask(text_ids)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # text ids are not trimmed under DDP + FILIP, so token tensors have equal shapes on every rank
        xt, yt, mask = *losses.gather_features(xt, yt), losses.gather_labels(mask)
    return losses.filip_loss(xt, yt, mask, scale, block_size=cfg.filip_block)


# ----------------------------------------------------------------------------- data
def build_pairs(train, method: str, captions_per_image: int, matches: list[dict] | None = None):
    """(image row, text, label) pairs for the training split ``train`` (a Dataset, maybe few-shot).

    GIST: the first ``captions_per_image`` captions of each image's match record, each its own pair.
    Class-name baseline: one "a photo of a <class>." pair per image.
    """
    files = train.table["filename"].tolist()
    labels = train.labels
    rows, texts, ys = [], [], []
    if method == "finetune-classname":
        for i, y in enumerate(labels):
            rows.append(i), texts.append(CLASSNAME_TEMPLATE.format(train.classnames[y])), ys.append(int(y))
        return torch.tensor(rows), texts, torch.tensor(ys)
    if matches is None:
        raise ValueError("method 'gist' needs matches.jsonl (run the 02_match stage first)")
    by_file = {m["image"]: m for m in matches}
    missing = [f for f in files if f not in by_file or not by_file[f].get("captions")]
    if missing:
        raise ValueError(
            f"{len(missing)} training image(s) have no matched captions in matches.jsonl, e.g. {missing[:5]}; "
            "re-run the match stage for this dataset"
        )
    for i, (f, y) in enumerate(zip(files, labels)):
        m = by_file[f]
        if m.get("class") is not None and m["class"] != train.classnames[y]:
            raise ValueError(f"matches.jsonl gives class {m['class']!r} for {f}, the dataset says {train.classnames[y]!r}")
        for c in m["captions"][:captions_per_image]:
            rows.append(i), texts.append(c), ys.append(int(y))
    return torch.tensor(rows), texts, torch.tensor(ys)


# ----------------------------------------------------------------------------- validation
def _ridge_probe_top1(xtr, ytr, xva, yva, lams=(1e-3, 1e-2, 1e-1, 1.0)) -> float:
    """Quick closed-form probe for checkpoint selection: ridge regression onto one-hot labels,
    best ridge on val. (The full L-BFGS probe with proper sweeps is the evaluate stage's job.)"""
    xtr, xva = xtr.double(), xva.double()
    mu = xtr.mean(0)
    xtr, xva = xtr - mu, xva - mu
    k = int(max(ytr.max(), yva.max())) + 1
    y = F.one_hot(ytr, k).double()
    gram, xty = xtr.T @ xtr, xtr.T @ y
    scale = gram.diagonal().mean()
    best = 0.0
    for lam in lams:
        w = torch.linalg.solve(gram + lam * scale * torch.eye(len(gram), dtype=gram.dtype), xty)
        best = max(best, float(((xva @ w).argmax(1) == yva).double().mean()))
    return best


@torch.no_grad()
def validate(clip, tokenizer, classnames, train_images, train_labels, val_images, val_labels, batch_size=256) -> dict:
    """Zero-shot (class-name prompts) and quick-probe top-1 on the validation split."""
    from .models import encode_images, encode_texts

    was_training = clip.training
    fva = encode_images(clip, val_images, batch_size)
    prompts = [t.format(c) for c in classnames for t in ZEROSHOT_TEMPLATES]
    ft = encode_texts(clip, tokenizer, prompts, batch_size).view(len(classnames), len(ZEROSHOT_TEMPLATES), -1)
    cls = F.normalize(ft.mean(1), dim=-1)
    zs = float(((fva @ cls.T).argmax(1) == val_labels).float().mean())
    ftr = encode_images(clip, train_images, batch_size)
    probe = _ridge_probe_top1(ftr, train_labels, fva, val_labels)
    clip.train(was_training)
    return {"val_top1": probe, "val_probe_top1": probe, "val_zeroshot_top1": zs}


# ----------------------------------------------------------------------------- checkpoints
def _save_state(path: Path, state: dict) -> None:
    """torch.save to a temp file, fsync, rename: readers see the old or the new file, never half."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _save_weights(path: Path, clip, metadata: dict) -> None:
    from safetensors.torch import save

    sd = {k: v.detach().float().contiguous().cpu() for k, v in clip.state_dict().items()}
    atomic_write_bytes(path, save(sd, metadata={k: str(v) for k, v in metadata.items()}))


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def lr_at(step: int, total: int, base_lr: float, warmup: float) -> float:
    """Linear warm-up to ``base_lr`` then cosine decay to 0, as a pure function of the step."""
    w = int(round(warmup * total)) if warmup < 1 else int(warmup)
    if step < w:
        return base_lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _step_seed(seed: int, *keys: int) -> int:
    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Keep the uint8 cache on the GPU when it fits comfortably (indexing there costs nothing),
    else in pinned host memory (each batch is then copied asynchronously)."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() < 0.3 * free:
        return images.to(device)
    return images.pin_memory()


def _text_params(clip):
    return [p for n, p in clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]


def _param_groups(clip, weight_decay: float):
    """No weight decay on gains, biases, embeddings' 1-d params and the logit scale (as open_clip trains)."""
    decay, no_decay = [], []
    for n, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "ln" in n or "bias" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
        # all of them (seconds, not the minutes a whole ViT-L graph takes).
        blocks = list(clip.visual.transformer.resblocks)
        if hasattr(clip, "transformer") and not cfg.freeze_text:
            blocks += list(clip.transformer.resblocks)
        for blk in blocks:
            blk.compile()
    return clip


def make_optimizer(clip, cfg: FinetuneConfig, device: torch.device):
    return torch.optim.AdamW(
        _param_groups(clip, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


@torch.no_grad()
def _frozen_text_features(clip, ids, eot, device, precision, batch=1024):
    out = []
    for i in range(0, len(ids), batch):
        L = int(eot[i : i + batch].max()) + 1
        with _autocast(device, precision):
            f, _ = encode_text(clip, ids[i : i + batch, :L].to(device))
        out.append(F.normalize(f.float(), dim=-1))
    return torch.cat(out)


def _rewrite_log(log_path: Path | None, run: str, keep_upto_step: int) -> None:
    """Drop this run's rows past ``keep_upto_step`` (-1: all), so a resumed or repeated run logs each step once."""
    if log_path is None or not Path(log_path).exists():
        return
    rows = read_jsonl(log_path)
    kept = [r for r in rows if r.get("run") != run or r.get("step", 0) <= keep_upto_step]
    if len(kept) != len(rows):
        write_jsonl(log_path, kept)


def train_run(
    clip,
    tokenizer,
    cfg: FinetuneConfig,
    images: torch.Tensor,
    pair_rows: torch.Tensor,
    texts: list[str],
    pair_labels: torch.Tensor,
    val: dict | None = None,
    out_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    run: str = "run",
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = False,
    meta: dict | None = None,
) -> dict:
    """Fine-tune ``clip`` on (image, text) pairs; returns the run's summary.

    ``images``: uint8 cache (N x 3 x S x S, S = the model's input size); pair i is image
    ``pair_rows[i]`` with ``texts[i]`` and class ``pair_labels[i]``. ``val``: dict with
    ``classnames, train_images, train_labels, val_images, val_labels`` for per-epoch selection.
    ``out_dir`` gets ``last.pt`` (resume state) and ``best.safetensors`` (selected weights).
    """
    from tqdm.auto import tqdm

    from .models import image_size

    device = torch.device(device)
    rank, world = _rank_world()
    lead = rank == 0
    n = len(pair_rows)
    if n < 2:
        raise ValueError(f"run {run}: {n} training pair(s); a contrastive loss needs at least 2")
    B = min(cfg.batch_size, n - n % world)
    if B % world:
        raise ValueError(f"batch_size {B} is not divisible by the {world} processes")
    b = B // world
    steps_per_epoch = n // B
    total = steps_per_epoch * cfg.epochs
    size = image_size(clip)
    if images.shape[-1] != size or images.shape[-2] != size:
        raise ValueError(f"image cache is {tuple(images.shape[-2:])}, the model takes {size} x {size}")
    out_dir = Path(out_dir) if out_dir is not None else None
    log_path = Path(log_path) if log_path is not None else None
    state_path = out_dir / "last.pt" if out_dir else None
    best_path = out_dir / "best.safetensors" if out_dir else None
    meta = dict(meta or {})

    prepare_model(clip, cfg, device)
    towers = Towers(clip, tokens=cfg.loss == "filip")
    net = towers
    if world > 1:
        net = nn.parallel.DistributedDataParallel(towers, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(clip, cfg, device)
    params = [p for g in opt.param_groups for p in g["params"]]

    ids = tokenizer(list(texts))
    eot = ids.argmax(-1)
    trim = not (cfg.loss == "filip" and world > 1)
    images = _place_images(images, device)
    text_feats = None
    if cfg.freeze_text and cfg.loss != "filip":
        text_feats = _frozen_text_features(clip, ids, eot, device, cfg.precision)
    preprocess_cfg = __import__("open_clip").get_model_preprocess_cfg(clip)
    mean, std = preprocess_cfg.get("mean"), preprocess_cfg.get("std")

    # ---- resume or start fresh
    step0, history, best = 0, [], {"epoch": None, "val_top1": -1.0}
    if resume and state_path is not None and state_path.exists():
        st = _load_state(state_path)
        if st["fingerprint"] != cfg.fingerprint() or st["pairs"] != n:
            raise ValueError(
                f"run {run}: {state_path} was written with other settings or data "
                f"({st['config']}); pass resume=False to start over or use another run directory"
            )
        clip.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step0, history, best = st["step"], json.loads(st["history"]), json.loads(st["best"])
        torch.set_rng_state(st["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in st:
            torch.cuda.set_rng_state(st["rng_cuda"], device)
        if lead:
            _rewrite_log(log_path, run, step0)
    elif lead:
        _rewrite_log(log_path, run, -1)

    def save_state(step):
        if not lead or state_path is None:
            return
        st = {
            "model": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": {"kind": "warmup-cosine", "base_lr": cfg.lr, "warmup": cfg.warmup, "total": total},
            "step": step,
            "pairs": n,
            "fingerprint": cfg.fingerprint(),
            "config": json.dumps(asdict(cfg)),
            "history": json.dumps(history),
            "best": json.dumps(best),
            "rng_cpu": torch.get_rng_state(),
        }
        if device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state(device)
        _save_state(state_path, st)

    def run_validation(epoch, step):
        if val is None or not cfg.validate:
            return
        if lead:
            r = validate(clip, tokenizer, val["classnames"], val["train_images"], val["train_labels"],
                         val["val_images"], val["val_labels"])
            row = {"run": run, "epoch": epoch, "step": step, **r}
            history.append(row)
            if log_path:
                append_jsonl(log_path, row)
            if r["val_top1"] > best["val_top1"]:
                best.update(epoch=epoch, step=step, **r)
                if best_path is not None:
                    _save_weights(best_path, clip, {**meta, "run": run, "epoch": epoch, "val_top1": r["val_top1"]})
        if world > 1:
            dist.barrier()

    if step0 == 0:
        run_validation(0, 0)  # the starting weights compete too: fine-tuning must beat them

    # ---- loop
    pending = []  # (step, epoch, lr, loss tensor, grad-norm tensor): flushed with one sync
    t_train, perm, perm_epoch = 0.0, None, -1
    bar = tqdm(total=total, initial=step0, disable=not (progress and lead), desc=run, leave=False)

    def flush():
        if not pending:
            return
        vals = torch.stack([torch.stack([l.float(), g.float()]) for _, _, _, l, g in pending]).tolist()
        rows = []
        for (s, e, lr, _, _), (loss_v, gnorm) in zip(pending, vals):
            if not (math.isfinite(loss_v) and math.isfinite(gnorm)):
                if lead and log_path and rows:
                    append_jsonl(log_path, rows)
                last = f"{state_path} (step {_load_state(state_path)['step']})" if state_path and state_path.exists() else "none written yet"
                what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                raise NonFiniteLossError(
                    f"run {run}: the {what} became {loss_v if what == 'loss' else gnorm} at step {s} (epoch {e}); "
                    f"training stopped. The last good checkpoint is kept: {last}. "
                    "Lower the learning rate, keep gradient clipping on, or check the captions."
                )
            rows.append({"run": run, "epoch": e, "step": s, "loss": loss_v, "lr": lr, "grad_norm": gnorm})
        pending.clear()
        if lead and log_path:
            append_jsonl(log_path, rows)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")

    interrupted, done = False, step0
    for step in range(step0, total):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, 0, epoch)))
            perm_epoch = epoch
        t0 = time.perf_counter()
        idx = perm[i * B : (i + 1) * B]
        # crop boxes are drawn for the global batch, so DDP sees the same augmentation as one process
        boxes = crop_params(B, cfg.crop_scale, flip=cfg.flip, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, 1, step)))
        idx, boxes = idx[rank * b : (rank + 1) * b], boxes[rank * b : (rank + 1) * b]
        rows = pair_rows[idx]
        batch = images[rows.to(images.device, non_blocking=True)] if images.is_cuda else images[rows]
        x = apply_crops(batch.to(device, non_blocking=True), boxes, size, mean, std)
        L = int(eot[idx].max()) + 1 if trim else ids.shape[1]
        text = None if text_feats is not None else ids[idx, :L].to(device, non_blocking=True)
        tf = text_feats[idx.to(text_feats.device)] if text_feats is not None else None
        lr = lr_at(step, total, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(device, cfg.precision):
            out = net(x, text)
        loss = compute_loss(cfg, out, pair_labels[idx].to(device), rows.to(device), text, tf)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        pending.append((step + 1, epoch + 1, lr, loss.detach(), gnorm.detach()))
        t_train += time.perf_counter() - t0
        done = step + 1
        bar.update(1)
        end_of_epoch = (step + 1) % steps_per_epoch == 0
        stop = cfg.max_steps is not None and step + 1 >= cfg.max_steps and step + 1 < total
        if end_of_epoch or stop or (step + 1) % cfg.log_every == 0 or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            flush()
        if end_of_epoch:
            run_validation(epoch + 1, step + 1)
        if end_of_epoch or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            save_state(step + 1)
        if stop:
            interrupted = True
            break
    flush()
    bar.close()
    if best["epoch"] is None:  # no validation: the last weights are the result
        best.update(epoch=cfg.epochs, step=total, val_top1=None)
        if lead and best_path is not None and not interrupted:
            _save_weights(best_path, clip, {**meta, "run": run, "epoch": cfg.epochs})
    return {
        "run": run,
        "status": "interrupted" if interrupted else "done",
        "steps": done,
        "total_steps": total,
        "pairs": n,
        "batch_size": B,
        "best_epoch": best["epoch"],
        "val_top1": best.get("val_top1"),
        "val_zeroshot_top1": best.get("val_zeroshot_top1"),
        "history": history,
        "train_s": t_train,
        "pairs_per_s": (done - step0) * B / t_train if t_train > 0 else None,
        "path": str(best_path) if best_path else None,
    }


# ----------------------------------------------------------------------------- a whole stage
def _shots_list(shots):
    out = []
    for s in [shots] if isinstance(shots, (str, int)) else shots:
        if s in ("full", None):
            out.append("full")
        elif str(s).isdigit() and int(s) >= 1:
            out.append(int(s))
        else:
            raise ValueError(f"shots must be 'full' or a positive integer, got {s!r}")
    return out


def finetune_all(
    run_dir: str | Path,
    dataset="synthetic",
    data_root: str | None = None,
    dataset_options: dict | None = None,
    model: str = "tiny",
    pretrained: str | None = "synthetic",
    methods=("gist", "finetune-classname"),
    shots=("full", 1, 3, 5),
    seeds=(0, 1, 2),
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
    **train_options,
) -> list[dict]:
    """Train every (method, shots, seed) run and record them in ``run_dir``.

    ``dataset``: a name for :func:`workbench.data.load_dataset` or a Dataset. Few-shot runs keep
    ``workbench.data.few_shot(ds, k, seed)`` training images (and only their matches); ``"full"``
    uses one seed (the first). ``train_options`` are :class:`FinetuneConfig` fields. Writes
    ``checkpoints/<run>/best.safetensors`` (+ ``last.pt``), ``checkpoints/index.json``,
    ``train_log.jsonl`` and ``metrics.json["finetune"]``; returns the index rows of these runs.
    """
    from .data import Dataset, few_shot, load_dataset
    from .data.images import image_cache
    from .models import auto_device, image_size, load_clip

    run_dir = Path(run_dir)
    rank, world = _rank_world()
    lead = rank == 0
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected {list(METHODS)}")
    shots = _shots_list(shots)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    unknown = sorted(set(train_options) - {f.name for f in fields(FinetuneConfig)} | ({"method", "seed"} & set(train_options)))
    if unknown:
        raise ValueError(f"unknown fine-tuning option(s) {unknown}; see FinetuneConfig")
    FinetuneConfig(**train_options)  # validate before any heavy work
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_root, **(dataset_options or {}))
    matches = None
    if "gist" in methods:
        mpath = run_dir / "matches.jsonl"
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath} not found: method 'gist' trains on matched captions; run the match stage first")
        matches = read_jsonl(mpath)
    for k in shots:
        if k != "full":
            few_shot(ds, k, seeds[0])  # raises early when a class has fewer than k images
    if device == "auto" or device is None:
        dev = auto_device("auto")
        if world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        dev = torch.device(device)

    probe_model = load_clip(model, pretrained, "cpu")
    size = image_size(probe_model.model)
    train_all, val_ds = ds.split("train"), ds.split("val")
    train_cache = image_cache(train_all.paths(), size, progress=progress and lead)
    val_cache = image_cache(val_ds.paths(), size, progress=progress and lead)
    row_of = {f: i for i, f in enumerate(train_all.table["filename"])}

    log_path = run_dir / "train_log.jsonl"
    results, index_rows = [], []
    for method in methods:
        for k in shots:
            for seed in seeds[:1] if k == "full" else seeds:
                name = run_name(method, k, seed)
                cfg = FinetuneConfig(method=method, seed=seed, **train_options)
                sub = few_shot(ds, k, seed).split("train")
                rows_sub = torch.tensor([row_of[f] for f in sub.table["filename"]])
                images = train_cache[rows_sub]
                pair_rows, texts, pair_labels = build_pairs(sub, method, cfg.captions_per_image, matches)
                torch.manual_seed(seed)  # random-init models (pretrained=None) depend on it
                bundle = load_clip(model, pretrained, "cpu")
                val = {
                    "classnames": ds.classnames,
                    "train_images": images,
                    "train_labels": torch.tensor(sub.labels),
                    "val_images": val_cache,
                    "val_labels": torch.tensor(val_ds.labels),
                }
                meta = {"model": model, "pretrained": pretrained, "method": method, "shots": k, "seed": seed}
                r = train_run(
                    bundle.model, bundle.tokenizer, cfg, images, pair_rows, texts, pair_labels, val=val,
                    out_dir=run_dir / "checkpoints" / name, log_path=log_path, run=name, device=dev,
                    resume=resume, progress=progress, meta=meta,
                )
                r.update(method=method, shots=k, seed=seed)
                results.append(r)
                index_rows.append({
                    "method": method, "shots": k, "seed": seed,
                    "path": str(Path(r["path"]).relative_to(run_dir)),
                    "model": model, "pretrained": pretrained,
                    "epoch": r["best_epoch"], "val_top1": r["val_top1"],
                })
                del bundle
    if lead:
        _write_index(run_dir, index_rows)
        summary = [{k: v for k, v in r.items() if k != "history"} for r in results]
        for s, r in zip(summary, results):
            s["start_val_top1"] = r["history"][0]["val_top1"] if r["history"] else None
        update_metrics(run_dir, "finetune", {
            "model": model, "pretrained": pretrained, "device": str(dev), "world_size": world,
            "config": {k: v for k, v in asdict(FinetuneConfig(**train_options)).items() if k not in ("method", "seed")},
            "runs": summary,
        })
    return index_rows


def _write_index(run_dir: Path, rows: list[dict]) -> None:
    """Merge into ``checkpoints/index.json``: rows of the same (method, shots, seed) are replaced."""
    path = run_dir / "checkpoints" / "index.json"
    old = read_json(path) if path.exists() else []
    key = lambda r: (r["method"], str(r["shots"]), r["seed"])  # noqa: E731
    new = {key(r) for r in rows}
    write_json(path, [r for r in old if key(r) not in new] + rows)


def read_index(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "checkpoints" / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the fine-tuning stage first")
    return read_json(path)


# ----------------------------------------------------------------------------- figures
def plot_training(run_dir: str | Path, runs: list[str] | None = None):
    """Training loss (per step) and validation top-1 (per epoch) of each run; returns the figure."""
    import matplotlib.pyplot as plt

    rows = read_jsonl(Path(run_dir) / "train_log.jsonl")
    names = runs or list(dict.fromkeys(r["run"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        tr = [r for r in rows if r["run"] == name and "loss" in r]
        va = [r for r in rows if r["run"] == name and "val_top1" in r]
        if tr:
            ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name, lw=1)
        if va:
            ax2.plot([r["epoch"] for r in va], [r["val_top1"] for r in va], marker="o", label=name, lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax2.set(xlabel="epoch (0 = before fine-tuning)", ylabel="val top-1 (probe)", title="validation")
    if len(names) <= 12:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- torchrun entry point
def main(argv=None):
    """``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [...]``: DDP over N processes
    (NCCL on GPUs, gloo on CPU); each batch is split across ranks, features are gathered for the loss."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--dataset-options", default="{}", help="JSON dict")
    p.add_argument("--model", default="tiny")
    p.add_argument("--pretrained", default="synthetic")
    p.add_argument("--methods", default="gist,finetune-classname")
    p.add_argument("--shots", default="full,1,3,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--options", default="{}", help="JSON dict of FinetuneConfig fields, e.g. '{\"epochs\": 5}'")
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        use_cuda = torch.cuda.is_available() and a.device != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rows = finetune_all(
            a.run_dir, a.dataset, a.data_root, json.loads(a.dataset_options), a.model,
            None if a.pretrained in ("", "none", "None") else a.pretrained,
            methods=a.methods.split(","), shots=a.shots.split(","), seeds=[int(s) for s in a.seeds.split(",")],
            device=a.device, resume=not a.no_resume, progress=True, **json.loads(a.options),
        )
        if _rank_world()[0] == 0:
            print(json.dumps(rows, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
