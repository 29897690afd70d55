"""One interface for description backends.

Two kinds:
- :class:`ChatBackend` answers chat requests (OpenAI-style message lists) one batch at a time; the
  runner in :mod:`workbench.describe.generate` plans requests, caches responses, validates and retries.
  Implementations: ``transformers`` (local causal LM), ``openai`` (any OpenAI-compatible endpoint).
- :class:`RecordBackend` produces description records directly, with no LLM: ``template`` (the
  synthetic benchmark), ``attributes`` (CUB-style attribute tables), ``import`` (GIST long_captions.json).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
    key: str  # request hash (cache key); identifies the paid call
    messages: list[dict]
    params: dict  # sampling parameters incl. "seed"
    meta: dict = field(default_factory=dict)  # class, prompt_id, slot id, attempt (not sent)


class BackendError(RuntimeError):
    """A request failed for good (retries exhausted or a non-retryable error)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal  # retrying later cannot help (bad key, unknown model, malformed request)


class ChatBackend:
    """Base class: ``complete(requests) -> list[str | BackendError]``, one entry per request."""

    name = "chat"
    model: str | None = None
    batch_size = 1  # requests per complete() call
    max_concurrency = 1  # complete() calls in flight at once (threads)

    def sampling(self) -> dict:
        """Sampling parameters recorded as provenance and hashed into request keys (no seed)."""
        return {}

    def identity(self) -> dict:
        """What, besides messages and sampling, makes a response differ (hashed into keys)."""
        return {"backend": self.name, "model": self.model}

    def complete(self, requests: list[ChatRequest]) -> list[str | BackendError]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}


class RecordBackend:
    """Base class: ``records(dataset, classnames, n_per_class, seed) -> list[dict]`` (descriptions.jsonl records)."""

    name = "records"
    model: str | None = None

    def records(self, dataset, classnames: list[str], n_per_class: int | None, seed: int) -> list[dict]:
        raise NotImplementedError


BACKENDS: dict[str, str] = {
    "openai": "workbench.describe.openai_api:OpenAIBackend",
    "transformers": "workbench.describe.hf_local:TransformersBackend",
    "template": "workbench.describe.tables:SyntheticTemplateBackend",
    "attributes": "workbench.describe.tables:AttributeTableBackend",
    "import": "workbench.describe.gist_io:LongCaptionsBackend",
}


def make_backend(backend: str | ChatBackend | RecordBackend, **options: Any) -> ChatBackend | RecordBackend:
    """A backend instance from a name in :data:`BACKENDS` (options go to its constructor), or ``backend`` itself."""
    if isinstance(backend, (ChatBackend, RecordBackend)):
        if options:
            raise ValueError(f"options {sorted(options)} given with a backend instance; configure the instance instead")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown description backend {backend!r}; known: {sorted(BACKENDS)}")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
