"""Training the tiny CLIP on the synthetic benchmark, through fine-tuning's training step.

It learns from generic attribute captions of randomly attributed birds drawn with their own seed,
so it knows colours and parts but has never seen a species name nor any image of the demo dataset.
The data source is its own (fresh captions every step, with a truth table); the step, optimizer
groups, schedule and logit-scale handling are :class:`workbench.finetune.trainer.TrainStep`'s, and
the loss is :func:`workbench.finetune.losses.multi_positive_loss`. :func:`build` writes the weights the
package ships (``workbench pretrain``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from safetensors.torch import save as save_safetensors

from .. import __version__
from ..cache import cached_tensors
from ..clip import load_clip, normalize_images, token_mask, trim
from ..clip.weights import PACKAGE_WEIGHTS, WEIGHTS_DIR, trim_token_table
from ..data import synthetic as syn
from ..finetune.augment import shift_flip
from ..finetune.config import FinetuneConfig
from ..finetune.losses import multi_positive_loss
from ..finetune.trainer import TrainStep, lr_at
from ..io import atomic_write_bytes, hash_key
from ..progress import progress_bar
from .captions import WEIGHTS, attribute_prompts, caption_vocabulary, training_captions, truth_table

# 3: conv stem, one-attribute captions with hard negatives, text tower frozen at first
# 4: breast pattern, beak and tail never named in words; birds at the benchmark's pose spread (issue 23)
PRETRAIN_VERSION = 4
ARCH = "wb-tiny"
DEFAULTS = dict(
    n_images=4096,  # random birds; rendered once into a uint8 cache
    data_seed=1_000_003,  # not any demo dataset seed: the pretraining images are its own draw
    size=64,
    steps=3000,
    batch_size=32,
    captions_per_image=4,  # one-attribute captions per image, each with its hard negative
    patch_dropout=0.0,  # dropping patches drops the beak the caption names
    lr=1e-3,
    weight_decay=0.05,
    warmup=100,
    text_freeze=600,  # steps the text tower stays at its random init (then warms up again)
    seed=0,
    # Attributes the captions never name. The images show them, so the downstream species (which these
    # separate) are a gap that fine-tuning on text can close and the frozen features cannot: the
    # instrument's positive control (benchmarks/INSTRUMENT_STUDY.md measured this design on validation).
    withhold=["breast_pattern", "beak_shape", "tail_size"],
    pose=1.0,  # the birds' position, scale and rotation spread: the benchmark's default (synthetic ``pose``)
)
def pretrain_config(**overrides) -> dict:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown pretraining option(s) {unknown}; known: {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **overrides}
    withhold = config["withhold"]
    if isinstance(withhold, str):  # `--set withhold=beak_shape,tail_size`
        withhold = [a for a in withhold.split(",") if a]
    bad = [a for a in withhold if a not in syn.ATTRIBUTES]
    if bad or not isinstance(withhold, (list, tuple)):
        raise ValueError(f"pretraining option withhold names unknown attribute(s) {bad or withhold!r}; "
                         f"known: {list(syn.ATTRIBUTES)}")
    if len(set(withhold)) == len(syn.ATTRIBUTES):
        raise ValueError("pretraining option withhold names every attribute: the captions would have nothing to say")
    config["withhold"] = sorted(set(withhold), key=syn.ATTRIBUTES.index)
    if not 0 <= float(config["pose"]) <= 1:
        raise ValueError(f"pretraining option pose must be in [0, 1], got {config['pose']!r}")
    return config


def caption_weights(config: dict) -> dict:
    """How often the captions name each attribute: :data:`captions.WEIGHTS`, 0 for the withheld ones."""
    return {a: (0 if a in config["withhold"] else w) for a, w in WEIGHTS.items()}


def pretrain_images(config: dict) -> tuple[torch.Tensor, list[dict]]:
    """The pretraining birds: uint8 images (cached on disk) and their attributes."""
    key = hash_key("pretrain-images", syn.GENERATOR_VERSION, config["n_images"], config["data_seed"], config["size"],
                   float(config["pose"]))
    cache = cached_tensors("synthetic-pretrain", key, lambda: _render(config))
    # attributes are cheap to redraw exactly (same rng stream) without re-rendering
    codes = cache["attributes"].numpy()
    attrs = [{a: syn.ATTRIBUTE_VALUES[a][int(c)] for a, c in zip(syn.ATTRIBUTES, row)} for row in codes]
    return cache["images"], attrs


def _render(config: dict) -> dict[str, torch.Tensor]:
    images, attrs = syn.random_birds(config["n_images"], config["data_seed"], config["size"], pose=float(config["pose"]))
    codes = [[syn.ATTRIBUTE_VALUES[a].index(r[a]) for a in syn.ATTRIBUTES] for r in attrs]
    return {"images": torch.from_numpy(images), "attributes": torch.tensor(codes, dtype=torch.uint8)}


def default_threads() -> int:
    """2 CPU threads, or 1 when the machine is already busy.

    On an oversubscribed machine two OpenMP threads spin-wait on each other and a step runs
    ~10x slower than with one thread (measured on a 2-core box at load 10).
    """
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > cpus - 1
    except OSError:  # not available on every platform
        busy = False
    return 1 if busy or cpus < 2 else 2


class CaptionSource:
    """The pretraining batches: random images of the cache, each with fresh one-attribute captions and
    their hard negatives, and the truth table of which caption holds for which image."""

    def __init__(self, images: torch.Tensor, attrs: list[dict], tokenizer, config: dict, weights: dict | None = None):
        self.images, self.attrs, self.tokenizer, self.config = images, attrs, tokenizer, config
        self.weights = weights  # how often each attribute is named (None: captions.WEIGHTS; 0: never named)
        self.codes = np.array([[syn.ATTRIBUTE_VALUES[a].index(r[a]) for a in syn.ATTRIBUTES] for r in attrs])
        self.rng = np.random.default_rng([config["seed"], 505])
        self.gen = torch.Generator().manual_seed(config["seed"])

    def batch(self, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(model input images, caption ids cut after the last EOT, truth table)``."""
        idx = self.rng.choice(len(self.images), size=self.config["batch_size"], replace=False)
        caps = [c for i in idx for c in training_captions(self.attrs[i], self.rng, self.config["captions_per_image"],
                                                                 self.weights)]
        pos = truth_table(self.codes[idx], [d for _, d in caps])
        x = normalize_images(shift_flip(self.images[idx], self.gen), model)
        return x, trim(self.tokenizer([t for t, _ in caps])), pos


def text_lr_scale(config: dict):
    """The text tower's learning-rate multiplier: 0 for the first ``text_freeze`` steps, then a warm-up.
    While the image tower cannot yet tell beaks apart, the best text embedding for "short/long/hooked
    beak" is one vector; once the text tower has learned that, the image tower gets no gradient to tell
    them apart either. Holding the random text tower still for a while breaks that deadlock."""
    freeze, warm = config["text_freeze"], max(1, config["warmup"])

    def scale(step: int, tower: str) -> float:
        if tower != "text" or not freeze:
            return 1.0
        return 0.0 if step < freeze else min(1.0, (step - freeze + 1) / warm)

    return scale


def _loss(pos: torch.Tensor):
    def loss_fn(out):
        img, txt = F.normalize(out["image"].float(), dim=-1), F.normalize(out["text"].float(), dim=-1)
        return multi_positive_loss(img, txt, out["logit_scale"], pos)

    return loss_fn


def _fit(config: dict, progress: bool, log) -> tuple[torch.nn.Module, list[float], float]:
    """The training itself: ``(model, losses, data seconds)``."""
    t0 = time.time()
    images, attrs = pretrain_images(config)
    t_data = time.time() - t0
    torch.manual_seed(config["seed"])
    model, _, tokenizer = load_clip("tiny", pretrained=None, device="cpu")
    if config["patch_dropout"]:
        model.visual.patch_dropout = PatchDropout(config["patch_dropout"])  # active in train mode only
    cfg = FinetuneConfig(batch_size=config["batch_size"], lr=config["lr"], weight_decay=config["weight_decay"],
                         warmup=config["warmup"], grad_clip=1.0, precision="fp32")
    steps = config["steps"]
    trainer = TrainStep(model, cfg, "cpu", steps, distributed=False, lr_scale=text_lr_scale(config))
    source = CaptionSource(images, attrs, tokenizer, config, caption_weights(config))
    losses = []
    for step in progress_bar(range(steps), disable=not progress, desc="pretrain tiny CLIP"):
        x, ids, pos = source.batch(model)
        loss, _ = trainer.step(step, x, ids, _loss(pos))
        losses.append(loss.item())
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"pretraining loss is {losses[-1]} at step {step}")
        if log is not None and (step % 25 == 0 or step == steps - 1):
            log({"step": step, "loss": losses[-1], "lr": lr_at(step, steps, cfg.lr, cfg.warmup)})
    return model, losses, t_data


def train(config: dict | None = None, progress: bool = False, log=None, threads: int | None = None) -> tuple[dict, dict]:
    """Train the tiny CLIP from random init; return ``(state_dict, info)`` (CPU tensors).

    ``config["withhold"]``: attributes the captions never name (:func:`caption_weights`), so the model is
    not taught them in words.

    ``threads``: torch CPU threads while training (default :func:`default_threads`); not part of
    the cache key, the result does not depend on it beyond float rounding.
    """
    config = pretrain_config(**(config or {}))
    threads = threads or default_threads()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t1, c1 = time.time(), time.process_time()
        model, losses, t_data = _fit(config, progress, log)
        info = {
            "config": config,
            "data_seconds": round(t_data, 2),
            "train_seconds": round(time.time() - t1 - t_data, 2),
            # CPU seconds of all threads: train_seconds on an idle machine is about this / threads
            "train_cpu_seconds": round(time.process_time() - c1, 2),
            "threads": threads,
            "caption_weights": caption_weights(config),
            "loss_first": round(float(np.mean(losses[:20])), 4),
            "loss_last": round(float(np.mean(losses[-20:])), 4),
        }
        model.visual.patch_dropout = torch.nn.Identity()
        model.eval()
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, info
    finally:
        torch.set_num_threads(saved_threads)


# ---------------------------------------------------------------- the shipped weights
def trained_tokens(tokenizer, config: dict, n_captions: int = 4000) -> set[int]:
    """Token ids the pretraining captions (and the zero-shot prompts) use: the rows of the token table
    that training moves; the others stay at their random initialisation."""
    rng = np.random.default_rng(0)
    attrs = [{a: str(rng.choice(v)) for a, v in syn.ATTRIBUTE_VALUES.items()} for _ in range(n_captions)]
    texts = [t for a in attrs for t, _ in training_captions(a, rng, 1)] + [" ".join(sorted(caption_vocabulary()))]
    texts += [t for a in syn.ATTRIBUTES for t in attribute_prompts(a)]
    ids = tokenizer(texts)
    return set(ids[token_mask(ids)].tolist())


def build(out: str | Path | None = None, progress: bool = False, **overrides) -> Path:
    """Train the recipe and write the weights the package ships: fp16 safetensors, token table trimmed
    to the trained rows, metadata recording the recipe, the generator, package and torch versions and the
    training figures. ``out``: default the package's file (what ``load_clip("tiny", "synthetic")`` loads)."""
    config = pretrain_config(**overrides)
    out = Path(out) if out is not None else WEIGHTS_DIR / PACKAGE_WEIGHTS[(ARCH, "synthetic")]
    state, info = train(config, progress=progress)
    tokenizer = load_clip("tiny", pretrained=None, device="cpu").tokenizer
    state = trim_token_table({k: v.half() for k, v in state.items()}, trained_tokens(tokenizer, config))
    meta = {"arch": ARCH, "recipe": config, "pretrain_version": PRETRAIN_VERSION,
            "generator_version": syn.GENERATOR_VERSION, "workbench_version": __version__,
            "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%d"), "training": info}
    atomic_write_bytes(out, save_safetensors(state, metadata={k: json.dumps(v) for k, v in meta.items()}))
    return out
