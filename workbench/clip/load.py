"""Loading CLIP models: open_clip names with pretrained tags, ``hf-hub:`` ids, local checkpoints,
and the weights the workbench provides for its own tiny architecture."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.pretrained import get_pretrained_cfg
from safetensors.torch import load_file

from .weights import load_into, package_weights

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

# Short names for the architectures the package registers (tests and the demo).
ALIASES = {"tiny": "wb-tiny"}


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


def auto_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


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
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if any(k.startswith("module.") for k in sd):  # saved from DDP
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _checkpoint_path(arch: str, pretrained: str | None) -> Path | None:
    """The local file ``pretrained`` names (a path), or None for open_clip tags."""
    if pretrained and (os.sep in pretrained or Path(pretrained).suffix in (".safetensors", ".pt", ".pth", ".bin")):
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
        return checkpoint
    _check_fetchable(arch, pretrained)
    return None


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
) -> CLIPBundle:
    """Load an open_clip model, its eval preprocess and tokenizer.

    ``name``: an open_clip architecture (``ViT-B-32``), ``tiny`` (the package's test model), or an
    ``hf-hub:org/repo`` id. ``pretrained``: an open_clip tag (``laion2b_s34b_b79k``), a tag the
    workbench ships weights for (``synthetic`` for ``tiny``: :mod:`workbench.clip.weights`), a local
    checkpoint path, or None (random init).
    Raises :class:`WeightsUnavailableError` within seconds when weights cannot be fetched.
    """
    arch = resolve_name(name)
    device = auto_device(device)
    if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {name!r}; e.g. {sorted(ALIASES)} or open_clip.list_models()")
    shipped = package_weights(arch, pretrained)  # the workbench's own (tiny/synthetic)
    checkpoint = shipped or _checkpoint_path(arch, pretrained)
    quiet = _QuietRandomInit() if checkpoint is not None or pretrained is None else None
    if quiet:  # open_clip warns "initialized randomly"; misleading when weights follow from a file
        logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None if checkpoint is not None else pretrained, precision=precision, device=device,
        )
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    if shipped is not None:
        load_into(model, shipped)
    elif checkpoint is not None:
        missing, unexpected = model.load_state_dict(load_state_dict(checkpoint), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {checkpoint} does not fit {name!r}: missing {missing[:5]}…, unexpected {unexpected[:5]}…"
            )
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    wid = f"{arch}|{pretrained}"
    if shipped is not None:  # by content: a fresh clone or an installed wheel has other paths and times
        wid += "|" + hashlib.sha256(shipped.read_bytes()).hexdigest()[:16]
    elif checkpoint is not None:
        st = checkpoint.stat()
        wid += f"|{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return CLIPBundle(model, preprocess, tokenizer, name, pretrained, wid)
