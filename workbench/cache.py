"""Content-keyed on-disk cache for tensors (image caches, features), and the one way tensors are written:
safetensors files streamed one tensor at a time."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .io import CorruptFileError, atomic_writer, cache_root

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
CHUNK_BYTES = 64 << 20  # the most of a tensor held in host memory at once while it is written


def _to_host(part: torch.Tensor) -> torch.Tensor:
    """A CPU tensor is written from its own memory; a device tensor is copied piece by piece."""
    return part if part.device.type == "cpu" else part.cpu()


def _write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # little-endian bytes, as safetensors stores
    for start in range(0, flat.numel(), CHUNK_BYTES):
        f.write(_to_host(flat[start : start + CHUNK_BYTES]).numpy().data)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (on any device) as a safetensors file, atomically, one tensor at a time.

    The header needs only shapes and dtypes, so each tensor's bytes follow it straight from the tensor
    (device tensors in pieces of ``CHUNK_BYTES``): no second copy of the whole dict is ever built, unlike
    ``safetensors.torch.save_file``, which turns every tensor into bytes first."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: cannot write dtype {t.dtype} to safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_writer(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            _write_tensor(f, t)


def _unreadable(path, e: Exception, hint: str | None) -> CorruptFileError:
    return CorruptFileError(path, f"not a complete safetensors file, truncated or corrupt ({e})", hint)


@contextmanager
def open_tensors(path: str | Path, hint: str | None = None) -> Iterator:
    """``safe_open(path)``; a truncated or corrupt file raises :class:`CorruptFileError` naming it (and ``hint``:
    what rewrites it)."""
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise _unreadable(path, e, hint) from e
    with f:
        yield f


def read_tensors(path: str | Path, hint: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or corrupt one raises :class:`CorruptFileError`."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _unreadable(path, e, hint) from e


def file_fingerprint(paths) -> str:
    """Digest of file contents' identity: path, size and mtime_ns (cheap; changes when a file does)."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cached_tensors(kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return ``compute()``'s dict of tensors, stored under ``<cache>/<kind>/<key>.safetensors``
    (streamed to a temp file of this writer's own, so concurrent runs or DDP ranks never mix). An entry that
    cannot be read (truncated, corrupt) is deleted and recomputed, with a warning."""
    path = cache_root() / kind / f"{key}.safetensors"
    if path.exists():
        try:
            return read_tensors(path)
        except CorruptFileError as e:
            warnings.warn(f"{e}; deleted the cache entry, recomputing it", stacklevel=2)
            path.unlink(missing_ok=True)
    out = compute()
    save_tensors(path, out)
    return out


# What each folder under the cache root holds; all of it can be recomputed (LLM responses, which
# cost money, live in run directories, never here).
KINDS = {
    "images": "decoded uint8 image caches (one per file set and size)",
    "features": "image and text embeddings (keyed by weights, files, preprocessing)",
    "image_checks": "verdicts of the bad-image check",
    "pretrained": "tiny CLIPs trained by earlier versions (the weights now ship in the package): nothing reads them",
    "synthetic": "generated synthetic datasets",
    "synthetic-pretrain": "rendered pretraining birds (workbench pretrain)",
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
