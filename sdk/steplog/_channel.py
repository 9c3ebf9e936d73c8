"""How every channel of the client is opened: TLS, mutual TLS and the bearer
token (`ChannelSettings`), so the writer, uploads, queries and `steplog sync`
all connect alike."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from steplog._settings import parse_flag
from steplog.errors import InvalidArgumentError

PemSource = str | os.PathLike[str] | bytes


def _flag(value: str, name: str) -> bool:
    return parse_flag(name, value)


def _pem(source: PemSource | None, name: str) -> bytes | None:
    """PEM bytes from bytes (the PEM itself) or a path (str / PathLike)."""
    if source is None or source == "":
        return None
    if isinstance(source, bytes):
        data = source
        where = "the value"
    else:
        path = Path(source).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(
                f"{name}: cannot read {path}: {exc.strerror or exc}", field=name
            ) from None
        where = str(path)
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(f"{name}: {where} is not PEM", field=name)
    return data


def split_target(target: str) -> tuple[str, str]:
    """(host, port) of a gRPC target such as 127.0.0.1:50051, [::1]:50051,
    dns:///name:443 or unix:/path (host "unix", port "")."""
    if target.startswith(("unix:", "unix-abstract:")):
        return "unix", ""
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, rest.lstrip(":")
    host, sep, port = target.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return target, ""
    return host, port


def is_loopback_target(target: str) -> bool:
    """Whether a plaintext connection to `target` stays on this machine:
    a loopback IP literal (127.0.0.0/8, ::1), localhost (and *.localhost),
    or a Unix socket. Other names count as remote, whatever they resolve to
    today."""
    host, _ = split_target(target)
    if host == "unix":
        return True
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _authorization(token: str) -> tuple[str, str]:
    """The metadata pair that carries the token."""
    return ("authorization", f"Bearer {token}")


class _BearerToken(grpc.AuthMetadataPlugin):
    """`authorization: Bearer <token>` on every call, under TLS."""

    def __init__(self, token: str) -> None:
        self._metadata = (_authorization(token),)

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        callback(self._metadata, None)


class _Details(grpc.ClientCallDetails):
    def __init__(
        self, base: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = getattr(base, "compression", None)


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call on a plaintext channel (gRPC sends call
    credentials only over a secure one)."""

    def __init__(self, token: str) -> None:
        self._pair = _authorization(token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = tuple(details.metadata or ())
        return _Details(details, (*metadata, self._pair))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class ChannelSettings:
    """How the client connects to one service address.

    Built once (`resolve`), from keyword arguments, else the environment:

    - `token` / STEPLOG_TOKEN: sent as `authorization: Bearer <token>` on
      every call, streams included.
    - `tls_ca` / STEPLOG_TLS_CA: a PEM bundle of the CA that signed the
      server's certificate; TLS is on. `tls=True` / STEPLOG_TLS=true, or a
      `grpcs://` / `https://` URL, turns TLS on with the system's CAs.
    - `tls_cert` + `tls_key` / STEPLOG_TLS_CERT + STEPLOG_TLS_KEY: the
      client's certificate and key for mutual TLS (TLS is on).
    - `tls_server_name` / STEPLOG_TLS_SERVER_NAME: the name to verify the
      server's certificate against, when it differs from the address.
    - `allow_insecure_token` / STEPLOG_ALLOW_INSECURE_TOKEN=true: send the
      token over plaintext to a host that is not loopback. Without it that
      is refused here, before any connection, so a token is never sent in
      the clear by accident.

    PEM settings take a path (str / PathLike) or the PEM bytes themselves;
    files are read once, here (a forked child reuses the bytes)."""

    target: str
    token: str = field(default="", repr=False)
    tls: bool = False
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    server_name: str = ""
    allow_insecure_token: bool = False

    @classmethod
    def resolve(
        cls,
        target: str,
        *,
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        allow_insecure_token: bool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ChannelSettings:
        env = os.environ if env is None else env
        secure_scheme = False
        for prefix in ("grpcs://", "https://"):
            if target.startswith(prefix):
                target, secure_scheme = target[len(prefix) :].rstrip("/"), True
        token = (env.get("STEPLOG_TOKEN", "") if token is None else token).strip()
        if any(c.isspace() or ord(c) < 32 for c in token):
            raise InvalidArgumentError(
                "the token (token= / STEPLOG_TOKEN) holds whitespace or control characters",
                field="token",
            )
        ca = _pem(tls_ca if tls_ca is not None else env.get("STEPLOG_TLS_CA"), "STEPLOG_TLS_CA")
        cert = _pem(
            tls_cert if tls_cert is not None else env.get("STEPLOG_TLS_CERT"), "STEPLOG_TLS_CERT"
        )
        key = _pem(
            tls_key if tls_key is not None else env.get("STEPLOG_TLS_KEY"), "STEPLOG_TLS_KEY"
        )
        if (cert is None) != (key is None):
            raise InvalidArgumentError(
                "a client certificate needs its key (and the key its certificate): set "
                "tls_cert and tls_key (STEPLOG_TLS_CERT and STEPLOG_TLS_KEY) together",
                field="tls_cert" if cert is None else "tls_key",
            )
        if tls is None and env.get("STEPLOG_TLS", "").strip():
            tls = _flag(env["STEPLOG_TLS"], "STEPLOG_TLS")
        if tls is False and (ca is not None or cert is not None or secure_scheme):
            raise InvalidArgumentError(
                "TLS is turned off (tls=False / STEPLOG_TLS=false) but a CA, a client "
                "certificate or a grpcs:// URL asks for it",
                field="tls",
            )
        tls = bool(tls) or secure_scheme or ca is not None or cert is not None
        if allow_insecure_token is None:
            allow_insecure_token = _flag(
                env.get("STEPLOG_ALLOW_INSECURE_TOKEN", ""), "STEPLOG_ALLOW_INSECURE_TOKEN"
            )
        server_name = (
            env.get("STEPLOG_TLS_SERVER_NAME", "") if tls_server_name is None else tls_server_name
        )
        settings = cls(target, token, tls, ca, cert, key, server_name, bool(allow_insecure_token))
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse a token in plaintext to a host that is not loopback."""
        plaintext = self.token and not self.tls and not self.allow_insecure_token
        if plaintext and not is_loopback_target(self.target):
            raise InvalidArgumentError(
                f"refusing to send the token in plaintext to {self.target}, which is not a "
                "loopback address: turn TLS on (tls_ca= / STEPLOG_TLS_CA=<CA file>, or "
                "STEPLOG_TLS=true for the system CAs, or a grpcs:// URL), or, only where "
                "the network is trusted, allow it explicitly with "
                "allow_insecure_token=True / STEPLOG_ALLOW_INSECURE_TOKEN=true",
                field="token",
            )

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def _credentials(self) -> grpc.ChannelCredentials:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_BearerToken(self.token))
            )
        return credentials

    def open(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A new channel to the target with these settings."""
        opts = self._options(options)
        if self.tls:
            return grpc.secure_channel(self.target, self._credentials(), options=opts)
        channel = grpc.insecure_channel(self.target, options=opts)
        if self.token:
            return grpc.intercept_channel(channel, _MetadataInterceptor(self.token))
        return channel

    def open_aio(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A new grpc.aio channel with these settings (made on the thread of
        the event loop that will use it). Over plaintext the token is not
        added by the channel: send `plaintext_metadata()` on each call."""
        import grpc.aio

        opts = self._options(options)
        if self.tls:
            return grpc.aio.secure_channel(self.target, self._credentials(), options=opts)
        return grpc.aio.insecure_channel(self.target, options=opts)

    def plaintext_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata an aio call over plaintext carries (the token; under
        TLS the channel's call credentials send it)."""
        if self.token and not self.tls:
            return (_authorization(self.token),)
        return ()
