"""IngestService: the bidirectional stream and the unary Write."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ingest import model
from ingest.batch import DecodedBatch, Outcome
from ingest.decode import decode_batch
from ingest.errors import ApiError, StoreUnavailable
from ingest.metrics import Metrics
from ingest.pipeline import Pipeline
from ingest.servicers.common import abort_with, handle_errors
from ingest.timescale import CommitResult
from ingest.validate import Limits
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import ingest_service_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

# Acks waiting to be sent per stream; with the pipeline's own bound this caps
# what one stream can have in flight.
_MAX_IN_FLIGHT = 64


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


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, pipeline: Pipeline, limits: Limits, metrics: Metrics) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.metrics = metrics
        self._writers: dict[str, int] = {}

    def _decode(self, request: pb.IngestRequest | pb.WriteRequest) -> DecodedBatch:
        workspace = model.workspace_name(request.workspace)
        return decode_batch(
            workspace, request.batch, time.time(), self.limits, nbytes=request.ByteSize()
        )

    @handle_errors
    async def Write(self, request: pb.WriteRequest, context: Ctx) -> pb.WriteResponse:
        batch = self._decode(request)
        result = await (await self.pipeline.submit(batch))
        if result.gap is not None:
            raise ApiError("ABORTED", str(result.gap), "batch.sequence")
        if result.duplicate_batch:
            # With what the original commit decided, while the service keeps it.
            original = result_to_proto(result.original) if result.original is not None else None
            return pb.WriteResponse(duplicate_batch=True, result=original)
        return pb.WriteResponse(result=result_to_proto(batch.outcome))

    async def Ingest(
        self, request_iterator: AsyncIterator[pb.IngestRequest], context: Ctx
    ) -> AsyncIterator[pb.IngestResponse]:
        """Read batches, queue them for commit, and answer each with an ack once
        it is committed, in the order received. A full pipeline makes `submit`
        wait, so this stream stops being read (backpressure)."""
        in_flight: asyncio.Queue[
            tuple[DecodedBatch, asyncio.Future[CommitResult]] | BaseException | None
        ] = asyncio.Queue(_MAX_IN_FLIGHT)
        writers: set[str] = set()
        self.metrics.active_streams.inc()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    batch = self._decode(request)
                    if batch.writer_id not in writers:
                        writers.add(batch.writer_id)
                        self._writer_joined(batch.writer_id)
                    fut = await self.pipeline.submit(batch)
                    await in_flight.put((batch, fut))
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
                    await abort_with(context, item)
                    return
                batch, fut = item
                try:
                    result = await fut
                except (StoreUnavailable, ApiError) as exc:
                    await abort_with(context, exc)
                    return
                except Exception:
                    await context.abort(grpc.StatusCode.INTERNAL, "commit failed; resend")
                    return
                if result.gap is not None:
                    await context.abort(grpc.StatusCode.ABORTED, str(result.gap))
                    return
                if result.duplicate_batch:
                    original = (
                        result_to_proto(result.original) if result.original is not None else None
                    )
                    yield pb.IngestResponse(
                        sequence=batch.sequence, duplicate_batch=True, result=original
                    )
                else:
                    yield pb.IngestResponse(
                        sequence=batch.sequence, result=result_to_proto(batch.outcome)
                    )
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for w in writers:
                self._writer_left(w)
            self.metrics.active_streams.dec()

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
