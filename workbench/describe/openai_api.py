"""Backend for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server).

Standard library only (http.client, kept-alive connections through the environment's proxy: see
:mod:`.transport`). The API key is read from the environment variable *named* in the config and lives
only in request headers, never in records, caches or error messages. Concurrency is bounded by the
runner's thread pool (``max_concurrency``). Transient failures (408, 409, 425, 429, any 5xx, timeouts,
dropped connections, malformed JSON) are retried with exponential backoff and jitter, waiting at least
what a ``retry-after-ms`` or ``Retry-After`` header asks for.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.parse
import weakref
from collections import Counter
from email.utils import parsedate_to_datetime

from .backend import BackendError, ChatBackend, ChatRequest
from .transport import ConnectionPool

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx: the server's trouble, not the request's
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def retryable(status: int) -> bool:
    return status in RETRY_STATUS or 500 <= status <= 599


def wait_asked(headers) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms`` (OpenAI's, more precise) or ``Retry-After``."""
    try:
        ms = float(headers.get("retry-after-ms") or "nan")
    except ValueError:
        ms = float("nan")
    if ms == ms:  # not NaN
        return max(0.0, ms / 1000)
    return parse_retry_after(headers.get("Retry-After"))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class _Retry(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.retry_after = kind, retry_after


class OpenAIBackend(ChatBackend):
    """Chat completions over HTTP.

    ``api_base``: e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (vLLM).
    ``api_key_env``: name of the environment variable holding the key (None: send no key; an unset
    variable is an error unless the endpoint is on this machine). ``base_delay``/``max_delay``:
    backoff ``base_delay * 2**retry`` (jittered), capped. ``max_retry_after``: cap on honoured waits.
    ``send_seed``: pass each request's seed (OpenAI, vLLM and llama.cpp accept it).
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        api_base: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 200,
        timeout: float = 60.0,
        max_retries: int = 6,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        max_retry_after: float = 300.0,
        send_seed: bool = True,
        extra_body: dict | None = None,
        sleep=time.sleep,
    ):
        if not model:
            raise ValueError("the openai backend needs a model name (e.g. model='gpt-4o-mini' or the name a vLLM server serves)")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0 and timeout > 0")
        url = urllib.parse.urlparse(api_base)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"api_base must be an http(s) URL such as http://localhost:8000/v1, got {api_base!r}")
        self.model = model
        self.api_base = api_base.rstrip("/")
        self.url = self.api_base + "/chat/completions"
        self.api_key_env = api_key_env
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env) or None
            if self._key is None and url.hostname not in _LOCAL_HOSTS:
                raise ValueError(
                    f"environment variable {api_key_env} is not set: export the API key for {url.netloc} "
                    "under that name (or set api_key_env to the variable that holds it)"
                )
        self.max_concurrency = int(max_concurrency)
        self.temperature, self.top_p, self.max_tokens = float(temperature), float(top_p), int(max_tokens)
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.base_delay, self.max_delay, self.max_retry_after = float(base_delay), float(max_delay), float(max_retry_after)
        self.send_seed = send_seed
        self.extra_body = dict(extra_body or {})
        self.sleep = sleep
        self._lock = threading.Lock()
        self._stats = Counter()
        self._errors = Counter()
        self._pool = ConnectionPool(self.url, self.timeout, size=self.max_concurrency)
        weakref.finalize(self, self._pool.close)  # idle kept-alive sockets close with the backend

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.model!r}, api_base={self.api_base!r}, api_key_env={self.api_key_env!r})"

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, **self.extra_body}

    def identity(self) -> dict:
        return {"backend": self.name, "model": self.model, "api_base": self.api_base}

    def stats(self) -> dict:
        """HTTP attempts: ``requests == successes + retries + failures`` always holds."""
        with self._lock:
            return {**{k: self._stats[k] for k in ("requests", "successes", "retries", "failures")},
                    "prompt_tokens": self._stats["prompt_tokens"], "completion_tokens": self._stats["completion_tokens"],
                    "errors": dict(self._errors)}

    def _count(self, **kv) -> None:
        with self._lock:
            self._stats.update(kv)

    def complete(self, requests: list[ChatRequest]) -> list[str | BackendError]:
        return [self._one(r) for r in requests]

    def _body(self, req: ChatRequest) -> bytes:
        body = {"model": self.model, "messages": req.messages, **self.sampling()}
        seed = req.params.get("seed")
        if self.send_seed and seed is not None:
            body["seed"] = int(seed)
        return json.dumps(body).encode()

    def _one(self, req: ChatRequest) -> str | BackendError:
        data = self._body(req)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        for attempt in range(self.max_retries + 1):
            self._count(requests=1)
            try:
                text, usage = self._post(data, headers)
            except _Retry as e:
                with self._lock:
                    self._errors[e.kind] += 1
                if attempt == self.max_retries:
                    self._count(failures=1)
                    return BackendError(f"{self.url}: gave up after {attempt + 1} attempts; last error: {e}")
                self._count(retries=1)
                self.sleep(self._delay(attempt, e.retry_after))
                continue
            except BackendError as e:
                self._count(failures=1)
                with self._lock:
                    self._errors["fatal"] += 1
                return e
            self._count(successes=1, prompt_tokens=usage.get("prompt_tokens", 0) or 0,
                        completion_tokens=usage.get("completion_tokens", 0) or 0)
            return text
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after))
        return backoff

    def _post(self, data: bytes, headers: dict) -> tuple[str, dict]:
        try:
            status, reply_headers, raw = self._pool.request("POST", data, headers)
        except (TimeoutError, socket.timeout) as e:
            raise _Retry("timeout", f"timed out after {self.timeout} s") from e
        except (http.client.HTTPException, OSError) as e:  # refused, reset, DNS, TLS, proxy tunnel
            raise _Retry("connection", f"connection error: {type(e).__name__}: {e}") from e
        if not 200 <= status < 300:
            detail = _error_detail(raw, reply_headers)
            if retryable(status):
                raise _Retry(str(status), f"HTTP {status}: {detail}", wait_asked(reply_headers))
            raise BackendError(f"{self.url}: HTTP {status}: {detail}", fatal=True)
        try:
            obj = json.loads(raw)
            text = obj["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retry("malformed", f"malformed response ({type(e).__name__}): {raw[:120]!r}") from None
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        return text, usage


def _error_detail(raw: bytes, headers) -> str:
    body = raw[:300].decode("utf-8", "replace")
    try:
        msg = json.loads(body)["error"]["message"]
    except Exception:  # noqa: BLE001 - the body is only decoration for the message
        msg = body.strip() or headers.get("Location") or "(no body)"
    return str(msg)[:300]
