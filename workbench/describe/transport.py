"""Kept-alive HTTP(S) connections to one endpoint, through the proxy the environment names.

``urllib`` opens a new connection (and a new TLS handshake) for every request; a describe run sends
thousands. :class:`ConnectionPool` hands each worker thread an idle ``http.client`` connection, which
stays open between requests (HTTP/1.1 keep-alive) and reconnects by itself when the server closed it.
Proxies are chosen as urllib chooses them (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``): plain HTTP
goes to the proxy with the absolute URL, HTTPS through a CONNECT tunnel, verified against the target.
"""
from __future__ import annotations

import base64
import http.client
import ssl
import threading
import urllib.request
from urllib.parse import unquote, urlsplit

# Errors of a kept-alive connection the server closed while it was idle: the request never arrived,
# so it is sent again at once on a new connection (not counted as a retry).
STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


def proxy_for(url: str) -> str | None:
    """The proxy URL the environment names for ``url`` (None: connect directly)."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else "http://" + proxy


class ConnectionPool:
    """Connections to the origin of ``url``; :meth:`request` sends one request and returns
    ``(status, headers, body)``. At most ``size`` idle connections are kept."""

    def __init__(self, url: str, timeout: float, size: int):
        self.url = urlsplit(url)
        self.timeout, self.size = timeout, size
        self.proxy = proxy_for(url)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _new(self) -> http.client.HTTPConnection:
        https = self.url.scheme == "https"
        host, port = self.url.hostname, self.url.port or (443 if https else 80)
        context = ssl.create_default_context() if https else None
        if self.proxy is None:
            if https:
                return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        p = urlsplit(self.proxy)
        if https:  # TCP to the proxy, CONNECT, then TLS with the target's name and certificate
            conn = http.client.HTTPSConnection(p.hostname, p.port or 80, timeout=self.timeout, context=context)
            conn.set_tunnel(host, port, headers=self._proxy_auth())
            return conn
        return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=self.timeout)

    def _proxy_auth(self) -> dict:
        p = urlsplit(self.proxy) if self.proxy else None
        if p is None or not p.username:
            return {}
        token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
        return {"Proxy-Authorization": "Basic " + token}

    def _target(self) -> str:
        path = (self.url.path or "/") + (f"?{self.url.query}" if self.url.query else "")
        if self.proxy is not None and self.url.scheme == "http":
            return f"http://{self.url.netloc}{path}"  # a plain-HTTP proxy wants the absolute URL
        return path

    def request(self, method: str, body: bytes, headers: dict) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request/response on an idle (or new) connection; raises ``OSError``/``HTTPException``
        on transport failures, after closing the connection (its state is unknown)."""
        with self._lock:
            conn = self._idle.pop() if self._idle else self._new()
        headers = {**headers, **(self._proxy_auth() if self.proxy and self.url.scheme == "http" else {})}
        try:
            try:
                reused = conn.sock is not None
                conn.request(method, self._target(), body=body, headers=headers)
                resp = conn.getresponse()
            except STALE:
                if not reused:
                    raise
                conn.close()  # the server closed it while idle; http.client reconnects on the next request
                conn.request(method, self._target(), body=body, headers=headers)
                resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)  # a closed one reconnects when next used
            else:
                conn.close()
        return resp.status, resp.headers, data

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
