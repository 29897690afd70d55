"""The fine-tuning loop: one run of contrastive training of a CLIP model on (image, text) pairs.

fp32 master weights with bf16 autocast on GPU, fused AdamW, warm-up + cosine schedule, gradient
clipping, on-device augmentation from the uint8 image cache, per-epoch validation that picks the
checkpoint, atomic checkpoints that resume exactly, a stop on a non-finite loss, and DDP with
features gathered across ranks. :class:`Trainer` owns the per-step work (the benchmark times it);
:func:`train_run` adds validation, logging and checkpoints. The stage around it is ``workbench.finetune``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .augment import apply_crops, crop_params
from .io import append_jsonl, atomic_write_bytes, read_jsonl, write_jsonl

METHODS = ("gist", "finetune-classname")


ATTENTION = ("auto", "default", "flash", "cudnn", "efficient")


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; the last good checkpoint on disk is kept."""


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (defaults: the CPU demo with the tiny model)."""

    method: str = "gist"  # "gist" (matched captions) or "finetune-classname" ("a photo of a <class>.")
    loss: str = "clip"  # "clip", "class-aware" or "filip"
    captions_per_image: int = 4  # GIST trains on 4 of the top-5 captions, each its own pair
    epochs: int = 3
    batch_size: int = 128  # global batch, at most (evened so each epoch uses every pair; split across ranks)
    lr: float = 3e-4  # the tiny demo model; real CLIPs want ~1e-5 (FLYP), GIST used 1e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.1  # warm-up steps; < 1 means a fraction of all steps
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    compile: bool = False  # torch.compile each transformer block (fast to compile, same kernels)
    attention: str = "auto"  # GPU attention kernel: "auto" (time cuDNN vs flash once), "default", "flash", "cudnn", "efficient"
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
            (self.attention in ATTENTION, f"attention must be one of {ATTENTION}, got {self.attention!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def fingerprint(self) -> str:
        """What must match for a checkpoint to resume this run exactly."""
        skip = {"validate", "checkpoint_every", "log_every", "max_steps", "compile", "grad_checkpointing", "attention"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    xt = F.normalize(out["image_tokens"].float(), dim=-1)
    yt = F.normalize(out["text_tokens"].float(), dim=-1)
    mask = losses.text_token_mask(text_ids)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # text ids are not trimmed under DDP + FILIP, so token tensors have equal shapes on every rank
        xt, yt, mask = *losses.gather_features(xt, yt), losses.gather_labels(mask)
    return losses.filip_loss(xt, yt, mask, scale, block_size=cfg.filip_block)


# ----------------------------------------------------------------------------- checkpoints
def _save_state(path: Path, state: dict) -> None:
    """torch.save to a temp file, fsync, rename: readers see the old or the new file, never half."""
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
        import torch._dynamo as dynamo

        # one static graph per (tower, batch, text-length bucket): allow more than the default 8,
        # or few-shot runs with their smaller batches would fall back to eager
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(64, getattr(dynamo.config, knob)))
        blocks = list(clip.visual.transformer.resblocks)
        if hasattr(clip, "transformer") and not cfg.freeze_text:
            blocks += list(clip.transformer.resblocks)
        for blk in blocks:
            # static shapes: vision and text blocks share one forward() but differ in sequence
            # length (and width); dynamic=False keeps a specialised graph for each instead of
            # one shape-generic graph. Text lengths are bucketed (multiples of 8) by the Trainer.
            blk.compile(dynamic=False)
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




_SDPA_PICKS: dict = {}


def _fastest_attention(device, heads: int, tokens: int, head_dim: int, batch: int = 32) -> str:
    """Time forward+backward of bf16 attention at the vision tower's shape with flash and cuDNN
    kernels; return the fastest whose output agrees with flash (once per process and shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = (str(device), heads, tokens, head_dim, batch)
    if key in _SDPA_PICKS:
        return _SDPA_PICKS[key]
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    times, ref = {}, None
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
                if ref is None:
                    ref = out.detach()
                elif not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for i in range(8):
                    if i == 3:
                        start.record()
                    F.scaled_dot_product_attention(q, k, v).sum().backward()
                end.record()
                end.synchronize()
                times[name] = start.elapsed_time(end)
        except RuntimeError:  # kernel not available for this shape / build
            continue
    _SDPA_PICKS[key] = min(times, key=times.get) if times else "default"
    return _SDPA_PICKS[key]


def _attention_context(clip, cfg: FinetuneConfig, device: torch.device):
    """Context manager that puts the chosen SDPA kernel first (others stay as fallbacks, e.g. for
    the text tower's masked attention); a no-op on CPU or with ``attention="default"``."""
    from contextlib import nullcontext

    if device.type != "cuda" or cfg.attention == "default":
        return nullcontext, "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = cfg.attention
    if name == "auto":
        v = clip.visual
        try:
            blk = v.transformer.resblocks[0]
            heads, width = blk.attn.num_heads, blk.attn.embed_dim
            tokens = v.grid_size[0] * v.grid_size[1] + 1
            name = _fastest_attention(device, heads, tokens, width // heads)
        except AttributeError:  # not an open_clip ViT: leave the choice to PyTorch
            return nullcontext, "default"
    if name == "default":
        return nullcontext, name
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    order = [kinds[name]] + [b for b in (*kinds.values(), SDPBackend.MATH) if b != kinds[name]]
    try:
        sdpa_kernel(order, set_priority=True)
    except TypeError:  # older PyTorch: no priorities; flash/cuDNN are its defaults anyway
        return nullcontext, "default"
    return (lambda: sdpa_kernel(order, set_priority=True)), name


class Trainer:
    """What one training step needs, set up once: the model on its device (compiled, wrapped in DDP
    when distributed), the optimizer, tokenised texts and the image cache. :meth:`train_step` does one
    step without any host-device sync, so consecutive steps queue up on the GPU."""

    def __init__(self, clip, tokenizer, cfg: FinetuneConfig, images, pair_rows, texts, pair_labels, device="cpu"):
        from open_clip import get_model_preprocess_cfg

        from .models import image_size

        self.clip, self.cfg, self.device = clip, cfg, torch.device(device)
        self.rank, self.world = _rank_world()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.n = n = len(pair_rows)
        if n < 2:
            raise ValueError(f"{n} training pair(s); a contrastive loss needs at least 2")
        if not (len(texts) == len(pair_labels) == n):
            raise ValueError(f"pairs disagree: {n} image rows, {len(texts)} texts, {len(pair_labels)} labels")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} processes")
        if n < self.world * 2:
            raise ValueError(f"{n} training pairs cannot be split over {self.world} processes")
        # Equal batches (one shape for compile and DDP) of at most batch_size that cover the epoch:
        # 240 pairs at batch_size 128 -> 2 steps of 120, not 1 step that drops 112 pairs.
        self.steps_per_epoch = math.ceil(n / min(cfg.batch_size, n))
        self.B = (n // self.steps_per_epoch) // self.world * self.world
        self.b = self.B // self.world
        self.total = self.steps_per_epoch * cfg.epochs
        self.size = image_size(clip)
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"image cache is {tuple(images.shape[-2:])}, the model takes {self.size} x {self.size}")

        prepare_model(clip, cfg, self.device)
        self.towers = Towers(clip, tokens=cfg.loss == "filip")
        self.net = self.towers
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.towers, device_ids=ids)
        self.opt = make_optimizer(clip, cfg, self.device)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

        self.pair_rows, self.pair_labels = pair_rows.long(), pair_labels.long()
        self.ids = tokenizer(list(texts))
        self.eot = self.ids.argmax(-1)
        # FILIP under DDP gathers token tensors, which need equal shapes on every rank: no trimming
        self.trim = not (cfg.loss == "filip" and self.world > 1)
        self.images = _place_images(images, self.device)
        self.text_feats = None
        if cfg.freeze_text and cfg.loss != "filip":
            self.text_feats = _frozen_text_features(clip, self.ids, self.eot, self.device, cfg.precision)
        pp = get_model_preprocess_cfg(clip)
        self.mean, self.std = pp.get("mean"), pp.get("std")
        self._perm, self._perm_epoch = None, -1
        self.attention_ctx, self.attention = _attention_context(clip, cfg, self.device)

    def batch(self, step: int) -> dict:
        """This rank's share of global batch ``step``: augmented images on the device, text ids, labels."""
        cfg, B, b, r = self.cfg, self.B, self.b, self.rank
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:  # a pure function of (seed, epoch): resume needs no sampler state
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, 0, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        idx = self._perm[i * B : (i + 1) * B]
        # crop boxes are drawn for the global batch, so DDP ranks see what one process would
        g = torch.Generator().manual_seed(_step_seed(cfg.seed, 1, step))
        boxes = crop_params(B, cfg.crop_scale, flip=cfg.flip, generator=g)
        idx, boxes = idx[r * b : (r + 1) * b], boxes[r * b : (r + 1) * b]
        rows = self.pair_rows[idx]
        src = self.images[rows.to(self.images.device, non_blocking=True)]
        x = apply_crops(src.to(self.device, non_blocking=True), boxes, self.size, self.mean, self.std)
        text = tf = None
        if self.text_feats is not None:
            tf = self.text_feats[idx.to(self.text_feats.device)]
        else:
            L = self.ids.shape[1]
            if self.trim:
                L = int(self.eot[idx].max()) + 1  # CPU tensor: no device sync
                if self.cfg.compile:  # few distinct lengths -> few recompiles
                    L = min(self.ids.shape[1], -(-L // 8) * 8)
            text = self.ids[idx, :L].to(self.device, non_blocking=True)
        return {
            "images": x,
            "text": text,
            "text_features": tf,
            "labels": self.pair_labels[idx].to(self.device, non_blocking=True),
            "image_ids": rows.to(self.device, non_blocking=True),
        }

    def train_step(self, step: int):
        """One optimizer step; returns (loss, grad norm) as device tensors (no sync)."""
        cfg = self.cfg
        d = self.batch(step)
        lr = lr_at(step, self.total, cfg.lr, cfg.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with self.attention_ctx():
            with _autocast(self.device, cfg.precision):
                out = self.net(d["images"], d["text"])
            # the loss itself in float32, outside autocast (bf16 logits lose the ranking)
            loss = compute_loss(cfg, out, d["labels"], d["image_ids"], d["text"], d["text_features"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))  # as CLIP training does
        return loss.detach(), gnorm.detach()


def train_run(
    clip,
    tokenizer,
    cfg: FinetuneConfig,
    images: torch.Tensor,
    pair_rows: torch.Tensor,
    texts: list[str],
    pair_labels: torch.Tensor,
    validate: Callable[[nn.Module], dict] | None = None,
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
    ``pair_rows[i]`` with ``texts[i]`` and class ``pair_labels[i]``. ``validate(clip)`` returns a dict
    with ``val_top1`` (and more), called before training and after every epoch; the best epoch's
    weights go to ``out_dir/best.safetensors`` (the starting weights compete too). ``out_dir/last.pt``
    holds the resume state (model, optimizer, schedule, RNG, step, history), written atomically at
    every epoch end and every ``cfg.checkpoint_every`` steps, only after the losses up to it were
    checked finite.
    """
    from tqdm.auto import tqdm

    tr = Trainer(clip, tokenizer, cfg, images, pair_rows, texts, pair_labels, device)
    dev, total, lead = tr.device, tr.total, tr.rank == 0
    out_dir = Path(out_dir) if out_dir is not None else None
    log_path = Path(log_path) if log_path is not None else None
    state_path = out_dir / "last.pt" if out_dir else None
    best_path = out_dir / "best.safetensors" if out_dir else None
    meta = dict(meta or {})
    validate = validate if cfg.validate else None

    step0, history, best = 0, [], {"epoch": None, "val_top1": -1.0}
    if resume and state_path is not None and state_path.exists():
        st = _load_state(state_path)
        if st["fingerprint"] != cfg.fingerprint() or st["pairs"] != tr.n:
            raise ValueError(
                f"run {run}: {state_path} was written with other settings or data ({st['config']}, "
                f"{st['pairs']} pairs); pass resume=False to start over, or use another run directory"
            )
        clip.load_state_dict(st["model"])
        tr.opt.load_state_dict(st["optimizer"])
        step0, history, best = st["step"], json.loads(st["history"]), json.loads(st["best"])
        torch.set_rng_state(st["rng_cpu"])
        if dev.type == "cuda" and "rng_cuda" in st:
            torch.cuda.set_rng_state(st["rng_cuda"], dev)
        if lead:
            _rewrite_log(log_path, run, step0)
    elif lead:
        _rewrite_log(log_path, run, -1)

    def save_state(step):
        if not lead or state_path is None:
            return
        st = {
            "model": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
            "optimizer": tr.opt.state_dict(),
            "scheduler": {"kind": "warmup-cosine", "base_lr": cfg.lr, "warmup": cfg.warmup, "total": total},
            "step": step,
            "pairs": tr.n,
            "fingerprint": cfg.fingerprint(),
            "config": json.dumps(asdict(cfg)),
            "history": json.dumps(history),
            "best": json.dumps(best),
            "rng_cpu": torch.get_rng_state(),
        }
        if dev.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state(dev)
        _save_state(state_path, st)

    def run_validation(epoch, step):
        if validate is None:
            return
        if lead:
            r = validate(clip)
            clip.train()
            row = {"run": run, "epoch": epoch, "step": step, **r}
            history.append(row)
            if log_path:
                append_jsonl(log_path, row)
            if r["val_top1"] > best["val_top1"]:
                best.update(epoch=epoch, step=step, **r)
                if best_path is not None:
                    _save_weights(best_path, clip, {**meta, "run": run, "epoch": epoch, "val_top1": r["val_top1"]})
        if tr.world > 1:
            dist.barrier()

    if step0 == 0:
        run_validation(0, 0)

    pending = []  # (step, epoch, lr, loss, grad norm) not yet checked: flushed with one sync
    bar = tqdm(total=total, initial=step0, disable=not (progress and lead), desc=run, leave=False)

    def flush():
        if not pending:
            return
        vals = torch.stack([torch.stack([l.float(), g.float()]) for *_, l, g in pending]).tolist()
        rows = []
        for (s, e, lr, _, _), (loss, gnorm) in zip(pending, vals):
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                pending.clear()
                if lead and log_path and rows:
                    append_jsonl(log_path, rows)
                last = "none written yet"
                if state_path is not None and state_path.exists():
                    last = f"{state_path} (step {_load_state(state_path)['step']})"
                what, v = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
                raise NonFiniteLossError(
                    f"run {run}: the {what} became {v} at step {s} (epoch {e}); training stopped. "
                    f"The last good checkpoint is kept: {last}. "
                    "Lower the learning rate, keep gradient clipping on, or check the captions."
                )
            rows.append({"run": run, "epoch": e, "step": s, "loss": loss, "lr": lr, "grad_norm": gnorm})
        pending.clear()
        if lead and log_path:
            append_jsonl(log_path, rows)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")

    t_train, interrupted, done = 0.0, False, step0
    t0 = time.perf_counter()
    for step in range(step0, total):
        loss, gnorm = tr.train_step(step)
        done = step + 1
        pending.append((done, step // tr.steps_per_epoch + 1, lr_at(step, total, cfg.lr, cfg.warmup), loss, gnorm))
        bar.update(1)
        end_of_epoch = done % tr.steps_per_epoch == 0
        ckpt_now = end_of_epoch or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        stop = cfg.max_steps is not None and done >= cfg.max_steps and done < total
        if ckpt_now or stop or done % cfg.log_every == 0:
            flush()  # syncs: losses so far are known finite before any checkpoint is written
        if ckpt_now or stop:
            t_train += time.perf_counter() - t0  # validation and checkpoint writes are not training time
            if end_of_epoch:
                run_validation(done // tr.steps_per_epoch, done)
            if ckpt_now:
                save_state(done)
            t0 = time.perf_counter()
        if stop:
            interrupted = True
            break
    flush()
    t_train += time.perf_counter() - t0 if done > step0 and not (ckpt_now or stop) else 0.0
    bar.close()
    if best["epoch"] is None:  # no validation: the last weights are the result
        best.update(epoch=done // tr.steps_per_epoch, step=done, val_top1=None)
        if lead and best_path is not None and not interrupted:
            _save_weights(best_path, clip, {**meta, "run": run, "epoch": best["epoch"]})
    return {
        "run": run,
        "status": "interrupted" if interrupted else "done",
        "steps": done,
        "total_steps": total,
        "pairs": tr.n,
        "batch_size": tr.B,
        "best_epoch": best["epoch"],
        "val_top1": best.get("val_top1"),
        "val_zeroshot_top1": best.get("val_zeroshot_top1"),
        "history": history,
        "train_s": t_train,
        "pairs_per_s": (done - step0) * tr.B / t_train if t_train > 0 else None,
        "path": str(best_path) if best_path else None,
    }
