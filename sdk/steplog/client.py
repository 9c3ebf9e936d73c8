"""The connection to a steplog service: one channel and one background writer
per (address, workspace, connection settings) in a process, shared by every
Experiment and Run. How channels are opened (TLS, mutual TLS, the token) is
steplog._transport.ChannelSettings: every channel here comes from it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypedDict, TypeVar, Unpack

import grpc

from steplog._transport import ChannelSettings, PemSource
from steplog.errors import InvalidArgumentError, from_rpc_error
from steplog.v1 import (
    experiment_service_pb2_grpc,
    ingest_service_pb2_grpc,
    query_service_pb2_grpc,
    run_service_pb2_grpc,
)

T = TypeVar("T")

DEFAULT_WORKSPACE = "default"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
    # Behind a headless Kubernetes service DNS names every replica: spread
    # calls over them instead of pinning the process to the first.
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
]


def resolve_url(url: str | None) -> str:
    value = url or os.environ.get("STEPLOG_URL", "")
    if not value:
        raise InvalidArgumentError(
            "no service address: pass url=... or set STEPLOG_URL (for example 127.0.0.1:50051)",
            field="url",
        )
    for prefix in ("grpc://", "http://"):
        if value.startswith(prefix):
            value = value[len(prefix) :]
    return value.rstrip("/")


def resolve_workspace(workspace: str | None) -> str:
    return workspace or os.environ.get("STEPLOG_WORKSPACE") or DEFAULT_WORKSPACE


class Client:
    """Stubs for every service, a call helper that raises typed errors, and
    the process's background writer for this address and workspace.

    `settings` says how to connect (TLS, client certificate, token); without
    it they come from the environment (ChannelSettings.resolve)."""

    def __init__(self, url: str, workspace: str, settings: ChannelSettings | None = None) -> None:
        self.settings = settings or ChannelSettings.resolve(url)
        self.url = self.settings.target
        self.workspace = workspace
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._open_channel()
        self._writer: Any = None
        self.heartbeat = Heartbeat(self)

    def new_channel(self) -> grpc.Channel:
        """A new channel with this client's settings (a forked child's writer)."""
        return self.settings.open(_CHANNEL_OPTIONS)

    def _open_channel(self) -> None:
        self.channel = self.new_channel()
        self.experiments = experiment_service_pb2_grpc.ExperimentServiceStub(self.channel)
        self.runs = run_service_pb2_grpc.RunServiceStub(self.channel)
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.queries = query_service_pb2_grpc.QueryServiceStub(self.channel)

    def call(self, method: Callable[..., T], request: Any, timeout: float = 30.0) -> T:
        """A unary call; errors become steplog exceptions (with code and field)."""
        self._check_fork()
        try:
            return method(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _check_fork(self) -> None:
        # A gRPC channel must not be used across fork(): a child opens its own.
        if os.getpid() != self._pid:
            with self._lock:
                if os.getpid() != self._pid:
                    self._pid = os.getpid()
                    self._open_channel()

    @property
    def writer(self) -> Any:
        """The background BatchWriter, started on first use. Its settings come
        from STEPLOG_* variables (STEPLOG_ON_FULL, STEPLOG_SPOOL_DIR,
        STEPLOG_OFFLINE, ...); offline, it writes the spool only."""
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    from steplog._writer import BatchWriter, GrpcTransport, WriterSettings

                    settings = WriterSettings.from_env()
                    transport = None
                    if not settings.offline:
                        transport = GrpcTransport(self.channel, channel_factory=self.new_channel)
                    self._writer = BatchWriter(transport, self.workspace, settings)
        return self._writer

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged is acknowledged and every background
        upload (upload_file(..., wait=False)) has finished; one deadline."""
        from steplog import _uploads

        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True if self._writer is None else bool(self._writer.flush(timeout))
        uploads = _uploads.current_uploader(self)
        if uploads is not None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = uploads.wait(remaining) and ok
        return ok


class Heartbeat:
    """Tells the service, every `interval` seconds, that this process's
    Running runs are alive, so a silent run reads as NotResponding and a
    crashed process's run stands out. One daemon thread, started lazily."""

    def __init__(self, client: Client, interval: float | None = None) -> None:
        self._client = client
        self.interval = interval or float(os.environ.get("STEPLOG_HEARTBEAT_INTERVAL", "30"))
        self._runs: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, run_id: str) -> None:
        with self._lock:
            self._runs.add(run_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="steplog-heartbeat", daemon=True
                )
                self._thread.start()

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._runs.discard(run_id)

    def _loop(self) -> None:
        from steplog.v1 import run_service_pb2

        while not self._wake.wait(self.interval):
            with self._lock:
                runs = sorted(self._runs)
            if not runs:
                continue
            # A failed beat is retried by the next one; data also counts as a beat.
            with contextlib.suppress(grpc.RpcError):
                self._client.runs.Heartbeat(
                    run_service_pb2.HeartbeatRequest(
                        workspace=self._client.workspace, run_ids=runs
                    ),
                    timeout=10,
                )


_clients: dict[tuple[str, str, ChannelSettings], Client] = {}
_clients_lock = threading.Lock()


class Connection(TypedDict, total=False):
    """Connection keyword arguments of Experiment, Run.get, Run.get_context
    and get_client; each one left out comes from its variable.

    token (STEPLOG_TOKEN), tls (STEPLOG_TLS: TLS with the system CAs),
    tls_ca (STEPLOG_TLS_CA), tls_cert / tls_key (STEPLOG_TLS_CERT /
    STEPLOG_TLS_KEY: mutual TLS), tls_server_name (STEPLOG_TLS_SERVER_NAME),
    allow_insecure_token (STEPLOG_ALLOW_INSECURE_TOKEN). PEM values are a path
    or the PEM bytes. See steplog._transport.ChannelSettings."""

    token: str
    tls: bool
    tls_ca: PemSource
    tls_cert: PemSource
    tls_key: PemSource
    tls_server_name: str
    allow_insecure_token: bool


def get_client(
    url: str | None = None, workspace: str | None = None, **connection: Unpack[Connection]
) -> Client:
    """The process's client for this address, workspace and connection
    settings. A token that would go in plaintext to a host that is not
    loopback raises InvalidArgumentError here, before anything is sent."""
    settings = ChannelSettings.resolve(resolve_url(url), **connection)
    key = (settings.target, resolve_workspace(workspace), settings)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(key[0], key[1], settings)
        return client
