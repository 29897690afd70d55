"""Loading CLIP models: open_clip names with pretrained tags, ``hf-hub:`` ids, ``local-dir:`` folders, local
checkpoints, and the weights the workbench provides for its own tiny architecture.

Weights load through open_clip's own loading (``create_model_and_transforms`` -> ``load_checkpoint``,
``weights_only=True``): position embeddings are resized, big_vision ``.npz`` files and third-party state
dicts converted as open_clip does; an ``.npz`` may also hold a plain state dict. A file that cannot be read
(truncated, corrupt) raises :class:`~workbench.io.CorruptFileError` naming it. Downloads go through huggingface_hub, which honours ``HF_ENDPOINT``
(a mirror), proxies (``HTTPS_PROXY``), ``HF_HUB_OFFLINE`` and its cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.convert import load_big_vision_weights
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.pretrained import get_pretrained_cfg

from ..cache import open_tensors
from ..io import CorruptFileError
from .device import auto_device
from .tiny import adapt
from .weights import is_trimmed, load_into, package_weights

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

# Short names for the architectures the package registers (tests and the demo).
ALIASES = {"tiny": "wb-tiny"}


_SCHEMAS = ("hf-hub:", "local-dir:")  # names whose config and weights come with them
_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth", ".bin")  # a `pretrained` with one of these is a local file
FORMATS = (".safetensors, .npz (a state dict saved with numpy, or a big_vision SigLIP export) or a torch file "
           "holding a state dict (loaded with weights_only=True)")
_REREAD = "copy or download it again, or rerun what wrote it"


class _QuietRandomInit(logging.Filter):
    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor reachable."""


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


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def _unavailable(name: str, pretrained: str | None, why: str) -> WeightsUnavailableError:
    what = f"{name!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    return WeightsUnavailableError(
        f"Cannot load weights for CLIP model {what}: {why}. "
        "Download the checkpoint on a machine with internet access and pass its local path, e.g. "
        f"load_clip({name!r}, pretrained='/path/to/open_clip_model.safetensors') "
        "(or --set pretrained=/path/... for `workbench run`; a folder holding open_clip_config.json and the "
        f"weights loads as name 'local-dir:/path'). Checkpoints may be {FORMATS}. "
        "A Hugging Face mirror is used when HF_ENDPOINT names it, a proxy when HTTPS_PROXY does."
    )


def _hub_files(name: str, pretrained: str | None) -> tuple[str, list[str], list[str]] | None:
    """Where open_clip will fetch ``name``/``pretrained`` from the hub: (repo id, files that must all be
    there, weights files of which one must be), or None when nothing comes from the hub."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):], [HF_CONFIG_NAME], [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if not pretrained or name.startswith("local-dir:"):
        return None
    cfg = get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for model {name!r}; known tags: {tags} "
            "(or pass a local checkpoint path)"
        )
    if not cfg.get("hf_hub"):
        return None  # a plain URL: open_clip downloads it with urllib, which fails at once offline
    repo, file = os.path.split(cfg["hf_hub"])  # "org/name/" or "org/name/file.bin", split as open_clip does
    file = file or HF_WEIGHTS_NAME
    stem, ext = os.path.splitext(file)
    # open_clip asks for a .safetensors twin first
    safe = [HF_SAFE_WEIGHTS_NAME] if file == HF_WEIGHTS_NAME else [stem + ".safetensors"] if ext in (".bin", ".pth") else []
    return repo, [], safe + [file]


def _cached(repo: str, file: str) -> bool:
    return isinstance(try_to_load_from_cache(repo, file), str)


def _check_fetchable(name: str, pretrained: str | None) -> None:
    """Fail within seconds, before open_clip's download retries (about 20 s per file), when the weights
    are neither cached nor reachable. One HEAD request through huggingface_hub's own client, so
    ``HF_ENDPOINT``, proxies and ``HF_HUB_OFFLINE`` mean what they mean to the download itself."""
    where = _hub_files(name, pretrained)
    if where is None:
        return
    repo, needed, one_of = where
    if all(_cached(repo, f) for f in needed) and any(_cached(repo, f) for f in one_of):
        return
    url = hf_hub_url(repo, (needed or one_of)[0])
    try:
        get_hf_file_metadata(url, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
    except OfflineModeIsEnabled:
        raise _unavailable(name, pretrained, "they are not in the local cache and HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError:
        return  # the hub answered (even 401/404): open_clip's loading reports what is wrong
    except Exception as e:  # noqa: BLE001 - connection, DNS, TLS, proxy, timeout: whatever the HTTP client raises
        raise _unavailable(
            name, pretrained,
            f"they are not in the local cache and the model hub cannot be reached at {url} ({type(e).__name__}: {e})",
        ) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, read by open_clip without unpickling arbitrary objects."""
    return open_clip.factory.load_state_dict(str(path), weights_only=True)


def _checkpoint_path(arch: str, pretrained: str | None) -> Path | None:
    """The local file ``pretrained`` names (a path), or None for open_clip tags."""
    if pretrained and (os.sep in pretrained or Path(pretrained).suffix in _SUFFIXES):
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
        return checkpoint
    _check_fetchable(arch, pretrained)
    return None


def _create(arch: str, name: str, pretrained: str | None, checkpoint: Path | None, precision: str, device):
    """open_clip's model and eval transform, its weights loaded by open_clip (``load_checkpoint`` for a
    local file); loading errors turned into ones that say what to do."""
    tag = None if checkpoint is not None or arch.startswith(_SCHEMAS) else pretrained
    bare = checkpoint is not None or (tag is None and not arch.startswith(_SCHEMAS))  # created without weights
    quiet = _QuietRandomInit() if bare else None
    if quiet:  # open_clip warns "initialized randomly": misleading when weights follow from a file
        logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=tag, load_weights=checkpoint is None, precision=precision, device=device,
            weights_only=True, require_pretrained=not bare,  # a failed download must not be a random init
        )
    except RuntimeError as e:
        if arch.startswith("local-dir:"):
            raise
        raise _unavailable(name, pretrained, str(e).strip().splitlines()[0][:400]) from e
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    adapt(arch, model)  # the workbench's own architectures (wb-tiny's conv stem), before any weights load
    if checkpoint is not None:
        _load_local(model, name, checkpoint)
    return model, preprocess


def _does_not_fit(checkpoint: Path, name: str, e: Exception) -> ValueError:
    lines = " ".join(str(e).strip().splitlines()[:3])[:600]
    return ValueError(f"checkpoint {checkpoint} does not fit {name!r}: {lines}")


def _load_local(model, name: str, checkpoint: Path) -> None:
    """Load a local checkpoint file into ``model`` (strict); an unreadable file raises
    :class:`~workbench.io.CorruptFileError` naming it, one of no format accepted says which are."""
    if checkpoint.suffix == ".npz":
        return _load_npz(model, name, checkpoint)
    if checkpoint.suffix == ".safetensors":
        with open_tensors(checkpoint, _REREAD):  # truncated or corrupt: say so (safetensors' error names no file)
            pass
    try:
        if is_trimmed(checkpoint):  # written by `workbench pretrain --out`
            load_into(model, checkpoint)
        else:
            open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    except pickle.UnpicklingError as e:  # not plain tensors (weights_only=True), or not a torch file at all
        raise ValueError(f"cannot load {checkpoint}: not a checkpoint of an accepted format ({FORMATS}): "
                         f"{str(e).strip().splitlines()[0][:300]}") from e
    except (OSError, EOFError) as e:  # torch.load of a cut-off file: "[Errno 22] Invalid argument"
        raise CorruptFileError(checkpoint, f"unreadable, truncated or corrupt ({type(e).__name__}: {e})", _REREAD) from e
    except (RuntimeError, ValueError) as e:
        if "PytorchStreamReader" in str(e):
            raise CorruptFileError(checkpoint, f"unreadable, truncated or corrupt ({str(e)[:200]})", _REREAD) from e
        raise _does_not_fit(checkpoint, name, e) from e


def _is_big_vision(keys: set[str]) -> bool:
    root = "params/" if "params/b" in keys else ""
    return {f"{root}b", f"{root}t"} <= keys and any(k.startswith((f"{root}img/", f"{root}txt/")) for k in keys)


def _load_npz(model, name: str, checkpoint: Path) -> None:
    """A numpy checkpoint: a big_vision SigLIP export (converted by open_clip, into its timm-based SigLIP
    models) or a plain state dict (``np.savez(path, **state_dict)``), loaded strictly as other local files."""
    try:
        z = np.load(checkpoint, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with z:
            big_vision = _is_big_vision(set(z.files))
            state = None if big_vision else {k.removeprefix("module."): torch.from_numpy(z[k]) for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CorruptFileError(checkpoint, f"not a readable .npz archive, truncated or corrupt ({e})", _REREAD) from e
    except ValueError as e:  # pickled objects (refused: allow_pickle=False), or not an archive
        raise ValueError(f"cannot load {checkpoint}: {str(e)[:200]}; accepted: {FORMATS}") from e
    if state is None:
        if not (hasattr(model.visual, "trunk") and hasattr(model, "text") and getattr(model, "logit_bias", None) is not None):
            raise ValueError(f"{checkpoint} is a big_vision export: it loads into open_clip's timm-based SigLIP "
                             f"models (e.g. ViT-B-16-SigLIP), not {name!r}")
        try:
            load_big_vision_weights(model, str(checkpoint))
        except (KeyError, RuntimeError, AssertionError) as e:  # a missing array; a shape that does not fit
            raise _does_not_fit(checkpoint, name, e) from e
        return
    own = model.state_dict()
    if not own.keys() & state.keys():
        raise ValueError(
            f"cannot load {checkpoint}: its arrays ({', '.join(sorted(state)[:3])}, ...) are neither {name!r}'s "
            f"parameters ({', '.join(list(own)[:3])}, ...) nor a big_vision export; accepted: {FORMATS}")
    for k in ("logit_scale", "logit_bias"):  # a scalar or a 1-element vector, as open_clip's loading allows
        if k in state and k in own and state[k].numel() == own[k].numel():
            state[k] = state[k].reshape(own[k].shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _does_not_fit(checkpoint, name, e) from e


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
) -> CLIPBundle:
    """Load an open_clip model, its eval preprocess and tokenizer.

    ``name``: an open_clip architecture (``ViT-B-32``), ``tiny`` (the package's test model), an
    ``hf-hub:org/repo`` id or a ``local-dir:/path`` folder in the hub layout. ``pretrained``: an open_clip
    tag (``laion2b_s34b_b79k``), a tag the workbench ships weights for (``synthetic`` for ``tiny``:
    :mod:`workbench.clip.weights`), a local
    checkpoint path (for ``hf-hub:``/``local-dir:`` too: loaded instead of their weights), or None (random
    init; ``hf-hub:``/``local-dir:`` bring their own weights).
    Raises :class:`WeightsUnavailableError` within seconds when weights are neither cached nor reachable.
    """
    arch = resolve_name(name)
    device = auto_device(device)
    if not arch.startswith(_SCHEMAS) and arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {name!r}; e.g. {sorted(ALIASES)} or open_clip.list_models()")
    shipped = package_weights(arch, pretrained)  # the workbench's own (tiny/synthetic), loaded below
    checkpoint = None if shipped is not None else _checkpoint_path(arch, pretrained)
    model, preprocess = _create(arch, name, None if shipped is not None else pretrained, checkpoint, precision, device)
    if shipped is not None:
        with open_tensors(shipped, "it ships with the package: reinstall it, or rebuild it with `workbench pretrain`"):
            pass
        load_into(model, shipped)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    wid = f"{arch}|{pretrained}"
    if shipped is not None:  # by content: a fresh clone or an installed wheel has other paths and times
        wid += "|" + hashlib.sha256(shipped.read_bytes()).hexdigest()[:16]
    elif checkpoint is not None:
        st = checkpoint.stat()
        wid += f"|{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return CLIPBundle(model, preprocess, tokenizer, name, pretrained, wid)
