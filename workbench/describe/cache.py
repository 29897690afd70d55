"""Resumable generation state: an append-only response cache keyed by request hash, and JSONL repair.

Every paid response is appended to the cache the moment it arrives (by the worker thread that got
it), before it is validated or turned into a description, so an interrupted run never pays for it
again. Files are JSONL written with :func:`workbench.io.append_jsonl` (flush + fsync per record).
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path

from ..io import append_jsonl, hash_key, iter_jsonl, repair_jsonl


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def request_key(*parts) -> str:
    """Hash identifying a paid request: backend identity, messages, sampling parameters, seed."""
    return hash_key("describe-request", *parts)


class ResponseCache:
    """Raw LLM responses keyed by request hash, in a JSONL file; thread-safe appends.

    Records: ``{"key", "time", "backend", "model", "messages", "params", "text", "meta"}``. Request
    headers (and so API keys) are never part of a record.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._texts: dict[str, str] = {}
        if self.path is not None:
            repair_jsonl(self.path)
            for r in iter_jsonl(self.path):
                self._texts[r["key"]] = r["text"]

    def __contains__(self, key: str) -> bool:
        return key in self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, key: str) -> str | None:
        return self._texts.get(key)

    def put(self, key: str, text: str, **fields) -> None:
        rec = {"key": key, "time": now(), **fields, "text": text}
        with self._lock:
            if self.path is not None:
                append_jsonl(self.path, rec)
            self._texts[key] = text
