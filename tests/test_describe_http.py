"""OpenAI-compatible backend against a loopback chat-completions server that injects faults."""
from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from workbench.describe import BackendError, generate_descriptions
from workbench.describe.openai_api import OpenAIBackend, parse_retry_after
from workbench.io import read_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-4f9c2b7e1d0a-SECRET"
KEY_ENV = "WB_DESCRIBE_TEST_KEY"
CLASSES = ["Red Crowned Finch", "Blue Winged Warbler", "Grey Tailed Tern", "Yellow Billed Heron"]
CLIENT_TIMEOUT = 0.3


class FakeLLM(ThreadingHTTPServer):
    """Chat-completions server. ``faults`` are applied to requests in arrival order:
    HTTP faults ("429", "500", "timeout", "malformed", "nochoices") and content faults served as
    successes ("refusal", "empty", "other", "dup"). After ``gate_after`` successes, further requests
    block until ``gate`` is set and then get no response (a run killed while they were in flight)."""

    daemon_threads = True

    def __init__(self, faults=(), gate_after=None, classes=CLASSES, keep_alive=False, drop_idle=False):
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler if keep_alive else _Handler)
        self.drop_idle = drop_idle  # close kept-alive connections after each answer, without saying so
        self.connections = 0  # TCP connections accepted
        self.seen: list[tuple[str, str]] = []  # (Host header, request target) of every request
        self.faults, self.classes = list(faults), list(classes)
        self.lock = threading.Lock()
        self.requests = 0
        self.bodies: list[str] = []  # fingerprint of every request received
        self.ok: list[str] = []  # fingerprints of requests answered with a 200 + valid JSON
        self.texts: dict[str, list[str]] = {}  # class -> texts served
        self.in_flight = self.max_in_flight = 0
        self.gate_after, self.gate, self.blocked = gate_after, threading.Event(), 0
        self.auth_failures = 0
        self.admitted = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


_HTTP_FAULTS = {"429", "429ms", "500", "529", "timeout", "malformed", "nochoices"}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _send(self, code, body: bytes, headers=None):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = self.close_connection or self.server.drop_idle

    def do_POST(self):
        srv: FakeLLM = self.server
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        fp = hashlib.sha256(raw).hexdigest()
        body = json.loads(raw)
        user = body["messages"][-1]["content"]
        cls = next((c for c in srv.classes if c in user), user)
        with srv.lock:
            srv.requests += 1
            srv.bodies.append(fp)
            srv.seen.append((self.headers.get("Host"), self.path))
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            fault = None
            if srv.faults:
                fault = srv.faults[0]
                if fault == "dup" and not srv.texts.get(cls):
                    fault = None  # nothing to duplicate for this prompt yet; keep the fault for later
                else:
                    srv.faults.pop(0)
            gated = False
            if fault not in _HTTP_FAULTS and srv.gate_after is not None:
                # admit exactly gate_after answers, counted on arrival (concurrent requests race)
                gated = srv.admitted >= srv.gate_after
                srv.admitted += not gated
        try:
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                srv.auth_failures += 1
                return self._send(401, b'{"error": {"message": "invalid api key"}}')
            if gated:
                with srv.lock:
                    srv.blocked += 1
                srv.gate.wait(30)
                self.close_connection = True
                return  # no response at all: the client that sent it is gone
            if fault == "429":
                return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "1"})
            if fault == "500":
                return self._send(500, b'{"error": {"message": "internal error"}}')
            if fault == "529":  # overloaded: a 5xx outside 500-504
                return self._send(529, b'{"error": {"message": "overloaded"}}')
            if fault == "429ms":  # OpenAI's millisecond header, without Retry-After
                return self._send(429, b'{"error": {"message": "rate limited"}}', {"retry-after-ms": "2500"})
            if fault == "timeout":
                with srv.lock:  # the client gives up on this one at its timeout and sends the retry while this
                    srv.in_flight -= 1  # thread still sleeps: not in flight from the client's side
                    fault = "abandoned"
                time.sleep(CLIENT_TIMEOUT * 2)
                try:
                    self._send(200, b'{"choices": []}')
                except OSError:  # the client gave up already
                    pass
                return
            if fault == "malformed":
                return self._send(200, b'{"choices": [{"message": {"content": "trunc')
            if fault == "nochoices":
                return self._send(200, b'{"object": "chat.completion"}')
            with srv.lock:
                n = len(srv.ok)
                if fault == "refusal":
                    text = "I'm sorry, but I can't help with that request."
                elif fault == "empty":
                    text = "  "
                elif fault == "other":
                    other = next(c for c in srv.classes if c not in user)
                    text = f"The {other} has a bright crown and long dark wings."
                elif fault == "dup":
                    text = srv.texts[cls][-1]  # an answer already given for this class
                else:
                    text = f"Answer {n} seed {body.get('seed')}: it has a crown and wings as asked in: {user[:60]}"
                    srv.texts.setdefault(cls, []).append(text)
            out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
            with srv.lock:  # counted before sending: the client may finish before this thread resumes
                srv.ok.append(fp)
            self._send(200, json.dumps(out).encode())
        finally:
            if fault != "abandoned":
                with srv.lock:
                    srv.in_flight -= 1


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"  # the connection stays open between requests


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        srv = FakeLLM(**kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.gate.set()
        srv.shutdown()
        srv.server_close()


def _assert_no_key(run_dir: Path):
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert KEY.encode() not in p.read_bytes(), f"API key leaked into {p}"


def _check_complete(records, n):
    counts = Counter(r["class"] for r in records)
    assert counts == {c: n for c in CLASSES}
    assert len({r["id"] for r in records}) == len(records)
    assert len({(r["class"], r["text"]) for r in records}) == len(records)


def test_faults_retries_and_validation(server_factory, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    faults = ["429", "500", "timeout", "malformed", "nochoices", "refusal", "empty", "other", "dup"]
    srv = server_factory(faults=faults)
    sleeps = []
    be = OpenAIBackend(model="fake-llm", api_base=srv.url, api_key_env=KEY_ENV, max_concurrency=2,
                       timeout=CLIENT_TIMEOUT, max_retries=4, base_delay=0.001, sleep=sleeps.append)
    run = tmp_path / "run"
    res = generate_descriptions(CLASSES, be, domain="birds", n_per_class=3, run_dir=run, progress=False)

    _check_complete(res.records, 3)
    on_disk = read_jsonl(run / "descriptions.jsonl")
    _check_complete(on_disk, 3)
    assert {r["prompt_id"] for r in on_disk} == {"birds-v1/male", "birds-v1/female", "birds-v1/juvenile"}
    for r in on_disk:
        assert r["backend"] == "openai" and r["model"] == "fake-llm" and r["params"]["temperature"] == 0.7
        assert "seed" in r["params"] and r["time"]

    st = be.stats()
    assert srv.requests == st["requests"] == st["successes"] + st["retries"]
    assert st["failures"] == 0 and srv.auth_failures == 0
    assert st["errors"] == {"429": 1, "500": 1, "timeout": 1, "malformed": 2}
    assert st["successes"] == len(srv.ok) == 12 + 4  # 4 successes were rejected by validation
    assert srv.max_in_flight <= 2
    # Retry-After: 1 honoured (the wait asked for is at least 1 s); the others are tiny backoffs
    assert len(sleeps) == 5 and max(sleeps) >= 1.0 and sorted(sleeps)[-2] < 0.1

    m = read_json(run / "metrics.json")["describe"]
    assert m["rejected"] == {"empty": 1, "refusal": 1, "other_class": 1, "duplicate": 1}
    assert m["retried"] == m["rejected"] and sum(m["dropped"].values()) == 0
    assert m["descriptions"] == 12 and m["missing_classes"] == []
    assert m["session"]["requests"] == srv.requests
    rej = read_jsonl(run / "describe_rejected.jsonl")
    assert sorted(r["reason"] for r in rej) == ["duplicate", "empty", "other_class", "refusal"]
    assert len(read_jsonl(run / "describe_responses.jsonl")) == st["successes"]
    _assert_no_key(run)

    # a second run with the same configuration sends nothing
    before = srv.requests
    res2 = generate_descriptions(CLASSES, be, domain="birds", n_per_class=3, run_dir=run, progress=False)
    assert srv.requests == before and len(res2.records) == 12
    # asking for more descriptions only sends the new ones
    res3 = generate_descriptions(CLASSES, be, domain="birds", n_per_class=4, run_dir=run, progress=False)
    assert srv.requests == before + 4
    assert Counter(r["class"] for r in res3.records) == {c: 4 for c in CLASSES}
    # another configuration replaces the file's records (moved aside, never mixed in) ...
    be_hot = OpenAIBackend(model="fake-llm", api_base=srv.url, api_key_env=KEY_ENV, temperature=1.0)
    with pytest.warns(UserWarning, match="moved 16 descriptions of another configuration"):
        generate_descriptions(CLASSES, be_hot, domain="birds", n_per_class=2, run_dir=run, progress=False)
    assert srv.requests == before + 4 + 8
    assert {r["params"]["temperature"] for r in read_jsonl(run / "descriptions.jsonl")} == {1.0}
    assert len(read_jsonl(run / "describe_replaced.jsonl")) == 16
    # ... and switching back costs nothing: every answer is still in the response cache
    with pytest.warns(UserWarning, match="moved 8 descriptions"):
        res4 = generate_descriptions(CLASSES, be, domain="birds", n_per_class=4, run_dir=run, progress=False)
    assert srv.requests == before + 4 + 8
    assert [r["text"] for r in res4.records] == [r["text"] for r in res3.records]


_CHILD = """
import sys
from workbench.describe import generate_descriptions
generate_descriptions({classes!r}, "openai", model="fake-llm", api_base={url!r}, api_key_env={env!r},
                      max_concurrency=2, timeout=5, base_delay=0.001, domain="birds", n_per_class=3,
                      run_dir={run!r}, progress=False)
"""


def test_killed_run_resumes_without_repeating(server_factory, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    srv = server_factory(faults=["500", "malformed"], gate_after=5)
    run = tmp_path / "run"
    script = _CHILD.format(classes=CLASSES, url=srv.url, env=KEY_ENV, run=str(run))
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache = run / "describe_responses.jsonl"
    deadline = time.time() + 60
    try:
        # kill once 5 answers are saved and more requests are in flight (held at the gate)
        while not (srv.blocked >= 1 and cache.exists() and len(read_jsonl(cache)) >= 5):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "child made no progress"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        srv.gate.set()
    first_ok = list(srv.ok)
    assert len(first_ok) == 5
    partial = read_jsonl(run / "descriptions.jsonl")
    assert 0 < len(partial) < 12

    n_before = srv.requests
    srv.gate_after = None
    be = OpenAIBackend(model="fake-llm", api_base=srv.url, api_key_env=KEY_ENV, max_concurrency=2,
                       timeout=5, base_delay=0.001)
    res = generate_descriptions(CLASSES, be, domain="birds", n_per_class=3, run_dir=run, progress=False)
    _check_complete(res.records, 3)
    _check_complete(read_jsonl(run / "descriptions.jsonl"), 3)
    resumed = srv.bodies[n_before:]
    assert not set(resumed) & set(first_ok), "a request answered before the kill was sent again"
    assert max(Counter(srv.ok).values()) == 1
    st = be.stats()
    assert srv.requests - n_before == st["requests"] == st["successes"] + st["retries"]
    assert st["successes"] == 12 - 5  # the 5 answers bought before the kill were reused, not bought again
    assert res.metrics["session"]["responses_from_cache"] == 5 - len(partial)
    _assert_no_key(run)


def test_fatal_errors_and_key_handling(server_factory, tmp_path, monkeypatch):
    srv = server_factory()
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    be = OpenAIBackend(model="fake-llm", api_base=srv.url, api_key_env=KEY_ENV, base_delay=0.001)
    with pytest.raises(BackendError, match="HTTP 401: invalid api key") as e:
        generate_descriptions(CLASSES[:1], be, n_per_class=1, run_dir=tmp_path, progress=False)
    assert "wrong-key" not in str(e.value) and "wrong-key" not in repr(be)
    assert srv.requests == 1  # not retried
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        OpenAIBackend(model="m", api_base="https://api.example.com/v1", api_key_env=KEY_ENV)
    assert parse_retry_after("2") == 2.0 and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # a date in the past: no wait


def _check_complete_for(records, classes, n):
    assert Counter(r["class"] for r in records) == {c: n for c in classes}


def _backend(url, sleeps=None, **kw):
    return OpenAIBackend(model="fake-llm", api_base=url, api_key_env=KEY_ENV, max_concurrency=1, base_delay=0.001,
                         timeout=5, sleep=(sleeps.append if sleeps is not None else time.sleep), **kw)


def test_one_kept_alive_connection_any_5xx_and_retry_after_ms(server_factory, tmp_path, monkeypatch):
    """Every request of a run goes over one kept-alive connection (urllib opened one per request); a 529
    is retried like any 5xx (only 500-504 were); ``retry-after-ms`` is honoured (it was ignored)."""
    monkeypatch.setenv(KEY_ENV, KEY)
    srv = server_factory(faults=["529", "429ms"], keep_alive=True)
    sleeps = []
    be = _backend(srv.url, sleeps)
    res = generate_descriptions(CLASSES, be, domain="birds", n_per_class=3, run_dir=tmp_path, progress=False)
    _check_complete(res.records, 3)
    assert be.stats()["errors"] == {"529": 1, "429": 1} and srv.requests == 14
    assert max(sleeps) == 2.5 and sorted(sleeps)[0] < 0.1
    assert srv.connections == 1


def _self_signed(tmp_path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert = tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert


class _ConnectProxy(BaseHTTPRequestHandler):
    """A forward proxy for HTTPS: CONNECT, then bytes relayed both ways until either side closes."""

    def log_message(self, *args):
        pass

    def do_CONNECT(self):
        self.server.connects.append(self.path)
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        pair = {self.connection: upstream, upstream: self.connection}
        try:
            while True:
                ready, _, _ = select.select(list(pair), [], [], 10)
                chunks = [(s, s.recv(65536)) for s in ready]
                if not ready or any(not data for _, data in chunks):
                    return
                for s, data in chunks:
                    pair[s].sendall(data)
        finally:
            upstream.close()


def test_proxies_and_https_keep_alive(server_factory, tmp_path, monkeypatch):
    """HTTP through the proxy HTTP_PROXY names (absolute URL, the target never resolved here), and HTTPS
    through a CONNECT tunnel to a TLS server whose certificate is checked; each run on one connection."""
    monkeypatch.setenv(KEY_ENV, KEY)
    for var in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    proxy = server_factory(keep_alive=True)  # answers like the endpoint it stands for
    monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/v1"))
    monkeypatch.setenv("http_proxy", proxy.url.removesuffix("/v1"))
    be = _backend("http://llm.invalid:8080/v1")
    generate_descriptions(CLASSES[:2], be, domain="birds", n_per_class=2, run_dir=tmp_path / "http", progress=False)
    assert proxy.seen == [("llm.invalid:8080", "http://llm.invalid:8080/v1/chat/completions")] * 4
    assert proxy.connections == 1

    cert = _self_signed(tmp_path)
    tls = server_factory(keep_alive=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, tmp_path / "key.pem")
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    tunnel = ThreadingHTTPServer(("127.0.0.1", 0), _ConnectProxy)
    tunnel.daemon_threads, tunnel.connects = True, []
    threading.Thread(target=tunnel.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{tunnel.server_address[1]}")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate (verification stays on)
    try:
        be = _backend(f"https://localhost:{tls.server_address[1]}/v1")
        res = generate_descriptions(CLASSES[:2], be, domain="birds", n_per_class=2, run_dir=tmp_path / "https",
                                    progress=False)
        be._pool.close()
    finally:
        tunnel.shutdown()
        tunnel.server_close()
    _check_complete_for(res.records, CLASSES[:2], 2)
    assert tunnel.connects == [f"localhost:{tls.server_address[1]}"]
    assert tls.requests == 4 and tls.connections == 1


def test_a_connection_the_server_closed_while_idle_is_reopened_at_once(server_factory, tmp_path, monkeypatch):
    """A server (or a load balancer) may drop a kept-alive connection between requests: the request goes
    out again at once on a new connection, costing no retry and no backoff."""
    monkeypatch.setenv(KEY_ENV, KEY)
    srv = server_factory(keep_alive=True, drop_idle=True)
    sleeps = []
    be = _backend(srv.url, sleeps)
    res = generate_descriptions(CLASSES[:2], be, domain="birds", n_per_class=2, run_dir=tmp_path, progress=False)
    _check_complete_for(res.records, CLASSES[:2], 2)
    assert srv.requests == srv.connections == 4
    assert be.stats()["retries"] == 0 and not sleeps
