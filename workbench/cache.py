"""Content-keyed on-disk cache for tensors (image caches, features)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_write_bytes, cache_root, hash_key  # noqa: F401 (hash_key re-exported)


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
