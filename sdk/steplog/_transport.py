"""The background writer's edge to the network.

The writer (steplog._writer) only buffers, batches, sequences and retries; this
module is the only part of it that knows gRPC. It holds:

- `Transport` / `IngestStream`: the small protocol the writer talks to, so tests
  can plug in an in-memory fake and the writer core stays free of I/O;
- `GrpcTransport`: the real one, on the sync gRPC API (a bidirectional
  `IngestService.Ingest` stream fed from a queue, with a reader thread that hands
  each acknowledgement to a callback; the unary `Write` for `steplog sync`);
- `TransportError`: a failed call, reduced to its status code, message and the
  server's RetryInfo hint;
- `Backoff`: jittered exponential backoff that honours that hint;
- `Rejection`: one rejected point as the service reported it;
- `ChannelSettings`: how every channel of the client is opened (TLS, mutual
  TLS, the bearer token), so the writer, uploads, queries and `steplog sync`
  all connect alike.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import random
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from steplog._retry import retry_code, should_retry
from steplog.errors import InvalidArgumentError, SteplogError
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import ingest_service_pb2_grpc

Labels = tuple[tuple[str, str], ...]


class TransportError(SteplogError):
    """A stream or call that failed with a gRPC status.

    `retry_after` is the server's RetryInfo delay in seconds, when it sent one."""

    def __init__(
        self, code: grpc.StatusCode, message: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth a first retry (steplog._retry: RESOURCE_EXHAUSTED only with
        RetryInfo); how many more is the caller's count."""
        return self.retry_again(1)

    @property
    def retry_code(self) -> grpc.StatusCode:
        """The code the retry table treats this as (UNAVAILABLE for a lost
        stream or connection, steplog._retry.is_transport_loss); consecutive
        failures are counted under it."""
        return retry_code(self.code, self.message)

    def retry_again(self, failures: int) -> bool:
        """Worth another try after `failures` consecutive failures."""
        return should_retry(
            self.code,
            retry_info=self.retry_after is not None,
            failures=failures,
            details=self.message,
        )

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> TransportError:
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", _retry_after(err))


def _retry_after(err: grpc.RpcError) -> float | None:
    """The delay of a google.rpc.RetryInfo detail in the trailers, if any."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)
    except Exception:  # no trailers, a mismatched status, grpc_status missing
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return max(0.0, float(delay))
    return None


ResponseCallback = Callable[[pb.IngestResponse], None]
DoneCallback = Callable[[TransportError | None], None]


class IngestStream(Protocol):
    """One open `Ingest` stream."""

    def send(self, request: pb.IngestRequest) -> None:
        """Queue a request; never blocks on the network. May raise
        TransportError if the stream is already known to be dead."""

    def close(self) -> None:
        """End the stream (half-close, then cancel). Idempotent."""


class Transport(Protocol):
    """What the writer needs from the network.

    Callbacks given to `open_stream` may run on any thread, including inside
    `open_stream` or `send`; they must be cheap and must not block. `on_done` is
    called at most once: with None when the service ended the stream cleanly,
    else with the error."""

    def open_stream(self, on_response: ResponseCallback, on_done: DoneCallback) -> IngestStream:
        """Open a new `Ingest` stream."""
        ...

    def write(self, request: pb.WriteRequest, timeout: float | None = None) -> pb.WriteResponse:
        """The unary `Write`; raises TransportError."""
        ...

    def after_fork(self) -> None:
        """Called in a forked child before its first stream: the parent's
        connections belong to the parent."""


class _GrpcStream:
    """A bidirectional call fed from a queue, read by its own daemon thread
    (the sync API has no non-blocking receive)."""

    def __init__(
        self,
        stub: ingest_service_pb2_grpc.IngestServiceStub,
        metadata: Sequence[tuple[str, str]],
        on_response: ResponseCallback,
        on_done: DoneCallback,
    ) -> None:
        self._requests: queue.SimpleQueue[pb.IngestRequest | None] = queue.SimpleQueue()
        self._on_response = on_response
        self._on_done = on_done
        self._closed = False
        self._call = stub.Ingest(iter(self._requests.get, None), metadata=tuple(metadata))
        self._reader = threading.Thread(
            target=self._read, name="steplog-ingest-reader", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        error: TransportError | None = None
        try:
            for response in self._call:
                self._on_response(response)
        except grpc.RpcError as err:
            error = TransportError.from_rpc_error(err)
        except Exception as exc:  # a bug in a callback or in grpc: report, do not hang
            error = TransportError(grpc.StatusCode.UNKNOWN, f"stream reader failed: {exc!r}")
        self._on_done(error)

    def send(self, request: pb.IngestRequest) -> None:
        if self._closed:
            raise TransportError(grpc.StatusCode.CANCELLED, "stream closed")
        self._requests.put(request)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)  # ends the request iterator so grpc's sender thread exits
        self._call.cancel()


class GrpcTransport:
    """The real transport, on the sync gRPC API.

    `metadata` goes on every call (for example the bearer token). A channel must
    not be used across fork(): pass `channel_factory` so a forked child can open
    its own; without one the child keeps using `channel` (which works only with
    gRPC's own fork support enabled)."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        channel_factory: Callable[[], grpc.Channel] | None = None,
    ) -> None:
        self._channel = channel
        self._metadata = tuple(metadata)
        self._factory = channel_factory
        self._stub = ingest_service_pb2_grpc.IngestServiceStub(channel)

    def open_stream(self, on_response: ResponseCallback, on_done: DoneCallback) -> IngestStream:
        try:
            return _GrpcStream(self._stub, self._metadata, on_response, on_done)
        except grpc.RpcError as err:
            raise TransportError.from_rpc_error(err) from None

    def write(self, request: pb.WriteRequest, timeout: float | None = None) -> pb.WriteResponse:
        try:
            return self._stub.Write(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise TransportError.from_rpc_error(err) from None

    def apply_operation(self, kind: str, payload: bytes, timeout: float | None = 60.0) -> None:
        """Apply an offline run operation (`steplog sync`): kind is the
        RunService method (UpdateRunStatus, UpdateRunTags, AddRunProperties),
        payload its serialized request. A status the run already has counts as
        applied (a second sync). Raises TransportError."""
        from steplog.v1 import run_service_pb2, run_service_pb2_grpc

        request_types: dict[str, Callable[[bytes], Message]] = {
            "UpdateRunStatus": run_service_pb2.UpdateRunStatusRequest.FromString,
            "UpdateRunTags": run_service_pb2.UpdateRunTagsRequest.FromString,
            "AddRunProperties": run_service_pb2.AddRunPropertiesRequest.FromString,
        }
        stub = run_service_pb2_grpc.RunServiceStub(self._channel)
        request = request_types[kind](payload)
        try:
            getattr(stub, kind)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            error = TransportError.from_rpc_error(err)
            if kind == "UpdateRunStatus" and error.code == grpc.StatusCode.FAILED_PRECONDITION:
                assert isinstance(request, run_service_pb2.UpdateRunStatusRequest)
                try:
                    run = stub.GetRun(
                        run_service_pb2.GetRunRequest(
                            workspace=request.workspace, run_id=request.run_id
                        ),
                        timeout=timeout,
                        metadata=self._metadata,
                    ).run
                except grpc.RpcError:
                    raise error from None
                if run.status == request.status:
                    return  # applied before
            raise error from None

    def after_fork(self) -> None:
        if self._factory is None:
            warnings.warn(
                "steplog: a forked child reuses its parent's gRPC channel; pass "
                "GrpcTransport(channel_factory=...) so the child can open its own",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._channel = self._factory()
        self._stub = ingest_service_pb2_grpc.IngestServiceStub(self._channel)


class Backoff:
    """Jittered exponential backoff: the n-th delay is drawn from
    [b/2, b] with b = min(maximum, initial * 2**n), and never shorter than the
    server's RetryInfo hint. `reset()` after progress."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self, hint: float | None = None) -> float:
        base = min(self.maximum, self.initial * (2.0 ** min(self.attempts, 60)))
        self.attempts += 1
        delay = base * self._rng.uniform(0.5, 1.0)
        if hint is not None:
            delay = max(delay, hint)  # the server knows its load better than we do
        return delay

    def reset(self) -> None:
        self.attempts = 0


@dataclass(frozen=True, slots=True)
class Rejection:
    """One point the service did not store, and why (`reason` is the
    RejectReason name without its prefix, e.g. "STEP_NOT_INCREASING")."""

    run_id: str
    name: str
    labels: Labels
    reason: str
    message: str
    step: int | None = None
    index: int = -1

    @property
    def series(self) -> tuple[str, str, Labels]:
        return (self.run_id, self.name, self.labels)

    @classmethod
    def from_proto(cls, point: pb.RejectedPoint) -> Rejection:
        return cls(
            run_id=point.run_id,
            name=point.name,
            labels=tuple(sorted(point.labels.items())),
            reason=reason_name(point.reason),
            message=point.message,
            step=point.step if point.HasField("step") else None,
            index=int(point.index),
        )


def reason_name(reason: int) -> str:
    """ "STEP_NOT_INCREASING" for REJECT_REASON_STEP_NOT_INCREASING."""
    try:
        name = pb.RejectReason.Name(reason)  # type: ignore[arg-type]
    except ValueError:
        return f"REASON_{reason}"
    return name.removeprefix("REJECT_REASON_")


# -- channels: TLS, mutual TLS and the bearer token ---------------------------------

PemSource = str | os.PathLike[str] | bytes
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _flag(value: str, name: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgumentError(f"{name}={value!r}: must be true or false", field=name)


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


class _BearerToken(grpc.AuthMetadataPlugin):
    """`authorization: Bearer <token>` on every call, under TLS."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

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
        self._pair = ("authorization", f"Bearer {token}")

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

    def open(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A new channel to the target with these settings."""
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
            )
            if self.token:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.metadata_call_credentials(_BearerToken(self.token))
                )
            return grpc.secure_channel(self.target, credentials, options=opts)
        channel = grpc.insecure_channel(self.target, options=opts)
        if self.token:
            return grpc.intercept_channel(channel, _MetadataInterceptor(self.token))
        return channel
