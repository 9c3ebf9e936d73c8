"""The background writer's edge to the network.

The writer (steplog._writer.lane) only buffers, batches, sequences and retries; this
module is the only part of it that knows gRPC. It holds:

- `Transport` / `IngestStream`: the small protocol the writer talks to, so tests
  can plug in an in-memory fake and the writer core stays free of I/O;
- `GrpcTransport`: the real one. Its `Ingest` streams run on the process's one
  asyncio loop when it is given an aio channel factory (steplog._writer.aio_streams),
  else on the sync gRPC API (a bidirectional stream fed from a queue, with a
  reader thread that hands each acknowledgement to a callback); the unary
  `Write` for `steplog sync` is always sync;
- `TransportError`: a failed call, reduced to its status code, message and the
  server's RetryInfo hint;
- `Backoff`: jittered exponential backoff that honours that hint;
- `Rejection`: one rejected point as the service reported it.

How channels are opened (TLS, the token) is steplog._channel.
"""

from __future__ import annotations

import queue
import random
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.message import Message

from steplog._retry import retry_code, should_retry
from steplog.errors import SteplogError
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import ingest_service_pb2_grpc

if TYPE_CHECKING:
    import grpc.aio

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


def _retry_delay(status: Any) -> float | None:
    """The delay of the first google.rpc.RetryInfo detail of a
    google.rpc.Status, if any."""
    from google.rpc import error_details_pb2

    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return max(0.0, float(delay))
    return None


def retry_after_trailers(trailers: Sequence[tuple[str, object]] | None) -> float | None:
    """The RetryInfo delay in a call's trailing metadata
    (`grpc-status-details-bin`), if any."""
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            from google.rpc import status_pb2

            try:
                return _retry_delay(status_pb2.Status.FromString(value))
            except Exception:  # not a Status: no hint
                return None
    return None


def _stream_error(
    code: grpc.StatusCode, message: str, trailers: Sequence[tuple[str, object]] | None
) -> TransportError:
    return TransportError(code, message, retry_after_trailers(trailers))


def _retry_after(err: grpc.RpcError) -> float | None:
    """The RetryInfo delay in a failed sync call's trailers, if any."""
    try:
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)
    except Exception:  # no trailers, a mismatched status, grpc_status missing
        return None
    return None if status is None else _retry_delay(status)


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
    gRPC's own fork support enabled).

    `stream_channel` = (key, factory of a grpc.aio channel): streams run on the
    process's asyncio loop, on the aio channel made once per key (transports
    with the same key share one connection). `stream_metadata` goes on those
    streams (a token the aio channel does not add itself). A forked child's
    streams use the sync channel."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        channel_factory: Callable[[], grpc.Channel] | None = None,
        stream_channel: tuple[Hashable, Callable[[], grpc.aio.Channel]] | None = None,
        stream_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._channel = channel
        self._metadata = tuple(metadata)
        self._factory = channel_factory
        self._stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        self._stream_channel = stream_channel
        self._stream_metadata = (*self._metadata, *stream_metadata)

    def open_stream(self, on_response: ResponseCallback, on_done: DoneCallback) -> IngestStream:
        if self._stream_channel is not None:
            from steplog._writer import aio_streams

            io = aio_streams.io_loop()
            if io.usable:
                key, factory = self._stream_channel
                return aio_streams.AioStream(
                    io, key, factory, self._stream_metadata, on_response, on_done, _stream_error
                )
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
