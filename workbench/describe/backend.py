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


def backend_from_params(
    backend: str,
    *,
    llm: str | None = None,
    api_base: str = "https://api.openai.com/v1",
    api_key_env: str | None = "OPENAI_API_KEY",
    max_concurrency: int = 8,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 200,
    timeout_s: float = 60.0,
    max_retries: int = 6,
    batch_size: int = 8,
    deterministic: bool = False,
    device: str = "auto",
    long_captions: str | None = None,
    attributes_root: str | None = None,
) -> ChatBackend | RecordBackend:
    """A backend from the flat parameters of ``notebooks/01_describe.ipynb`` (each backend takes its own)."""
    if backend == "openai":
        return make_backend("openai", model=llm, api_base=api_base, api_key_env=api_key_env,
                            max_concurrency=max_concurrency, temperature=temperature, top_p=top_p,
                            max_tokens=max_tokens, timeout=timeout_s, max_retries=max_retries)
    if backend == "transformers":
        return make_backend("transformers", model=llm, device=device, batch_size=batch_size,
                            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            deterministic=deterministic)
    if backend == "import":
        return make_backend("import", path=long_captions)
    if backend == "attributes":
        return make_backend("attributes", root=attributes_root)
    return make_backend(backend)
