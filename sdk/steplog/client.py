"""The connection to a steplog service: one channel and one background writer
per (address, workspace, connection settings) in a process, shared by every
Experiment and Run; a stream of `Run.new_stream` has a writer of its own
(`Client.independent`) on the same channel, driven by the process's one
thread for streams. How channels are opened (TLS, mutual TLS, the token) is
steplog._channel.ChannelSettings: every channel here comes from it."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack, cast

import grpc

from steplog import _lifecycle, _settings
from steplog._channel import ChannelSettings, PemSource
from steplog._writer.transport import Backoff, TransportError
from steplog.errors import InvalidArgumentError, SteplogError, from_rpc_error
from steplog.v1 import (
    experiment_service_pb2,
    experiment_service_pb2_grpc,
    ingest_service_pb2_grpc,
    query_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
)

if TYPE_CHECKING:
    from steplog._writer.sender import Sender
    from steplog._writer.writer import BatchWriter

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


# Backoff between attempts of a unary call (seconds; Client.call).
CALL_BACKOFF_INITIAL = 0.1
CALL_BACKOFF_MAX = 2.0
# How long creating a run waits for the streams' connection (connect_streams).
STREAM_CONNECT_TIMEOUT_S = 2.0


def resend_safe(request: Any) -> bool:
    """Whether sending `request` again after its answer was lost changes
    nothing more than the first time (checked against the service's store).

    Everything the client sends is, except: DeleteExperiment (a resend after
    the delete answers NOT_FOUND) and ReactivateExperiment with a new name
    (the old name is gone after the first). CreateRun is idempotent only
    with a run id (`with_client_run_id` gives it one); UpdateRunStatus into
    a terminal status is refused the second time, which `Client.call`
    recognises as done."""
    if isinstance(request, experiment_service_pb2.DeleteExperimentRequest):
        return False
    if isinstance(request, experiment_service_pb2.ReactivateExperimentRequest):
        return not request.new_name
    if isinstance(request, run_service_pb2.CreateRunRequest):
        return bool(request.run_id)
    return True


def with_client_run_id(request: Any) -> Any:
    """A CreateRunRequest without a run id gets one here, in the form the
    service would have given it (`<experiment[:100]>_<20 hex digits>`), so
    that a resend finds the run the first attempt created instead of making
    a second one. Any other request is returned as it is."""
    if not isinstance(request, run_service_pb2.CreateRunRequest) or request.run_id:
        return request
    named = run_service_pb2.CreateRunRequest()
    named.CopyFrom(request)
    named.run_id = f"{request.experiment_name[:100]}_{uuid.uuid4().hex[:20]}"
    return named


def resolve_url(url: str | None) -> str:
    value = url or _settings.text("STEPLOG_URL")
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
    return workspace or _settings.text("STEPLOG_WORKSPACE") or DEFAULT_WORKSPACE


class Client:
    """Stubs for every service, a call helper that raises typed errors, and
    the process's background writer for this address and workspace.

    `settings` says how to connect (TLS, client certificate, token); without
    it they come from the environment (ChannelSettings.resolve)."""

    def __init__(
        self,
        url: str,
        workspace: str,
        settings: ChannelSettings | None = None,
        *,
        channel: grpc.Channel | None = None,
        writer_overrides: Mapping[str, Any] | None = None,
        sender: Sender | None = None,
    ) -> None:
        self.settings = settings or ChannelSettings.resolve(url)
        # WriterSettings fields given here win over STEPLOG_* variables.
        self._writer_overrides = dict(writer_overrides or {})
        # The thread that drives its writer's lanes: None, one of its own.
        self._sender = sender
        self.url = self.settings.target
        self.workspace = workspace
        self._lock = threading.Lock()
        self._pid = os.getpid()
        if channel is None:
            self._open_channel()
        else:
            self._use_channel(channel)
        self._writer: BatchWriter | None = None
        self.heartbeat = Heartbeat(self)

    def independent(self, *, share_channel: bool = True, **writer_overrides: Any) -> Client:
        """A client for the same address, workspace and connection settings
        with a background writer of its own (`Run.new_stream`): its own
        writer id, sequence numbers, stream, buffers, memory bound
        (STEPLOG_MAX_BUFFERED_BYTES), window and spool, so its points are
        delivered and acknowledged independently of this client's. Its
        writer has no thread of its own: the process's one thread for
        streams (steplog._writer.sender.shared_sender) drives every such
        writer, each visited once per round. It shares this client's gRPC
        channel (one connection; gRPC carries many streams on it) unless
        `share_channel` is False. `writer_overrides` are WriterSettings
        fields for its writer (say `max_buffered_bytes`). Not cached: every
        call makes another."""
        from steplog._writer.sender import shared_sender

        self._check_fork()
        return Client(
            self.url,
            self.workspace,
            self.settings,
            channel=self.channel if share_channel else None,
            writer_overrides={**self._writer_overrides, **writer_overrides},
            sender=shared_sender(),
        )

    def close_writer(self, timeout: float | None = None) -> bool:
        """Flush this client's writer and stop it (`Run.close` of a stream:
        its lanes leave the shared thread, which goes on with the others),
        within `timeout`; True when everything was delivered. Points logged
        through it afterwards are dropped with a warning (counted)."""
        writer = self._writer
        return True if writer is None else writer.close(timeout)

    def _after_fork_in_child(self) -> None:
        """A lock another thread held at fork() would stay held in the child."""
        self._lock = threading.Lock()

    def new_channel(self) -> grpc.Channel:
        """A new channel with this client's settings (a forked child's writer)."""
        return self.settings.open(_CHANNEL_OPTIONS)

    def _stream_io(self, stream_io: str) -> dict[str, Any]:
        """GrpcTransport's arguments for streams on the process's asyncio
        loop (steplog._writer.aio_streams): one aio channel per sync channel
        shared, so writers that share a connection share it there too."""
        if stream_io != "loop":
            return {}
        settings = self.settings
        key = (settings, id(self.channel))
        return {
            "stream_channel": (key, lambda: settings.open_aio(_CHANNEL_OPTIONS)),
            "stream_metadata": settings.plaintext_metadata(),
        }

    def connect_streams(self, timeout: float = STREAM_CONNECT_TIMEOUT_S) -> bool:
        """With STEPLOG_STREAM_IO=loop, open the streams' connection (the
        process's aio channel for this client) now, waiting at most
        `timeout` seconds: called where the caller already waits on the
        network (a run is created), so the first batch does not wait for a
        handshake. True when it is connected, or there is nothing to open
        (threads, offline, a forked child); a False is no error (the first
        stream connects as usual)."""
        from steplog._writer.settings import WriterSettings

        settings = WriterSettings.from_env(**self._writer_overrides)
        stream = self._stream_io(settings.stream_io).get("stream_channel")
        if settings.offline or stream is None:
            return True
        from steplog._writer import aio_streams

        io = aio_streams.io_loop()
        if not io.usable:
            return True
        key, factory = stream
        return io.connect(key, factory, timeout)

    def _open_channel(self) -> None:
        self._use_channel(self.new_channel())

    def _use_channel(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.experiments = experiment_service_pb2_grpc.ExperimentServiceStub(self.channel)
        self.runs = run_service_pb2_grpc.RunServiceStub(self.channel)
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.queries = query_service_pb2_grpc.QueryServiceStub(self.channel)

    def call(self, method: Callable[..., T], request: Any, timeout: float = 30.0) -> T:
        """A unary call; errors become steplog exceptions (with code and field).

        Failures are retried by the one table (steplog._retry) within
        `timeout`, with jittered backoff (CALL_BACKOFF_INITIAL doubling up to
        CALL_BACKOFF_MAX, at least the service's RetryInfo): UNAVAILABLE
        (also a load balancer's HTTP 502 while a replica is down), a lost
        stream or connection, RESOURCE_EXHAUSTED with RetryInfo, an INTERNAL
        or UNKNOWN the service sent (3 attempts). Each attempt gets what is
        left of `timeout`; the last error is raised when it is spent. Only
        requests the service applies idempotently are sent twice (see
        `resend_safe`); a status change that the lost answer had already
        made is recognised as done (`_applied_before`)."""
        self._check_fork()
        request = with_client_run_id(request)
        deadline = time.monotonic() + timeout
        backoff = Backoff(CALL_BACKOFF_INITIAL, CALL_BACKOFF_MAX)
        failures = 0
        while True:
            remaining = max(0.001, deadline - time.monotonic())
            try:
                return method(request, timeout=remaining, wait_for_ready=True)
            except grpc.RpcError as err:
                failure = TransportError.from_rpc_error(err)
                if failures:
                    done = self._applied_before(request, failure, deadline)
                    if done is not None:
                        return cast(T, done)
                failures += 1
                if not (resend_safe(request) and failure.retry_again(failures)):
                    raise from_rpc_error(err) from None
                delay = backoff.next_delay(failure.retry_after)
                if time.monotonic() + delay >= deadline:
                    raise from_rpc_error(err) from None
            time.sleep(delay)

    def _applied_before(self, request: Any, failure: TransportError, deadline: float) -> Any:
        """A resent status change refused as FAILED_PRECONDITION ("run is
        Completed, a terminal state; it cannot become Completed") because
        the first attempt was applied and only its answer was lost: the
        response it would have had (the run as it is), else None."""
        if not (
            isinstance(request, run_service_pb2.UpdateRunStatusRequest)
            and failure.code == grpc.StatusCode.FAILED_PRECONDITION
        ):
            return None
        try:
            run = self.runs.GetRun(
                run_service_pb2.GetRunRequest(workspace=request.workspace, run_id=request.run_id),
                timeout=max(0.001, deadline - time.monotonic()),
                wait_for_ready=True,
            ).run
        except grpc.RpcError:
            return None
        if run.status != request.status:
            return None
        return run_service_pb2.UpdateRunStatusResponse(run=run)

    def _check_fork(self) -> None:
        # A gRPC channel must not be used across fork(): a child opens its own.
        if os.getpid() != self._pid:
            with self._lock:
                if os.getpid() != self._pid:
                    self._pid = os.getpid()
                    self._open_channel()

    @property
    def writer(self) -> BatchWriter:
        """The background BatchWriter, started on first use. Its settings come
        from STEPLOG_* variables (STEPLOG_ON_FULL, STEPLOG_SPOOL_DIR,
        STEPLOG_OFFLINE, ...); offline, it writes the spool only."""
        writer = self._writer
        if writer is None:
            with self._lock:
                writer = self._writer
                if writer is None:
                    from steplog._writer.settings import WriterSettings
                    from steplog._writer.transport import GrpcTransport
                    from steplog._writer.writer import BatchWriter

                    settings = WriterSettings.from_env(**self._writer_overrides)
                    transport = None
                    if not settings.offline:
                        transport = GrpcTransport(
                            self.channel,
                            channel_factory=self.new_channel,
                            **self._stream_io(settings.stream_io),
                        )
                    writer = self._writer = BatchWriter(
                        transport, self.workspace, settings, sender=self._sender
                    )
        return writer

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged is acknowledged and every background
        upload (upload_file(..., wait=False)) has finished; one deadline."""
        from steplog import _uploads

        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True if self._writer is None else self._writer.flush(timeout)
        uploads = _uploads.current_uploader(self)
        if uploads is not None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = uploads.wait(remaining) and ok
        return ok


class Heartbeat:
    """Tells the service, every `interval` seconds, that this process's
    Running runs are alive, so a silent run reads as NotResponding and a
    crashed process's run stands out. One daemon thread, started lazily.

    It is not the writer's thread: a beat is a unary call retried for up to
    10 s, and the writer's thread must never wait on the network (it would
    hold both streams for that long during an outage); a run that logs
    nothing still beats."""

    def __init__(self, client: Client, interval: float | None = None) -> None:
        self._client = client
        self.interval = interval or _settings.number("STEPLOG_HEARTBEAT_INTERVAL", 30.0)
        self._runs: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # The status each run had in the last beat's answer (RunStatus
        # numbers), and who wants to hear when it changes: Run.should_stop()
        # and Run.on_cancel_requested() read these, with no call of their own.
        self._seen: dict[str, int] = {}
        self._listeners: dict[str, list[Callable[[int], None]]] = {}

    def seen_status(self, run_id: str) -> int | None:
        """The run's status in the last heartbeat answer (None before one)."""
        with self._lock:
            return self._seen.get(run_id)

    def listen(self, run_id: str, fn: Callable[[int], None]) -> None:
        """Call `fn(status)` on the heartbeat thread whenever a beat's answer
        brings another status for the run than the one before."""
        with self._lock:
            self._listeners.setdefault(run_id, []).append(fn)

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

    def _after_fork_in_child(self) -> None:
        """The parent's thread does not exist in the child and a lock it held
        would stay held: fresh ones; the parent keeps beating for its runs."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._runs = set()

    def _loop(self) -> None:
        while not self._wake.wait(self.interval):
            with self._lock:
                runs = sorted(self._runs)
            if not runs:
                continue
            # Retried within 10 s (Client.call); a beat that still fails is
            # made up for by the next one; data also counts as a beat.
            try:
                reply = self._client.call(
                    self._client.runs.Heartbeat,
                    run_service_pb2.HeartbeatRequest(
                        workspace=self._client.workspace, run_ids=runs
                    ),
                    timeout=10,
                )
            except SteplogError:
                continue
            self._note(runs, list(reply.statuses))

    def _note(self, runs: list[str], statuses: list[int]) -> None:
        """Remember each run's status; tell its listeners when it changed
        (outside the lock; a listener's exception is logged, never raised)."""
        calls: list[tuple[Callable[[int], None], int]] = []
        with self._lock:
            for run_id, status in zip(runs, statuses, strict=False):
                if self._seen.get(run_id) != status:
                    self._seen[run_id] = status
                    calls.extend((fn, status) for fn in self._listeners.get(run_id, ()))
        for fn, status in calls:
            try:
                fn(status)
            except Exception:  # a user's callback must not end the heartbeat
                logging.getLogger("steplog").exception("a run status callback raised")


_clients: dict[tuple[str, str, ChannelSettings], Client] = {}
_clients_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()
    for client in list(_clients.values()):
        client._after_fork_in_child()
        client.heartbeat._after_fork_in_child()


_lifecycle.on_fork(_reset_after_fork)


class Connection(TypedDict, total=False):
    """Connection keyword arguments of Experiment, Run.get, Run.get_context
    and get_client; each one left out comes from its variable.

    token (STEPLOG_TOKEN), tls (STEPLOG_TLS: TLS with the system CAs),
    tls_ca (STEPLOG_TLS_CA), tls_cert / tls_key (STEPLOG_TLS_CERT /
    STEPLOG_TLS_KEY: mutual TLS), tls_server_name (STEPLOG_TLS_SERVER_NAME),
    allow_insecure_token (STEPLOG_ALLOW_INSECURE_TOKEN). PEM values are a path
    or the PEM bytes. See steplog._channel.ChannelSettings."""

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
