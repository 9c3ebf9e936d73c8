"""The Prometheus /metrics endpoint: plain HTTP, or HTTPS, with optional HTTP basic auth.

prometheus_client's own `start_http_server` serves TLS but has no basic
auth, so this module serves its WSGI app (`make_wsgi_app`) itself, in front of
a small check:

- `--metrics-tls-cert` / `--metrics-tls-key`: HTTPS (TLS 1.2 at least). The
  handshake runs on the request's own thread, so a slow client holds up no
  other scrape; changed files are picked up for new connections (checked at
  most every 10 s).
- `--metrics-basic-auth`: `user:HASH`, or the path of a file with one such
  line per user (`#` comments). HASH is `sha256:<hex>` (SHA-256 of the
  password; fine for a long random password) or
  `pbkdf2_sha256$<iterations>$<salt>$<hex>` (for a password a person chose).
  `python -m ingest.observe.metrics_http hash` reads a password and prints a line to
  use. Without credentials, or with wrong ones: 401 with a Basic challenge.
  The password is never logged; the hash is shown as *** in the startup line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

RELOAD_CHECK_S = 10.0
PBKDF2_ITERATIONS = 600_000
REALM = "steplog metrics"

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


# -- basic auth ------------------------------------------------------------------


@dataclass(frozen=True)
class PasswordHash:
    """One stored password hash (never the password)."""

    kind: str  # "sha256" or "pbkdf2_sha256"
    digest: bytes
    salt: bytes = b""
    iterations: int = 0

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        text = text.strip()
        try:
            if text.startswith("sha256:"):
                digest = bytes.fromhex(text.removeprefix("sha256:"))
                if len(digest) != 32:
                    raise ValueError("a SHA-256 digest is 64 hex digits")
                return cls("sha256", digest)
            if text.startswith("pbkdf2_sha256$"):
                _, iterations, salt, digest_hex = text.split("$")
                rounds = int(iterations)
                if rounds < 10_000:
                    raise ValueError("at least 10000 iterations")
                return cls("pbkdf2_sha256", bytes.fromhex(digest_hex), salt.encode(), rounds)
        except ValueError as exc:
            raise ValueError(f"bad password hash: {exc}") from None
        if text.startswith(("$2a$", "$2b$", "$2y$")):
            raise ValueError(
                "bcrypt hashes are not supported; use sha256:<hex> or pbkdf2_sha256$... "
                "(python -m ingest.observe.metrics_http hash)"
            )
        raise ValueError(
            "a password hash is sha256:<hex> or pbkdf2_sha256$<iterations>$<salt>$<hex>"
        )

    def matches(self, password: str) -> bool:
        if self.kind == "sha256":
            got = hashlib.sha256(password.encode()).digest()
        else:
            got = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, self.iterations)
        return hmac.compare_digest(got, self.digest)


def make_hash(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${digest.hex()}"


def parse_basic_auth(spec: str) -> dict[str, PasswordHash]:
    """`user:HASH`, or a file of such lines: user -> hash. ValueError names the
    line (never its hash)."""
    spec = spec.strip()
    if not spec:
        return {}
    source = "--metrics-basic-auth"
    if os.path.isfile(spec) or spec.startswith(("/", "./", "../")):
        try:
            with open(spec, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ValueError(f"{source}: cannot read {spec}: {exc.strerror or exc}") from None
        source = f"{source} file {spec}"
    else:
        lines = [spec]
    users: dict[str, PasswordHash] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"{source} line {number}: expected user:HASH")
        try:
            users[user] = PasswordHash.parse(hashed)
        except ValueError as exc:
            raise ValueError(f"{source} line {number} (user {user!r}): {exc}") from None
    if not users:
        raise ValueError(f"{source}: no user:HASH line")
    return users


class BasicAuth:
    """The check in front of the app. A verified header is remembered (by its
    SHA-256, a few at most) so a slow hash is paid once, not on every scrape."""

    MAX_REMEMBERED = 16

    def __init__(self, users: Mapping[str, PasswordHash], app: WsgiApp) -> None:
        self._users = dict(users)
        self._app = app
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def _allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        key = hashlib.sha256(value.strip().encode()).digest()
        with self._lock:
            if key in self._ok:
                return True
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        hashed = self._users.get(user)
        if not sep or hashed is None or not hashed.matches(password):
            return False
        with self._lock:
            if len(self._ok) >= self.MAX_REMEMBERED:
                self._ok.clear()
            self._ok.add(key)
        return True

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not self._allowed(environ.get("HTTP_AUTHORIZATION", "")):
            start_response(
                "401 Unauthorized",
                [
                    ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
                    ("Content-Type", "text/plain; charset=utf-8"),
                ],
            )
            return [b"401 Unauthorized: this /metrics needs HTTP basic auth\n"]
        return self._app(environ, start_response)


# -- the server --------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log (a scrape every few seconds)."""


class _TlsContext:
    """An SSL context from two files, rebuilt when they change."""

    def __init__(self, cert: str, key: str) -> None:
        self._cert = cert
        self._key = key
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self.context = self._build()
        self._checked = time.monotonic()

    def _files_stamp(self) -> tuple[int, ...]:
        a, b = os.stat(self._cert), os.stat(self._key)
        return (a.st_mtime_ns, a.st_size, b.st_mtime_ns, b.st_size)

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"--metrics-tls-cert/--metrics-tls-key: cannot load {self._cert} and "
                f"{self._key}: {getattr(exc, 'reason', None) or exc}"
            ) from None
        return context

    def current(self) -> ssl.SSLContext:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= RELOAD_CHECK_S:
                self._checked = now
                try:
                    stamp = self._files_stamp()
                    if stamp != self._stamp:
                        self.context, self._stamp = self._build(), stamp
                except (OSError, ValueError):
                    pass  # keep serving with the certificate in use
            return self.context


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: _TlsContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # The handshake happens on the handler's thread (first read).
            sock = self.tls.current().wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails the handshake or hangs up: not worth a traceback."""


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread
    tls: bool

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    certfile: str = "",
    keyfile: str = "",
    basic_auth: str = "",
) -> MetricsServer:
    """Serve /metrics on host:port (ValueError for bad settings, OSError for a
    port that cannot be bound)."""
    tls = _TlsContext(certfile, keyfile) if certfile else None
    app: WsgiApp = make_wsgi_app(registry)
    users = parse_basic_auth(basic_auth)
    if users:
        app = BasicAuth(users, app)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_Server):
        address_family = family

    Server.tls = tls
    httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="steplog-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread, tls is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.observe.metrics_http")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="read a password, print user:HASH for --metrics-basic-auth")
    h.add_argument("--user", default="prometheus", help="the user name (default prometheus)")
    h.add_argument("--stdin", action="store_true", help="read the password from stdin")
    ns = parser.parse_args(argv)
    password = sys.stdin.readline().rstrip("\n") if ns.stdin else getpass.getpass()
    if not password:
        print("an empty password is not allowed", file=sys.stderr)
        return 2
    print(f"{ns.user}:{make_hash(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
