"""The write pipeline: bounded queues, one worker per database connection,
group commit of many batches per transaction.

A writer's batches always go to the same worker (hash of its id), so they
commit in order. `submit` waits when that worker's queue is full: the
stream handler stops reading, gRPC flow control pushes back, and the client
slows down in its background thread. Memory stays bounded under overload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from dataclasses import dataclass, field

import asyncpg

from ingest.batch import REASON_NAMES, DecodedBatch
from ingest.errors import StoreUnavailable
from ingest.metrics import Metrics
from ingest.timescale import UNAVAILABLE_ERRORS, CommitResult, PointStore, _init_connection

log = logging.getLogger(__name__)

_RETRY_TX: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
)

_UNAVAILABLE: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, TimeoutError)

KIND_LABELS = {1: "scalar", 2: "table", 3: "image", 4: "evaluation"}


@dataclass
class _Item:
    batch: DecodedBatch
    future: asyncio.Future[CommitResult]


@dataclass
class _Worker:
    index: int
    queue: asyncio.Queue[_Item]
    conn: asyncpg.Connection | None = None
    task: asyncio.Task[None] | None = None
    backoff: float = 0.05
    pending: list[_Item] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        dsn: str,
        store: PointStore,
        metrics: Metrics,
        workers: int = 2,
        queue_batches: int = 256,
        group_points: int = 200_000,
    ) -> None:
        self.dsn = dsn
        self.store = store
        self.metrics = metrics
        self.group_points = group_points
        per_worker = max(1, queue_batches // workers)
        self._workers = [_Worker(i, asyncio.Queue(per_worker)) for i in range(workers)]
        self._closing = False

    async def start(self) -> None:
        for w in self._workers:
            w.task = asyncio.create_task(self._run(w), name=f"steplog-pipeline-{w.index}")

    async def submit(self, batch: DecodedBatch) -> asyncio.Future[CommitResult]:
        """Queue a batch; waits while the pipeline is full (backpressure).
        The future resolves after the batch's transaction commits."""
        if self._closing:
            raise StoreUnavailable("the service is shutting down")
        worker = self._workers[zlib.crc32(batch.writer_id.encode()) % len(self._workers)]
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self.metrics.queue_bytes.inc(batch.nbytes)
        await worker.queue.put(_Item(batch, fut))
        self.metrics.queue_batches.inc()
        return fut

    async def close(self, grace: float = 10.0) -> None:
        """Drain what is queued (up to timeout), then stop the workers."""
        self._closing = True
        deadline = time.monotonic() + grace
        while any(not w.queue.empty() or w.pending for w in self._workers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for w in self._workers:
            if w.task is not None:
                w.task.cancel()
        for w in self._workers:
            if w.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await w.task
            self._fail(w, list(w.pending) + self._drain(w.queue), StoreUnavailable("shutting down"))
            if w.conn is not None:
                await w.conn.close(timeout=2)

    async def _connect(self, w: _Worker) -> asyncpg.Connection:
        while w.conn is None or w.conn.is_closed():
            try:
                w.conn = await asyncpg.connect(self.dsn, timeout=5)
                await _init_connection(w.conn)
                w.backoff = 0.05
            except _UNAVAILABLE as exc:
                w.conn = None
                # Batches waiting meanwhile fail fast: their clients resend later.
                self._fail(
                    w, self._drain(w.queue), StoreUnavailable(f"database unavailable: {exc}")
                )
                self.metrics.db_errors.labels("connect", "unavailable").inc()
                await asyncio.sleep(w.backoff * (0.5 + random.random()))
                w.backoff = min(w.backoff * 2, 2.0)
        return w.conn

    async def _run(self, w: _Worker) -> None:
        while True:
            first = await w.queue.get()
            group = [first]
            points = first.batch.points
            while points < self.group_points and not w.queue.empty():
                item = w.queue.get_nowait()
                group.append(item)
                points += item.batch.points
            w.pending = group
            self.metrics.queue_batches.dec(len(group))
            try:
                await self._commit(w, group)
            finally:
                self.metrics.queue_bytes.dec(sum(i.batch.nbytes for i in group))
                w.pending = []

    async def _commit(self, w: _Worker, group: list[_Item]) -> None:
        batches = [i.batch for i in group]
        for attempt in range(5):
            conn = await self._connect(w)
            started = time.perf_counter()
            try:
                results, _stats = await self.store.commit_group(conn, batches)
            except _RETRY_TX as exc:
                self.metrics.db_errors.labels("commit", "retry").inc()
                log.info("group commit conflict (%s); retrying", type(exc).__name__)
                _reset_outcomes(batches)
                await asyncio.sleep(0.01 * (attempt + 1) * random.random())
                continue
            except _UNAVAILABLE as exc:
                self.metrics.db_errors.labels("commit", "unavailable").inc()
                if w.conn is not None and not w.conn.is_closed():
                    w.conn.terminate()
                w.conn = None
                self._fail(w, group, StoreUnavailable(f"database unavailable: {exc}"))
                return
            except Exception as exc:
                self.metrics.db_errors.labels("commit", "other").inc()
                log.exception("group commit failed")
                if w.conn is not None and not w.conn.is_closed():
                    w.conn.terminate()
                w.conn = None
                self._fail(w, group, exc)
                return
            elapsed = time.perf_counter() - started
            self.metrics.commit_seconds.observe(elapsed)
            self.metrics.commit_batches.observe(len(group))
            self.metrics.db_seconds.labels("commit").observe(elapsed)
            now = time.time()
            for item, result in zip(group, results, strict=True):
                self._account(item.batch, result, now)
                if not item.future.done():
                    item.future.set_result(result)
            return
        self._fail(w, group, StoreUnavailable("transaction conflicts persisted; retry"))

    def _account(self, batch: DecodedBatch, result: CommitResult, now: float) -> None:
        m = self.metrics
        if result.gap is not None:
            m.batches.labels("error").inc()
            return
        if result.duplicate_batch:
            m.batches.labels("duplicate").inc()
            return
        m.batches.labels("committed").inc()
        o = batch.outcome
        kind = KIND_LABELS.get(batch.chunks[0].kind, "scalar") if batch.chunks else "scalar"
        if o.accepted:
            m.points.labels(kind, "accepted").inc(o.accepted)
        if o.duplicates:
            m.points.labels(kind, "duplicate").inc(o.duplicates)
        if o.rejected:
            m.points.labels(kind, "rejected").inc(o.rejected)
            for reason, n in o.by_reason.items():
                m.rejections.labels(REASON_NAMES.get(reason, str(reason))).inc(n)
        if batch.sent_time > 0:
            m.lag_seconds.observe(max(0.0, now - batch.sent_time))

    def _fail(self, w: _Worker, items: list[_Item], exc: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)
                self.metrics.batches.labels("error").inc()

    def _drain(self, queue: asyncio.Queue[_Item]) -> list[_Item]:
        items = []
        while not queue.empty():
            items.append(queue.get_nowait())
        self.metrics.queue_batches.dec(len(items))
        self.metrics.queue_bytes.dec(sum(i.batch.nbytes for i in items))
        return items


def _reset_outcomes(batches: list[DecodedBatch]) -> None:
    """A retried transaction starts over from the validated state."""
    for b in batches:
        b.reset()
