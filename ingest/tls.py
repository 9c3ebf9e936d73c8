"""TLS for the gRPC port: server credentials from PEM files, re-read on change.

`server_credentials(cfg)` is None when TLS is off (`--tls-cert` unset). With
`--tls-client-ca` every client must present a certificate that chains to that
CA (mutual TLS); the handshake fails otherwise, before any RPC or interceptor.

The files are read once at start (a missing or unreadable file, a key that
does not match the certificate: StartError-worthy ValueError naming the
setting), then checked for a change of size or modification time at most once
every `RELOAD_CHECK_S` when a client connects: a renewed certificate (a
cert-manager rotation, a `kubectl create secret` update) is used for new
connections without a restart. A changed set that cannot be read keeps the
one in use and logs why.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import grpc

from ingest.config import Config

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 10.0


@dataclass(frozen=True)
class _Files:
    cert: str
    key: str
    client_ca: str

    def stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in (self.cert, self.key, self.client_ca):
            if path:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{setting}: {path} is not a PEM file")
    return data


def _check_pair(cert_path: str, key_path: str, setting: str) -> None:
    """A certificate and key that do not belong together fail here, with the
    settings named, not as a handshake error on the first connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise ValueError(
            f"{setting}: the certificate and key do not load as a pair "
            f"({exc.reason or exc}); the key must be unencrypted PEM and match the certificate"
        ) from None


def _load(files: _Files) -> grpc.ServerCertificateConfiguration:
    cert = _read(files.cert, "--tls-cert")
    key = _read(files.key, "--tls-key")
    _check_pair(files.cert, files.key, "--tls-cert/--tls-key")
    ca = _read(files.client_ca, "--tls-client-ca") if files.client_ca else None
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def check_settings(cfg: Config) -> None:
    """Cross-setting rules, as ValueError naming the settings."""
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("--tls-cert and --tls-key (STEPLOG_TLS_CERT/KEY) go together: set both")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ValueError(
            "--tls-client-ca (mutual TLS) needs TLS on: set --tls-cert and --tls-key too"
        )
    if bool(cfg.metrics_tls_cert) != bool(cfg.metrics_tls_key):
        raise ValueError("--metrics-tls-cert and --metrics-tls-key go together: set both")


class _Reloader:
    """grpc's certificate fetcher: None keeps the configuration in use."""

    def __init__(self, files: _Files) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamp = files.stamp()
        self._checked = time.monotonic()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < RELOAD_CHECK_S:
                return None
            self._checked = now
            try:
                stamp = self._files.stamp()
                if stamp == self._stamp:
                    return None
                loaded = _load(self._files)
            except (OSError, ValueError) as exc:
                log.warning("TLS files changed but cannot be used; keeping the old ones: %s", exc)
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded from %s", self._files.cert)
            return loaded


def server_credentials(cfg: Config) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials, or None for plaintext."""
    check_settings(cfg)
    if not cfg.tls_cert:
        return None
    files = _Files(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    initial = _load(files)
    # grpc documents None from the fetcher as "keep the current one"; the stub says otherwise.
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], _Reloader(files))
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=bool(cfg.tls_client_ca)
    )
