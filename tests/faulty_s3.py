"""A fault-injecting HTTP proxy for an S3 endpoint (moto's server in the tests): real sockets on 127.0.0.1.

Each request is forwarded to the upstream unless the proxy decides, with a seeded RNG and the configured
rates, to inject one fault instead:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body; the request never reaches the upstream.
- ``internal``: ``500 InternalError``; the request never reaches the upstream.
- ``reset``: forward the request, send the response headers (with the full Content-Length) and part of the
  body, then reset the connection (``SO_LINGER 0``). On a write the write has landed: an ambiguous failure.
- ``ambiguous``: writes only: forward the request (so it is applied), then answer ``500 InternalError``.
- ``latency``: wait ``latency_s`` before forwarding (on top of any of the above).

``only="reads"`` or ``only="writes"`` (PUT, POST, DELETE) restricts the faults; ``fail_writes=True`` answers
every write ``503 SlowDown``; :meth:`FaultyS3.script` queues faults for the next matching requests, for
tests that need one exact fault. ``injected`` and ``requests`` count what happened, so a test can show
that faults really were injected.

Usage::

    with FaultyS3(endpoint, seed=1, slowdown=0.02, reset=0.01) as proxy:
        fs = s3fs.S3FileSystem(**proxy.storage_options(options))
"""

from __future__ import annotations

import copy
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

WRITES = frozenset({"PUT", "POST", "DELETE"})
KINDS = ("slowdown", "internal", "reset", "ambiguous")  # at most one per request, drawn in this order
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)


def s3_error(code: str, message: str) -> bytes:
    """An S3 XML error body."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>faulty-s3</RequestId><HostId>faulty-s3</HostId></Error>"
    ).encode()


class FaultyS3:
    """A threaded proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``) that injects faults.

    Rates are probabilities per request (their sum at most 1); change them any time with :meth:`set`.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        slowdown: float = 0.0,
        internal: float = 0.0,
        reset: float = 0.0,
        ambiguous: float = 0.0,
        latency: float = 0.0,
        latency_s: float = 0.05,
        only: str | None = None,
        fail_writes: bool = False,
    ):
        up = urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._script: list[tuple[str, str | None, str | None]] = []
        self.injected: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.faults: dict[str, Any] = {}
        self.set(
            slowdown=slowdown,
            internal=internal,
            reset=reset,
            ambiguous=ambiguous,
            latency=latency,
            latency_s=latency_s,
            only=only,
            fail_writes=fail_writes,
        )
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)
        self._thread.start()

    def set(self, **faults: Any) -> None:
        """Change the fault settings (any of the constructor's keyword arguments but ``seed``)."""
        unknown = set(faults) - {*KINDS, "latency", "latency_s", "only", "fail_writes"}
        if unknown:
            raise TypeError(f"unknown fault settings {sorted(unknown)}")
        if faults.get("only") not in (None, "reads", "writes"):
            raise ValueError(f"only must be None, 'reads' or 'writes', not {faults['only']!r}")
        with self._lock:
            self.faults.update(faults)
            if sum(self.faults[k] for k in KINDS) > 1:
                raise ValueError(f"fault rates add up to more than 1: {self.faults}")

    def script(self, *kinds: str, method: str | None = None, path: str | None = None) -> None:
        """Inject ``kinds``, in order, on the next requests whose method is ``method`` and whose path holds
        ``path`` (None: any)."""
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        with self._lock:
            self._script.extend((k, method, path) for k in kinds)

    def storage_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """A copy of fsspec ``options`` whose endpoint is this proxy."""
        out = copy.deepcopy(options)
        out.setdefault("client_kwargs", {})["endpoint_url"] = self.endpoint
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultyS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decide(self, method: str, path: str) -> tuple[str | None, bool]:
        """(the fault for this request or None, whether to add latency); counts both."""
        write = method in WRITES
        with self._lock:
            self.requests[method] += 1
            f = self.faults
            delay = f["latency"] > 0 and self._rng.random() < f["latency"]
            if delay:
                self.injected["latency"] += 1
            for i, (kind, m, p) in enumerate(self._script):
                if (m is None or m == method) and (p is None or p in path):
                    del self._script[i]
                    self.injected[kind] += 1
                    return kind, delay
            if write and f["fail_writes"]:
                self.injected["fail_writes"] += 1
                return "slowdown", delay
            if (f["only"] == "reads" and write) or (f["only"] == "writes" and not write):
                return None, delay
            u, edge = self._rng.random(), 0.0
            for kind in KINDS:
                if kind == "ambiguous" and not write:
                    continue
                edge += f[kind]
                if u < edge:
                    self.injected[kind] += 1
                    return kind, delay
            return None, delay


def _handler(proxy: FaultyS3) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in WRITES:
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            finally:
                conn.close()

        def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, cut: bool) -> None:
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(body)))
            if not cut:
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            # Headers promise the whole body; send part of it (or, with no body, part of the headers), then reset.
            head = b"".join([*self._headers_buffer, b"\r\n"])
            self._headers_buffer = []
            part = head + body[: len(body) // 2] if len(body) > 1 else head[: len(head) // 2]
            self.wfile.write(part)
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def _error(self, status: int, code: str, message: str) -> None:
            body = s3_error(code, message)
            self._send(status, message, [("Content-Type", "application/xml")], body, cut=False)

        def _handle(self) -> None:
            body = self._body()
            fault, delay = proxy._decide(self.command, self.path)
            if delay:
                time.sleep(proxy.faults["latency_s"])
            if fault == "slowdown":
                return self._error(503, "SlowDown", "Please reduce your request rate.")
            if fault == "internal":
                return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
            status, reason, headers, data = self._forward(body)
            if fault == "ambiguous":
                return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
            self._send(status, reason, headers, data, cut=fault == "reset")

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    return Handler
