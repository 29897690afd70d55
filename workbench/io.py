"""Small file helpers: atomic writes, JSON and JSONL, content hashes, the cache root."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator


def hash_key(*parts) -> str:
    """Stable hex digest of JSON-able parts (model id, preprocessing, file fingerprints, ...)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def cache_root() -> Path:
    """Root for large artifacts (image/feature caches, pretrained tiny models).

    ``WORKBENCH_CACHE`` overrides the default ``~/.cache/workbench``.
    """
    root = Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, uniquely named file next to ``name``, created as ``open()`` would: mode 0666 less the umask
    (``mkstemp`` makes 0600, which leaves reports unreadable to colleagues on a shared machine)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` when the block ends without error: readers see
    the old or the new file, never half. It streams to a temp file of its own in the same folder (two
    writers of one path never share it), then fsync and ``os.replace``; on error the temp file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


class CorruptFileError(ValueError):
    """A file that is there but cannot be read back (truncated by a crash, corrupt, not what it should be);
    the message names the file, what is wrong and, where the reader knows it, what rewrites it."""

    def __init__(self, path: str | Path, what: str, hint: str | None = None):
        self.path = Path(path)
        super().__init__(f"{path}: {what}" + (f"; {hint}" if hint else ""))


def _read_text(path: Path, hint: str | None) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(path, f"not UTF-8 text (bad byte at offset {e.start}): corrupt", hint) from e


def read_json(path: str | Path, hint: str | None = None) -> Any:
    """The JSON value in ``path``; an unreadable file raises :class:`CorruptFileError` naming it, the line,
    and ``hint`` (e.g. which stage rewrites it)."""
    path = Path(path)
    text = _read_text(path, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if not text.strip():
            what = "empty file (cut off while it was written?)"
        elif e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):  # the text ran out
            what = f"truncated: the JSON ends early at line {e.lineno} ({e.msg})"
        else:
            what = f"not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})"
        raise CorruptFileError(path, what, hint) from e


def set_aside(path: str | Path, why: str) -> Path | None:
    """Rename a broken ``path`` to ``<name>.broken-<timestamp>`` next to it (kept for a look, out of the way of
    whatever reads ``path`` next), warning with both paths; returns the new path (None when another reader
    moved it first)."""
    path = Path(path)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.broken-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.broken-{stamp}-{n}")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another reader moved it first
        return None
    warnings.warn(f"{why}; moved it aside to {target} and went on without it", stacklevel=3)
    return target


def _json_default(o: Any) -> Any:
    # numpy / torch scalars and paths show up in metrics; make them plain JSON.
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def repair_jsonl(path: str | Path) -> int:
    """Drop a partial last line left by a killed writer, so an append starts on a fresh line instead of
    gluing its first record onto the fragment (a line no reader can parse, mid-file). Returns the bytes removed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        # scan back for the last newline
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = pos - step + i + 1
                break
            pos -= step
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


def append_jsonl(path: str | Path, records: dict | Iterable[dict]) -> None:
    """Append records as they arrive (one flush + fsync per call) so nothing is lost on a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(records, dict):
        records = [records]
    repair_jsonl(path)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, hint: str | None = None) -> list[dict]:
    return list(iter_jsonl(path, hint))


def iter_jsonl(path: str | Path, hint: str | None = None) -> Iterator[dict]:
    """Yield records; a truncated last line (a killed writer) is skipped, any other bad line raises
    :class:`CorruptFileError` naming the file and line (and ``hint``)."""
    path = Path(path)
    if not path.exists():
        return
    lines = _read_text(path, hint).splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                return
            raise CorruptFileError(path, f"line {i + 1} of {len(lines)} is not valid JSON ({e})", hint) from e


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
    atomic_write_text(path, text)
