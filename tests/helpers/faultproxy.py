"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a loopback S3 server (moto), for real fault tests.

Clients (boto3, s3fs, Ray workers through ``AWS_ENDPOINT_URL``) talk to the proxy as if it were S3; the
proxy forwards every request to the upstream server unless a rule says to fail it. Rules are bounded: each
fires for the first ``count`` requests that match its method and path pattern, then stops, so a test knows
exactly how many faults it injected and the run must survive them. Faults are real HTTP-level events:

- ``slowdown``: HTTP 503 with S3's ``SlowDown`` error document (throttling);
- ``denied``: HTTP 403 with S3's ``AccessDenied`` error document (a permanent failure);
- ``drop``: the connection is closed mid-response: the status line and headers (with the full
  Content-Length) and half of the body are sent, then the socket is shut. A response with no body is
  dropped before its status line, after the request reached the server (a write whose answer was lost);
- ``reset``: the connection is closed before the request reaches the server, with no response.

Only loopback upstreams are accepted: this never sends traffic anywhere but 127.0.0.1.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ACTIONS = ("slowdown", "denied", "drop", "reset")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Hop-by-hop headers are the proxy's own business, never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}

_ERROR_DOC = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              '<Resource>{path}</Resource><RequestId>faultproxy</RequestId></Error>')


@dataclass
class Rule:
    """Fail the first ``count`` requests whose method and path match with ``action``."""

    action: str  # slowdown | denied | drop | reset
    method: str = "*"  # HTTP method (GET, PUT, HEAD, ...) or "*" for any
    path: str = ".*"  # regular expression searched in the request path (query string included)
    count: int = 1  # how many matching requests fail; the rule is spent after that
    fired: int = 0  # how many times it fired so far

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}: expected one of {', '.join(ACTIONS)}")
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a rule's count must be a positive int (faults are bounded), got {self.count!r}")
        self._pattern = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        return self.fired < self.count and self.method in ("*", method) and bool(self._pattern.search(path))


@dataclass
class Event:
    method: str
    path: str
    action: str  # "forward" or the fault injected


@dataclass
class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` (http://127.0.0.1:PORT); use as a context manager."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self):
        parts = urlsplit(self.upstream)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise ValueError(f"the fault proxy only forwards to a loopback http:// server, not {self.upstream!r}")
        self._up = (parts.hostname, parts.port or 80)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- control

    def add(self, action: str, method: str = "*", path: str = ".*", count: int = 1) -> Rule:
        """Add a rule and return it (its ``fired`` count tells how many faults it injected)."""
        rule = Rule(action, method, path, count)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule and forget the events seen so far."""
        with self._lock:
            self.rules.clear()
            self.events.clear()

    def faults(self, action: str | None = None) -> int:
        """Return how many faults were injected (of one action, or all)."""
        with self._lock:
            return sum(1 for e in self.events if e.action != "forward" and action in (None, e.action))

    def requests(self, method: str | None = None, path: str = ".*") -> list[Event]:
        """Return the requests seen (any outcome) with this method and a path matching ``path``."""
        pattern = re.compile(path)
        with self._lock:
            return [e for e in self.events if method in (None, e.method) and pattern.search(e.path)]

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            action = "forward"
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    action = rule.action
                    break
            self.events.append(Event(method, path, action))
            return action

    # -- lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "start the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Start serving on a free loopback port; return the proxy's endpoint URL."""
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint: clients reuse connections

    def log_message(self, fmt, *args):  # quiet: the proxy's events list is the log
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _error(self, status: int, code: str, message: str) -> None:
        body = _ERROR_DOC.format(code=code, message=message, path=self.path).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "faultproxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _cut(self) -> None:
        """Close the client connection abruptly (RST where the OS allows it)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        body = self._read_body()
        action = self.owner._decide(self.command, self.path)
        if action == "slowdown":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if action == "denied":
            return self._error(403, "AccessDenied", "Access Denied")
        if action == "reset":
            return self._cut()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.owner._up, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        finally:
            conn.close()
        if action == "drop" and len(data) < 2:
            return self._cut()  # the server did the work; the client never hears about it
        self.send_response(status, reason)
        for k, v in resp_headers:
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "server", "date"):
                self.send_header(k, v)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in resp_headers).get("content-length", "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action == "drop":
            self.wfile.write(data[: len(data) // 2])
            return self._cut()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
