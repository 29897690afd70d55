"""A tiny CLIP pretrained on the synthetic benchmark: a stand-in for web-pretrained CLIP.

It is trained contrastively on generic attribute captions ("a bird with a red crown and blue
wings") of randomly attributed birds drawn with their own seed, so it knows colours and parts
but has never seen a species name nor any image of the demo dataset. The weights are trained
once and cached under ``cache_root()/pretrained``, keyed by generator and training config.

The loss is the symmetric CLIP InfoNCE with multi-positive targets: a caption counts as a
positive for every image in the batch it is true of (ground truth is known), so short captions
shared by many images are not pushed apart from them as false negatives.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import cached_tensors, hash_key
from .data import synthetic as syn
from .io import atomic_write_bytes, cache_root
from .models import encode_images, encode_texts, load_clip, normalize_images

PRETRAIN_VERSION = 1
ARCH = "wb-tiny"
DEFAULTS = dict(
    n_images=4096,  # random birds; rendered once into a uint8 cache
    data_seed=1_000_003,  # not any demo dataset seed: the pretraining images are its own draw
    size=64,
    steps=300,
    batch_size=64,
    captions_per_image=3,  # random captions (1-4 attributes each) per image
    patch_dropout=0.5,  # FLIP-style: train on a random half of the patches, ~1.6x cheaper
    lr=1e-3,
    weight_decay=0.05,
    warmup=20,
    seed=0,
)

# How each attribute is phrased in captions and zero-shot prompts.
_PHRASE = {
    "crown_color": "a {} crown",
    "wing_color": "{} wings",
    "breast_color": "a {} breast",
    "breast_pattern": "a {} breast",
    "beak_shape": "a {} beak",
    "tail_size": "a {} tail",
}
_OPENERS = ["a bird with {}.", "a photo of a bird with {}.", "a small bird with {}.", "this bird has {}."]


def pretrain_config(**overrides) -> dict:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown pretraining option(s) {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


def checkpoint_key(config: dict) -> str:
    return hash_key("pretrain", PRETRAIN_VERSION, syn.GENERATOR_VERSION, ARCH, config)


# ---------------------------------------------------------------- captions
def _phrase(attr: str, value: str) -> str:
    return _PHRASE[attr].format(value)


def attribute_caption(attrs: dict, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A caption naming a random subset (1–4) of the image's attributes, and which ones."""
    k = int(rng.integers(1, 5))
    keys = [str(a) for a in rng.choice(syn.ATTRIBUTES, size=k, replace=False)]
    parts = []
    for a in keys:
        if a == "breast_color" and "breast_pattern" in keys:  # one phrase: "a streaked yellow breast"
            continue
        if a == "breast_pattern" and "breast_color" in keys:
            parts.append(f"a {attrs['breast_pattern']} {attrs['breast_color']} breast")
        else:
            parts.append(_phrase(a, attrs[a]))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return str(rng.choice(_OPENERS)).format(text), keys


def caption_vocabulary() -> set[str]:
    """Every word the pretraining captions can contain."""
    words = set()
    for o in _OPENERS:
        words |= set(o.replace("{}", " ").replace(".", " ").split())
    for a, vals in syn.ATTRIBUTE_VALUES.items():
        for v in vals:
            words |= set(_phrase(a, v).split())
    return words | {"and"}


def attribute_prompts(attr: str) -> list[str]:
    """Zero-shot prompts for one attribute, one per value (``ATTRIBUTE_VALUES[attr]`` order)."""
    return [f"a bird with {_phrase(attr, v)}." for v in syn.ATTRIBUTE_VALUES[attr]]


# ---------------------------------------------------------------- training
def _encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on tokens cut after the longest caption's EOT.

    Identical output (the text tower is causal and pools at EOT) for a fraction of the cost:
    captions here are ~15 tokens of a 77-token context.
    """
    L = int(tokens.argmax(-1).max()) + 1
    tokens = tokens[:, :L]
    x = model.token_embedding(tokens) + model.positional_embedding[:L]
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(-1)]
    return x @ model.text_projection


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over ``N`` images and ``M`` captions, ``pos[i, j]`` marking caption ``j`` true of image ``i``.

    Each image's target spreads evenly over its true captions and each caption's over the images it
    is true of; every row and column needs at least one positive. With ``pos = eye`` this is
    exactly the CLIP loss.
    """
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    t = pos.float()
    return 0.5 * (
        -(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        - (t.T / t.sum(0)[:, None] * logits.T.log_softmax(1)).sum(1).mean()
    )


def pretrain_images(config: dict) -> tuple[torch.Tensor, list[dict]]:
    """The pretraining birds: uint8 images (cached on disk) and their attributes."""
    key = hash_key("pretrain-images", syn.GENERATOR_VERSION, config["n_images"], config["data_seed"], config["size"])
    cache = cached_tensors("synthetic-pretrain", key, lambda: _render(config))
    # attributes are cheap to redraw exactly (same rng stream) without re-rendering
    codes = cache["attributes"].numpy()
    attrs = [{a: syn.ATTRIBUTE_VALUES[a][int(c)] for a, c in zip(syn.ATTRIBUTES, row)} for row in codes]
    return cache["images"], attrs


def _render(config: dict) -> dict[str, torch.Tensor]:
    images, attrs = syn.random_birds(config["n_images"], config["data_seed"], config["size"])
    codes = [[syn.ATTRIBUTE_VALUES[a].index(r[a]) for a in syn.ATTRIBUTES] for r in attrs]
    return {"images": torch.from_numpy(images), "attributes": torch.tensor(codes, dtype=torch.uint8)}


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Light augmentation on a uint8 batch: random shift (reflect pad + crop) and horizontal flip."""
    n, _, h, w = x.shape
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = xp[..., dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x.round().clamp(0, 255).to(torch.uint8)


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


def train(config: dict | None = None, progress: bool = False, log=None, threads: int | None = None) -> tuple[dict, dict]:
    """Train the tiny CLIP from random init; return ``(state_dict, info)`` (CPU tensors).

    ``threads``: torch CPU threads while training (default :func:`default_threads`); not part of
    the cache key, the result does not depend on it beyond float rounding.
    """
    from open_clip.transformer import PatchDropout
    from tqdm.auto import tqdm

    config = pretrain_config(**(config or {}))
    threads = threads or default_threads()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        images, attrs = pretrain_images(config)
        t_data = time.time() - t0
        torch.manual_seed(config["seed"])
        model, _, tokenizer = load_clip("tiny", pretrained=None, device="cpu")
        model.train()
        model.visual.patch_dropout = PatchDropout(config["patch_dropout"])  # active in train mode only
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                                 {"params": other, "weight_decay": 0.0}], lr=config["lr"], betas=(0.9, 0.98), eps=1e-6)
        steps, warm = config["steps"], config["warmup"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
        rng = np.random.default_rng([config["seed"], 505])
        gen = torch.Generator().manual_seed(config["seed"])
        codes = np.array([[syn.ATTRIBUTE_VALUES[a].index(r[a]) for a in syn.ATTRIBUTES] for r in attrs])
        bs, losses = config["batch_size"], []
        t1, c1 = time.time(), time.process_time()
        for step in tqdm(range(steps), disable=not progress, desc="pretrain tiny CLIP"):
            idx = rng.choice(len(images), size=bs, replace=False)
            # Several captions per image: text is cheap next to the image tower, and each adds signal.
            owner = np.repeat(np.arange(bs), config["captions_per_image"])
            caps = [attribute_caption(attrs[idx[o]], rng) for o in owner]
            # pos[i, j]: every attribute caption j names holds for image i
            pos = np.zeros((bs, len(caps)), bool)
            for j, (_, keys) in enumerate(caps):
                cols = [syn.ATTRIBUTES.index(k) for k in keys]
                pos[:, j] = (codes[idx][:, cols] == codes[idx[owner[j]], cols]).all(1)
            x = normalize_images(_augment(images[idx], gen), model)
            tok = tokenizer([c for c, _ in caps])
            loss = multi_positive_clip_loss(model.encode_image(x), _encode_text(model, tok),
                                            model.logit_scale.exp(), torch.from_numpy(pos))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            losses.append(loss.item())
            if log is not None and (step % 25 == 0 or step == steps - 1):
                log({"step": step, "loss": losses[-1], "lr": float(sched.get_last_lr()[0])})
        info = {
            "config": config,
            "data_seconds": round(t_data, 2),
            "train_seconds": round(time.time() - t1, 2),
            # CPU seconds of all threads: train_seconds on an idle machine is about this / threads
            "train_cpu_seconds": round(time.process_time() - c1, 2),
            "threads": threads,
            "loss_first": round(float(np.mean(losses[:20])), 4),
            "loss_last": round(float(np.mean(losses[-20:])), 4),
        }
        model.visual.patch_dropout = torch.nn.Identity()
        model.eval()
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, info
    finally:
        torch.set_num_threads(saved_threads)


# ---------------------------------------------------------------- cached checkpoint
def checkpoint_path(**overrides) -> Path:
    config = pretrain_config(**overrides)
    return cache_root() / "pretrained" / f"{ARCH}-synthetic-{checkpoint_key(config)}.safetensors"


def synthetic_checkpoint(progress: bool = False, **overrides) -> Path:
    """Path of the pretrained tiny CLIP; trains it first (once, under a file lock) if not cached.

    ``load_clip("tiny", pretrained="synthetic")`` calls this. Training info (times, losses)
    is written next to it as ``<name>.json``.
    """
    from filelock import FileLock
    from safetensors.torch import save

    config = pretrain_config(**overrides)
    path = checkpoint_path(**overrides)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # a notebook and pytest may ask at the same time
        if path.exists():  # the other process trained it while we waited
            return path
        state, info = train(config, progress=progress)
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(info, indent=2) + "\n").encode())
        atomic_write_bytes(path, save(state, metadata={"arch": ARCH, "pretrain": json.dumps(config)}))
    return path


def checkpoint_info(**overrides) -> dict:
    """Training info of the cached checkpoint (``{}`` if it was not trained yet)."""
    p = checkpoint_path(**overrides).with_suffix(".json")
    return json.loads(p.read_text()) if p.exists() else {}


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pretrained(bundle=None, dataset=None, n_heldout: int = 600, heldout_seed: int = 2_000_003,
                        split: str = "test", device: str = "cpu") -> dict:
    """Zero-shot figures of a CLIP on the synthetic benchmark (the ``pretrain`` metrics section).

    - ``attributes``: per attribute, top-1 of "which <value>" among that attribute's values on
      ``n_heldout`` fresh random birds (its own seed: neither pretraining nor demo images), with
      chance = 1 / number of values.
    - ``dataset_attributes``: the same on ``dataset``'s ``split`` images (values per the table).
    - ``species``: top-1 of species-name prompts on ``dataset``'s ``split``, chance 1 / classes.
    """
    from .data import load_dataset
    from .data.images import image_cache

    if bundle is None:
        bundle = load_clip("tiny", pretrained="synthetic", device=device)
    model, _, tok = bundle
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size)
    images, attrs = syn.random_birds(n_heldout, heldout_seed, size)
    feats = encode_images(model, torch.from_numpy(images))
    out = {"model": bundle.model_id, "attributes": _attribute_scores(model, tok, feats, attrs)}
    out["attribute_mean_top1"] = float(np.mean([v["top1"] for v in out["attributes"].values()]))
    out["attribute_mean_chance"] = float(np.mean([v["chance"] for v in out["attributes"].values()]))
    if dataset is None:
        dataset = load_dataset("synthetic")
    ds = dataset.split(split)
    f = encode_images(model, image_cache(ds.paths(), size))
    rows = ds.table.to_dict("records")
    out["dataset_attributes"] = _attribute_scores(model, tok, f, rows)
    txt = encode_texts(model, tok, [f"a photo of a {c}, a type of bird." for c in ds.classnames])
    pred = (f @ txt.T).argmax(1).numpy()
    out["species"] = {"top1": float((pred == ds.labels).mean()), "chance": 1.0 / ds.num_classes, "n": len(ds),
                      "prompt": "a photo of a {}, a type of bird.", "split": split}
    return out


def _attribute_scores(model, tok, feats: torch.Tensor, attrs: list[dict]) -> dict:
    res = {}
    for a in syn.ATTRIBUTES:
        values = syn.ATTRIBUTE_VALUES[a]
        txt = encode_texts(model, tok, attribute_prompts(a))
        pred = (feats @ txt.T).argmax(1).numpy()
        truth = np.array([values.index(r[a]) for r in attrs])
        counts = np.bincount(truth, minlength=len(values))
        res[a] = {"top1": float((pred == truth).mean()), "chance": 1.0 / len(values),
                  "majority": float(counts.max() / counts.sum()), "n": len(truth)}
    return res


def plot_zero_shot(figures: dict):
    """Bar chart of :func:`evaluate_pretrained` figures: top-1 per attribute and species, with chance."""
    import matplotlib.pyplot as plt

    names = list(figures["attributes"]) + ["species name"]
    top1 = [figures["attributes"][a]["top1"] for a in figures["attributes"]] + [figures["species"]["top1"]]
    chance = [figures["attributes"][a]["chance"] for a in figures["attributes"]] + [figures["species"]["chance"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(names))
    ax.bar(x, top1, color=["#377eb8"] * (len(names) - 1) + ["#e41a1c"], label="zero-shot top-1")
    ax.scatter(x, chance, marker="_", s=600, color="black", label="chance", zorder=3)
    ax.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.set_title("pretrained tiny CLIP: attribute retrieval (held-out birds) vs species names", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
