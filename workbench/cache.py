"""Content-keyed on-disk cache for tensors (image caches, features)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_write_bytes, cache_root


def file_fingerprint(paths) -> str:
    """Digest of file contents' identity: path, size and mtime_ns (cheap; changes when a file does)."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cached_tensors(kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return ``compute()``'s dict of tensors, stored under ``<cache>/<kind>/<key>.safetensors``."""
    path = cache_root() / kind / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in out.items()}, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink(missing_ok=True)
    return out


# What each folder under the cache root holds; all of it can be recomputed (LLM responses, which
# cost money, live in run directories, never here).
KINDS = {
    "images": "decoded uint8 image caches (one per file set and size)",
    "features": "image and text embeddings (keyed by weights, files, preprocessing)",
    "image_checks": "verdicts of the bad-image check",
    "pretrained": "the tiny CLIP pretrained on the synthetic benchmark (~2 CPU-minutes to redo)",
    "synthetic": "generated synthetic datasets",
    "synthetic-pretrain": "rendered pretraining birds",
    "datasets": "parsed dataset tables (e.g. CUB attributes)",
}


def cache_usage() -> list[dict]:
    """One row per folder under the cache root: ``{kind, files, bytes, what}``, largest first."""
    rows = []
    for d in sorted(p for p in cache_root().iterdir() if p.is_dir()):
        files = [f for f in d.rglob("*") if f.is_file()]
        rows.append({"kind": d.name, "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                     "what": KINDS.get(d.name, "")})
    return sorted(rows, key=lambda r: -r["bytes"])


def clear_cache(kinds: list[str]) -> int:
    """Delete the named cache folders (``["all"]``: every one); returns the bytes freed.
    Unknown names raise before anything is deleted."""
    present = {r["kind"]: r for r in cache_usage()}
    names = list(present) if kinds == ["all"] else list(dict.fromkeys(kinds))
    unknown = [k for k in names if k not in present and k not in KINDS]
    if unknown:
        raise ValueError(f"unknown cache kind(s) {unknown}; present under {cache_root()}: {sorted(present) or 'none'}")
    freed = 0
    for k in names:
        if k in present:
            freed += present[k]["bytes"]
            shutil.rmtree(cache_root() / k)
    return freed
