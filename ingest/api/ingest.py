"""IngestService: the bidirectional stream and the unary Write.

Memory. Every request is charged, in bytes, against bounds: its stream's
in-flight bytes (received and not yet acknowledged, committed or not), the
service's in-flight bytes (every stream and call together), and the write
pipeline's queue (until commit). The charge starts at the size on the wire
before the message is decoded, grows to what the decoded batch holds
(`batch_cost`), and shrinks to what the ack needs once the batch is
committed (the pipeline drops its arrays then). A request with images is
also charged, while it decodes, the pixels of the largest image it decodes
(core.images.peak_decoded_bytes, from the headers; capped so that it and its
own bytes fit the service's bound): images are decoded one at a time, and
their pixels are freed before the batch is queued. While a bound is full the
stream is not read: gRPC flow control pushes back on the client. A request
that waits longer than `wait_s` for room is shed: RESOURCE_EXHAUSTED with a
google.rpc.RetryInfo detail.

Rate quotas (ingest/store/quotas.py). A decoded request takes its points and its
size on the wire from its workspace's buckets before it is submitted (and
so before any of its blobs is stored); over a quota it waits a moment, or is
answered RESOURCE_EXHAUSTED with RetryInfo saying when to resend.

The event loop. The two methods are registered raw (`add_to_server`): the
handler gets the request's bytes, so parsing a large message, decoding and
validating it (image hashes and checksums included) run in a small thread
pool, one message of a stream at a time (a writer's order is kept). Small
messages stay on the loop, where they cost less than the hop to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ingest.api.common import abort_with, rich_status
from ingest.core import model
from ingest.core.batch import CommitResult, DecodedBatch, Outcome
from ingest.core.decode import decode_batch
from ingest.core.errors import ApiError, StoreUnavailable, invalid
from ingest.core.images import peak_decoded_bytes
from ingest.core.validate import Limits
from ingest.observe.metrics import Metrics
from ingest.store.quotas import Quotas, RateLimited
from ingest.write.backpressure import ACK_BYTES, ByteBudget, Overloaded, batch_cost
from ingest.write.pipeline import Pipeline
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import ingest_service_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request", pb.IngestRequest, pb.WriteRequest)

# Acks waiting to be sent per stream (a count bound beside the byte bound).
_MAX_IN_FLIGHT = 64
# Messages up to this size are parsed on the loop, and decoded there too when
# they hold few series (decoding costs about 50 µs per series, parsing about
# 1 ms per MiB); anything bigger goes to the thread pool.
INLINE_BYTES = 64 * 1024
INLINE_SERIES = 32

SERVICE = "steplog.v1.IngestService"
SWITCH_INTERVAL_S = 0.001


def result_to_proto(outcome: Outcome) -> pb.BatchResult:
    return pb.BatchResult(
        accepted=outcome.accepted,
        duplicates=outcome.duplicates,
        rejected=outcome.rejected,
        reject_counts=[
            pb.RejectCount(reason=reason, count=n)  # type: ignore[arg-type]
            for reason, n in sorted(outcome.by_reason.items())
        ],
        rejected_points=[
            pb.RejectedPoint(
                run_id=run_id,
                name=name,
                labels=labels,
                index=index,
                step=step,
                reason=reason,  # type: ignore[arg-type]
                message=message,
            )
            for run_id, name, labels, index, step, reason, message in outcome.examples
        ],
    )


@dataclass
class _Charge:
    """The bytes one request holds against its bounds."""

    budgets: tuple[tuple[str, ByteBudget], ...]
    n: int = 0

    async def reserve(self, n: int, wait: float | None) -> None:
        taken: list[ByteBudget] = []
        for name, budget in self.budgets:
            try:
                await budget.acquire(n, wait)
            except BaseException as exc:
                for b in taken:
                    b.release(n)
                if isinstance(exc, TimeoutError):
                    raise Overloaded(
                        f"the {name} in-flight bound ({budget.limit} bytes) stayed full for"
                        f" {wait} s; retry later",
                        bound=name,
                    ) from None
                raise
            taken.append(budget)
        self.n = n

    def resize(self, n: int) -> None:
        """Grow (no waiting: the memory is taken already) or shrink to n bytes."""
        for _, budget in self.budgets:
            if n > self.n:
                budget.force(n - self.n)
            else:
                budget.release(self.n - n)
        self.n = n

    def release(self) -> None:
        self.resize(0)


@dataclass(eq=False)
class _Pending:
    batch: DecodedBatch
    future: asyncio.Future[CommitResult]
    charge: _Charge = field(repr=False)


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        limits: Limits,
        metrics: Metrics,
        stream_bytes: int = 64 * 1024 * 1024,
        inflight_bytes: int = 1024 * 1024 * 1024,
        wait_s: float = 30.0,
        decode_threads: int = 2,
        quotas: Quotas | None = None,
    ) -> None:
        self.quotas = quotas
        self.pipeline = pipeline
        self.limits = limits
        self.metrics = metrics
        self.stream_bytes = stream_bytes
        self.wait_s = wait_s
        self.inflight = ByteBudget(inflight_bytes, on_change=metrics.inflight_bytes.inc)
        self._executor = ThreadPoolExecutor(decode_threads, thread_name_prefix="steplog-decode")
        self._writers: dict[str, int] = {}

    # -- decoding -----------------------------------------------------------------------

    def _decode_request(
        self, request: pb.IngestRequest | pb.WriteRequest, nbytes: int
    ) -> tuple[DecodedBatch, int]:
        workspace = model.workspace_name(request.workspace)
        batch = decode_batch(workspace, request.batch, time.time(), self.limits, nbytes=nbytes)
        return batch, batch_cost(batch)

    def _parse_and_decode(
        self, raw: bytes, cls: type[Request]
    ) -> tuple[DecodedBatch, int] | tuple[Request, int]:
        """In the thread pool: the decoded batch and its bytes, or for a
        request with images the parsed request and the pixels its largest
        image decodes to (decoded once they are charged)."""
        request = _parse(raw, cls)
        if _has_images(request):
            return request, peak_decoded_bytes(request.batch, self.limits.max_image_bytes)
        return self._decode_request(request, len(raw))

    async def _decode(
        self, raw: bytes | Request, cls: type[Request], held: int = 0
    ) -> tuple[DecodedBatch, int]:
        """Decode and validate one request: on the loop when it is small, else
        in the thread pool. Returns the batch and the bytes it holds.

        held: the bytes the request holds of the service's bound already."""
        loop = asyncio.get_running_loop()
        pixels: int | None = None
        if not isinstance(raw, bytes):  # registered with a deserializer (tests, old wiring)
            request, size = raw, raw.ByteSize()
        elif len(raw) > INLINE_BYTES:
            done = await loop.run_in_executor(self._executor, self._parse_and_decode, raw, cls)
            if isinstance(done[0], DecodedBatch):
                return done[0], done[1]
            request, size, pixels = done[0], len(raw), done[1]
        else:
            request, size = _parse(raw, cls), len(raw)
        series = request.batch.series
        # Images are decoded in full (core.images, Pillow): never on the loop.
        if pixels is None and not _has_images(request):
            if len(series) <= INLINE_SERIES:
                return self._decode_request(request, size)
            return await loop.run_in_executor(self._executor, self._decode_request, request, size)
        if pixels is None:
            pixels = await loop.run_in_executor(
                self._executor, peak_decoded_bytes, request.batch, self.limits.max_image_bytes
            )
        # The pixels are held only while this request decodes. Capped, so a
        # request over the whole bound passes when it is alone (as ByteBudget
        # lets a large request pass), instead of waiting for itself.
        charge = _Charge((("service", self.inflight),))
        await charge.reserve(min(pixels, max(0, self.inflight.limit - held)), self.wait_s)
        try:
            return await loop.run_in_executor(self._executor, self._decode_request, request, size)
        finally:
            charge.release()

    # -- the unary call -----------------------------------------------------------------

    async def Write(self, request: bytes | pb.WriteRequest, context: Ctx) -> pb.WriteResponse:
        charge = _Charge((("service", self.inflight),))
        try:
            wire = _size(request)
            await charge.reserve(wire, self.wait_s)
            batch, cost = await self._decode(request, pb.WriteRequest, charge.n)
            del request
            charge.resize(max(cost, charge.n))
            if self.quotas is not None:
                await self.quotas.admit(batch.workspace, batch.points, wire)
            result = await (await self.pipeline.submit(batch, cost=cost, wait=self.wait_s))
        except (Overloaded, RateLimited, ApiError, StoreUnavailable) as exc:
            await self._abort(context, exc)
            raise  # unreachable: abort raises
        finally:
            charge.release()
        if result.gap is not None:
            await abort_with(context, ApiError("ABORTED", str(result.gap), "batch.sequence"))
        if result.duplicate_batch:
            # What the commit that stored it decided, while the store keeps it.
            original = result.original
            if original is None:
                return pb.WriteResponse(duplicate_batch=True)
            return pb.WriteResponse(duplicate_batch=True, result=result_to_proto(original))
        return pb.WriteResponse(result=result_to_proto(batch.outcome))

    # -- the stream ---------------------------------------------------------------------

    async def Ingest(
        self, request_iterator: AsyncIterator[bytes | pb.IngestRequest], context: Ctx
    ) -> AsyncIterator[pb.IngestResponse]:
        """Read batches, queue them for commit, and answer each with an ack once
        it is committed, in the order received. A full bound (the stream's or
        the service's bytes in flight, the pipeline's queue) makes the reader
        wait, so this stream stops being read (backpressure)."""
        stream = ByteBudget(self.stream_bytes)
        budgets = (("stream", stream), ("service", self.inflight))
        in_flight: asyncio.Queue[_Pending | BaseException | None] = asyncio.Queue(_MAX_IN_FLIGHT)
        outstanding: set[_Pending] = set()
        writers: set[str] = set()
        self.metrics.active_streams.inc()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    charge = _Charge(budgets)
                    wire = _size(request)
                    await charge.reserve(wire, self.wait_s)
                    try:
                        batch, cost = await self._decode(request, pb.IngestRequest, charge.n)
                        del request  # the decoded batch holds what is needed
                        charge.resize(max(cost, charge.n))
                        if self.quotas is not None:
                            await self.quotas.admit(batch.workspace, batch.points, wire)
                        if batch.writer_id not in writers:
                            writers.add(batch.writer_id)
                            self._writer_joined(batch.writer_id)
                        fut = await self.pipeline.submit(batch, cost=cost, wait=self.wait_s)
                    except BaseException:
                        charge.release()
                        raise
                    # Committed: only the ack's bytes stay held until it is sent.
                    fut.add_done_callback(_shrinker(charge))
                    pending = _Pending(batch, fut, charge)
                    outstanding.add(pending)
                    await in_flight.put(pending)
                await in_flight.put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await in_flight.put(exc)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await in_flight.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    await self._abort(context, item)
                    return
                try:
                    result = await item.future
                except (StoreUnavailable, ApiError) as exc:
                    await self._abort(context, exc)
                    return
                except Exception:
                    await context.abort(grpc.StatusCode.INTERNAL, "commit failed; resend")
                    return
                if result.gap is not None:
                    await context.abort(grpc.StatusCode.ABORTED, str(result.gap))
                    return
                batch = item.batch
                if result.duplicate_batch:
                    response = pb.IngestResponse(sequence=batch.sequence, duplicate_batch=True)
                    if result.original is not None:
                        response.result.CopyFrom(result_to_proto(result.original))
                else:
                    response = pb.IngestResponse(
                        sequence=batch.sequence, result=result_to_proto(batch.outcome)
                    )
                yield response
                outstanding.discard(item)
                item.charge.release()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            # The client is told this stream failed: what it sent and we have
            # not committed yet must not commit behind its back (it resends).
            for p in outstanding:
                p.future.cancel()
                p.charge.release()
            for w in writers:
                self._writer_left(w)
            self.metrics.active_streams.dec()

    async def _abort(self, context: Ctx, exc: BaseException) -> None:
        if isinstance(exc, Overloaded):
            self.metrics.shed.labels(exc.bound).inc()
            await context.abort_with_status(rpc_status.to_status(overloaded_status(exc)))
        if isinstance(exc, RateLimited):
            await context.abort_with_status(rpc_status.to_status(overloaded_status(exc)))
        await abort_with(context, exc)

    def _writer_joined(self, writer_id: str) -> None:
        self._writers[writer_id] = self._writers.get(writer_id, 0) + 1
        self.metrics.active_writers.set(len(self._writers))

    def _writer_left(self, writer_id: str) -> None:
        n = self._writers.get(writer_id, 0) - 1
        if n <= 0:
            self._writers.pop(writer_id, None)
        else:
            self._writers[writer_id] = n
        self.metrics.active_writers.set(len(self._writers))


def _has_images(request: pb.IngestRequest | pb.WriteRequest) -> bool:
    return any(s.series.HasField("images") for s in request.batch.series)


def overloaded_status(exc: Overloaded | RateLimited) -> Any:
    """RESOURCE_EXHAUSTED with a RetryInfo detail: "slow down, try again in ..."."""
    status = rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(exc.retry_after * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status.details.append(detail)
    return status


def _shrinker(charge: _Charge) -> Callable[[asyncio.Future[CommitResult]], None]:
    def shrink(fut: asyncio.Future[CommitResult]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            charge.resize(min(charge.n, ACK_BYTES))

    return shrink


def _size(request: bytes | pb.IngestRequest | pb.WriteRequest) -> int:
    return len(request) if isinstance(request, bytes) else request.ByteSize()


def _parse(raw: bytes, cls: type[Request]) -> Request:
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise invalid(
            "request",
            f"not a valid {cls.DESCRIPTOR.full_name} message (malformed protobuf or a"
            " string that is not UTF-8)",
        ) from None


def add_to_server(servicer: IngestServicer, server: grpc.aio.Server) -> None:
    """Register the service with raw requests (bytes): the servicer parses
    them, off the event loop when they are large."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Ingest": grpc.stream_stream_rpc_method_handler(
            servicer.Ingest, response_serializer=pb.IngestResponse.SerializeToString
        ),
        "Write": grpc.unary_unary_rpc_method_handler(
            servicer.Write, response_serializer=pb.WriteResponse.SerializeToString
        ),
    }
    # The decode threads hold the GIL between bytecodes; the event loop needs it
    # back for every step of every other call. Python's default hand-over
    # interval (5 ms) made a small commit (about ten round trips) wait 50-100
    # ms beside a large decode; 1 ms keeps it to a few.
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
