"""CLIP loading (open_clip names, pretrained tags, hf-hub ids, local checkpoints) and batched encoding."""
from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

import open_clip

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

# Short names for the architectures the package registers (tests and the demo).
ALIASES = {"tiny": "wb-tiny"}

# Pretrained tags the workbench itself provides: (architecture, tag) -> "module:function" returning
# a local checkpoint path (the function may train and cache the weights on first use).
PROVIDED_WEIGHTS: dict[tuple[str, str], str] = {
    ("wb-tiny", "synthetic"): "workbench.pretrain:synthetic_checkpoint",
}
# Tag used when a stage's model is switched to an architecture by a global override.
DEFAULT_TAGS = {"wb-tiny": "synthetic"}

_HUB_HOST = ("huggingface.co", 443)


class _QuietRandomInit(logging.Filter):
    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be had offline."""


@dataclass
class CLIPBundle:
    """What :func:`load_clip` returns; unpacks as ``model, preprocess, tokenizer``."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    name: str
    pretrained: str | None
    model_id: str  # identifies architecture + weights, for cache keys

    def __iter__(self):
        return iter((self.model, self.preprocess, self.tokenizer))


def resolve_name(name: str) -> str:
    return ALIASES.get(name, name)


def auto_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the model hub within ``timeout`` s (DNS included)?"""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    result = []

    def probe():
        try:
            socket.create_connection(_HUB_HOST, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # getaddrinfo has no timeout of its own; don't wait on it
    return bool(result)


def _hub_file_cached(cfg: dict) -> bool:
    hf = cfg.get("hf_hub", "")
    if not hf:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    parts = hf.rstrip("/").split("/")
    repo_id = "/".join(parts[:2])
    names = [parts[2]] if len(parts) > 2 else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)


def _unavailable(name: str, pretrained: str | None, why: str) -> WeightsUnavailableError:
    what = f"{name!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    return WeightsUnavailableError(
        f"Cannot load weights for CLIP model {what}: {why}. "
        "Download the checkpoint on a machine with internet access and pass its local path, e.g. "
        f"load_clip({name!r}, pretrained='/path/to/open_clip_model.safetensors') "
        "(or --set pretrained=/path/... for `workbench run`). Checkpoints may be .safetensors "
        "or torch files holding a state dict."
    )


def _check_fetchable(name: str, pretrained: str | None) -> None:
    """Fail fast, before open_clip's network retries, when weights are neither cached nor reachable."""
    from open_clip.pretrained import get_pretrained_cfg

    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        cfg = {"hf_hub": repo + "/"}
    elif pretrained:
        cfg = get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for model {name!r}; known tags: {tags} "
                "(or pass a local checkpoint path)"
            )
    else:
        return
    if _hub_file_cached(cfg):
        return
    if not _hub_reachable():
        raise _unavailable(name, pretrained, "they are not in the local cache and the model hub cannot be reached")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint without unpickling arbitrary objects (safetensors, or torch weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if any(k.startswith("module.") for k in sd):  # saved from DDP
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
) -> CLIPBundle:
    """Load an open_clip model, its eval preprocess and tokenizer.

    ``name``: an open_clip architecture (``ViT-B-32``), ``tiny`` (the package's test model), or an
    ``hf-hub:org/repo`` id. ``pretrained``: an open_clip tag (``laion2b_s34b_b79k``), a tag the
    workbench provides (``synthetic`` for ``tiny``), a local checkpoint path, or None (random init).
    Raises :class:`WeightsUnavailableError` within seconds when weights cannot be fetched.
    """
    arch = resolve_name(name)
    device = auto_device(device)
    if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {name!r}; e.g. {sorted(ALIASES)} or open_clip.list_models()")
    checkpoint = None
    tag = pretrained
    if pretrained and (arch, pretrained) in PROVIDED_WEIGHTS:
        module, fn = PROVIDED_WEIGHTS[(arch, pretrained)].split(":")
        checkpoint = Path(getattr(importlib.import_module(module), fn)())
    elif pretrained and (os.sep in pretrained or Path(pretrained).suffix in (".safetensors", ".pt", ".pth", ".bin")):
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
    else:
        _check_fetchable(arch, pretrained)

    quiet = _QuietRandomInit() if checkpoint is not None or pretrained is None else None
    if quiet:  # open_clip warns "initialized randomly"; misleading when weights follow from a file
        logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=None if checkpoint is not None else pretrained,
            precision=precision,
            device=device,
        )
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(load_state_dict(checkpoint), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {checkpoint} does not fit {name!r}: missing {missing[:5]}…, unexpected {unexpected[:5]}…"
            )
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    wid = f"{arch}|{pretrained}"
    if checkpoint is not None:
        st = checkpoint.stat()
        wid += f"|{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return CLIPBundle(model, preprocess, tokenizer, name, tag, wid)


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def normalize_images(x: torch.Tensor, model, size: int | None = None) -> torch.Tensor:
    """uint8 ``N x 3 x H x W`` on any device -> float model input: resize short side, centre crop, normalise.

    Mirrors open_clip's eval transform (bicubic resize, centre crop, mean/std) on tensors, so a
    decoded uint8 cache feeds the model without PIL.
    """
    size = size or image_size(model)
    cfg = open_clip.get_model_preprocess_cfg(model)
    x = x.float().div_(255)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        t, l = (nh - size) // 2, (nw - size) // 2
        x = x[..., t : t + size, l : l + size]
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def default_batch_size(device: torch.device | str) -> int:
    """Inference batch that keeps each device busy: large on a GPU; on a CPU a small batch keeps the
    activations in cache (measured on the tiny ViT, 2 threads: ~950 images/s at 32-96, ~560 at 256)."""
    return 512 if torch.device(device).type == "cuda" else 64


@torch.no_grad()
def encode_images(
    model,
    images: torch.Tensor | Sequence[str | Path],
    batch_size: int | None = None,
    normalize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Image embeddings (float32, on CPU) for a uint8 ``N x 3 x H x W`` tensor or a list of files.

    ``batch_size``: None picks :func:`default_batch_size` for the model's device."""
    from tqdm.auto import tqdm

    if not isinstance(images, torch.Tensor):
        from .data.images import decode_images

        images = decode_images(images, image_size(model))
    device = _model_device(model)
    batch_size = batch_size or default_batch_size(device)
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encode images"):
        x = normalize_images(images[i : i + batch_size].to(device, non_blocking=True), model)
        with _autocast(device):
            f = model.encode_image(x)
        f = f.float()
        out.append(F.normalize(f, dim=-1) if normalize else f)  # stays on the device: no sync per batch
    if not out:
        return torch.empty(0, model.text_projection.shape[1] if hasattr(model, "text_projection") else 0)
    return torch.cat(out).cpu()


@torch.no_grad()
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 1024,
    normalize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Text embeddings (float32, on CPU) for a list of strings."""
    from tqdm.auto import tqdm

    device = _model_device(model)
    model.eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="encode texts"):
        tok = tokenizer(list(texts[i : i + batch_size])).to(device)
        with _autocast(device):
            f = model.encode_text(tok)
        f = f.float()
        out.append((F.normalize(f, dim=-1) if normalize else f).cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
