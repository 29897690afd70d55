"""Weights the workbench ships for its own architectures: the tiny CLIP pretrained on the synthetic
benchmark lives in the package (``clip/weights/``), rebuilt by ``workbench pretrain``.

The files are fp16 safetensors. The text tower's 49,408-row token table is most of the model, and
the pretraining captions use a few dozen tokens: a file may keep only the rows it trained
(``token_embedding.rows`` lists them); the others are restored at load with a fixed seeded draw of
open_clip's initialisation (normal, std 0.02), so a loaded model is the same on every machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

WEIGHTS_DIR = Path(__file__).parent / "weights"
# (architecture, tag) -> file in WEIGHTS_DIR
PACKAGE_WEIGHTS = {("wb-tiny", "synthetic"): "wb-tiny-synthetic.safetensors"}
ROWS = "token_embedding.rows"
_FILL_SEED = 0


class MissingPackageWeights(FileNotFoundError):
    """A provided tag whose file is not in the package (deleted, or a checkout without it)."""


def package_weights(arch: str, tag: str | None) -> Path | None:
    """The shipped file of ``(arch, tag)``, None when the pair is not one the workbench provides."""
    name = PACKAGE_WEIGHTS.get((arch, tag))
    if name is None:
        return None
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise MissingPackageWeights(
            f"the weights of {arch!r} with pretrained={tag!r} should ship with the package at {path} but are "
            "missing; rebuild them with `workbench pretrain` (see README), or pass a checkpoint path as pretrained"
        )
    return path


def metadata(path: str | Path) -> dict:
    """The file's metadata, JSON values decoded (recipe, versions, training figures)."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def is_trimmed(path: str | Path) -> bool:
    """Whether ``path`` is a workbench weights file with a trimmed token table (``workbench pretrain --out``)."""
    if Path(path).suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return ROWS in f.keys()
    except Exception:  # not a safetensors file after all: open_clip's loader says what is wrong with it
        return False


def trim_token_table(state: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """``state`` with only ``rows`` of the token table kept (and listed under ``token_embedding.rows``)."""
    rows = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.int64)
    out = dict(state)
    out["token_embedding.weight"] = state["token_embedding.weight"][rows].contiguous()
    out[ROWS] = rows
    return out


def load_into(model, path: str | Path) -> None:
    """Load a (possibly trimmed, fp16) workbench weights file into ``model`` (strict)."""
    sd = load_file(str(path))
    if ROWS in sd:
        table = model.token_embedding.weight
        g = torch.Generator().manual_seed(_FILL_SEED)
        full = torch.empty(table.shape).normal_(0, 0.02, generator=g)
        full[sd.pop(ROWS)] = sd["token_embedding.weight"].float()
        sd["token_embedding.weight"] = full
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
