"""The write pipeline: queues bounded in batches and bytes, one worker per
database connection, group commit of many batches per transaction.

Each worker runs on a thread and event loop of its own: the Python work of
a large commit (100,000 series take seconds of CPU) then holds neither the
service's gRPC loop nor the other workers. The bounds (`slots`, `budget`)
and the callers' futures live on the service's loop; results, health and
freed room cross back, each way through a Crossing (crossing.py: one
wake-up of the other loop per burst of calls, not per batch).

A writer's batches always go to the same worker (hash of its id), so they
commit in order. `submit` waits when that worker's queue is full (in batches
or in bytes): the stream handler stops reading, gRPC flow control pushes
back, and the client slows down in its background thread. A caller that
gives `submit` a timeout gets `Overloaded` when the wait would pass it.

The modules: this one (the API, health, the crossing between loops),
backpressure.py (the bounds), workers.py (a worker and its supervision),
groupcommit.py (commits, retries, bisection, answers), retry.py (backoff),
ports.py (what the store provides: connections that commit a group, and
what their errors mean). Nothing here knows the database driver.

Faults, by kind (the store's `classify`):
- transient (connection lost, serialization failure, deadlock, a racing
  insert): the group is tried again, a bounded number of times with
  jittered backoff, on a fresh connection when the old one is gone; then
  its batches fail with StoreUnavailable (the client resends).
- refused (PostgreSQL will never store a value of the batch: data
  exceptions, constraint violations, program limits): the group is bisected
  until the batch that fails alone is found; every other batch commits. The
  refused batch is answered on its own: all its points are rejected
  (INVALID_VALUE, naming the error class) and it is committed again, which
  only moves its writer's high-water mark, so the client gets a normal ack
  and its next batches flow.
- anything else (a bug, a missing permission): bisected the same way, but
  the batch that fails alone fails with StoreUnavailable instead of being
  rejected, so a fault of the whole database never turns into lost points.

Supervision (ingest/write/workers.py): a worker connects before it takes
batches; while it cannot connect it reports unhealthy (`healthy`,
`on_health`), answers batches hashed to it at once with StoreUnavailable,
and retries with backoff. A worker that fails for any reason is restarted
with backoff; it never ends silently.

Batches whose caller is gone (the RPC was cancelled: the client was told it
failed) are dropped before their commit. A committed batch keeps only what
its acknowledgement needs (the outcome); its arrays and payloads go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ingest.core.batch import CommitResult, DecodedBatch
from ingest.core.errors import StoreUnavailable
from ingest.observe.metrics import Metrics
from ingest.write.backpressure import ByteBudget, Overloaded
from ingest.write.crossing import Crossing
from ingest.write.groupcommit import AfterCommit, Item
from ingest.write.ports import Admission, CommitStore
from ingest.write.retry import COMMIT_TRIES, public
from ingest.write.workers import Worker, spawn

log = logging.getLogger(__name__)

T = TypeVar("T")

HealthCallback = Callable[[bool, str], Awaitable[None]]


class Pipeline:
    def __init__(
        self,
        store: CommitStore,
        metrics: Metrics,
        workers: int = 2,
        queue_batches: int = 4096,
        group_points: int = 1_000_000,
        queue_bytes: int = 256 * 1024 * 1024,
        commit_tries: int = COMMIT_TRIES,
        threads: bool = True,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        # A step before the queue (the image blobs, ingest/store/artifacts.py).
        self.admission = admission
        per_worker = max(1, queue_batches // workers)
        per_worker_bytes = max(1, queue_bytes // workers)
        self._workers = [
            Worker(
                i,
                store,
                metrics,
                asyncio.Semaphore(per_worker),
                ByteBudget(per_worker_bytes),
                group_points,
                commit_tries,
                self._on_main,
                self._health_changed,
            )
            for i in range(workers)
        ]
        # Each worker on a thread of its own (False: on the caller's loop, for tests).
        self.threads = threads
        self._main: asyncio.AbstractEventLoop | None = None
        self._to_main: Crossing | None = None  # answers and freed room (crossing.py)
        self._closing = False
        # Told when the pipeline turns healthy or unhealthy (and why), on the
        # service's loop.
        self.on_health: HealthCallback | None = None
        self._reported: bool | None = None  # None until started

    @property
    def on_committed(self) -> AfterCommit | None:
        """Told right after each commit, on the worker's thread and before the
        batches are freed, which batches committed (early termination,
        ingest/write/sweeps.py); it must be quick and keep no batch."""
        return self._workers[0].commits.on_committed

    @on_committed.setter
    def on_committed(self, hook: AfterCommit | None) -> None:
        for w in self._workers:
            w.commits.on_committed = hook

    # -- health ----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Every worker has a database connection and is taking batches."""
        return all(w.healthy for w in self._workers)

    @property
    def problem(self) -> str:
        return "; ".join(f"worker {w.index}: {w.problem}" for w in self._workers if not w.healthy)

    async def _health_changed(self, w: Worker) -> None:
        """On a worker's loop, after its health changed."""
        self.metrics.pipeline_healthy.set(1 if self.healthy else 0)
        if self.threads:
            assert self._main is not None
            with contextlib.suppress(RuntimeError):  # the service's loop is gone: exiting
                asyncio.run_coroutine_threadsafe(self._report_health(), self._main)
        else:
            await self._report_health()

    async def _report_health(self) -> None:
        """On the service's loop: tell on_health when the whole changed."""
        now = self.healthy
        if self._reported is None or now == self._reported or self._closing:
            return
        self._reported = now
        if not now:
            log.error("write pipeline unhealthy (health NOT_SERVING): %s", self.problem)
        else:
            log.info("write pipeline healthy again (health SERVING)")
        if self.on_health is not None:
            try:
                await self.on_health(now, self.problem)
            except Exception:
                log.exception("health callback failed")

    # -- crossing between the service's loop and the workers' --------------------------

    async def _on_worker(self, w: Worker, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the worker's loop and wait for it here."""
        if not self.threads:
            return await coro
        assert w.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, w.loop))

    def _on_main(self, fn: Callable[..., None], *args: Any) -> None:
        """Call fn on the service's loop (from a worker's)."""
        if self.threads and self._to_main is not None:
            with contextlib.suppress(RuntimeError):  # the service's loop is gone: exiting
                self._to_main.call(fn, *args)
        else:
            fn(*args)

    # -- the API -----------------------------------------------------------------------

    async def start(self, wait: float = 10.0) -> None:
        """Start the workers and wait (up to `wait` seconds) until each has
        tried its first connection, so `healthy` means something."""
        self._main = asyncio.get_running_loop()
        self._to_main = Crossing(self._main)
        for w in self._workers:
            name = f"steplog-pipeline-{w.index}"
            if self.threads:
                w.loop = asyncio.new_event_loop()
                w.inbox = Crossing(w.loop)
                w.thread = threading.Thread(target=w.loop.run_forever, name=name, daemon=True)
                w.thread.start()
            else:
                w.loop = self._main
            w.task = await self._on_worker(w, spawn(w.supervise(), name))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                for w in self._workers:
                    await self._on_worker(w, w.tried.wait())
        self._reported = self.healthy

    def _worker_for(self, batch: DecodedBatch) -> Worker:
        return self._workers[zlib.crc32(batch.writer_id.encode()) % len(self._workers)]

    async def submit(
        self, batch: DecodedBatch, cost: int | None = None, wait: float | None = None
    ) -> asyncio.Future[CommitResult]:
        """Queue a batch; waits while its worker's queue is full (backpressure),
        at most `wait` seconds (then Overloaded). The future resolves after
        the batch's transaction commits. `cost` is the bytes the batch holds
        (default: its size on the wire), less what the admission step frees."""
        cost = batch.nbytes if cost is None else cost
        if self.admission is not None:
            cost = max(cost - await self.admission.admit(batch), 0)
        if self._closing:
            raise StoreUnavailable("the service is shutting down")
        worker = self._worker_for(batch)
        if not worker.healthy and worker.tried.is_set():
            raise StoreUnavailable(f"database unavailable: {public(worker.problem)}")
        try:
            async with asyncio.timeout(wait):
                await worker.slots.acquire()
        except TimeoutError:
            raise Overloaded("the write pipeline is full (batches queued); retry later") from None
        try:
            await worker.budget.acquire(cost, wait)
        except BaseException as exc:
            worker.slots.release()
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"the write pipeline is full ({worker.budget.used} bytes queued); retry later"
                ) from None
            raise
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        item = Item(batch, fut, cost)
        self.metrics.queue_bytes.inc(cost)
        self.metrics.queue_batches.inc()
        if self.threads:
            assert worker.inbox is not None
            worker.inbox.call(worker.queue.put_nowait, item)
        else:
            worker.queue.put_nowait(item)
        return fut

    async def close(self, grace: float = 10.0) -> None:
        """Drain what is queued (up to grace seconds), then stop the workers."""
        self._closing = True
        deadline = time.monotonic() + grace
        while any(not w.queue.empty() or w.pending for w in self._workers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for w in self._workers:
            if w.loop is None:
                continue
            with contextlib.suppress(Exception):
                await self._on_worker(w, w.stop())
            if self.threads:
                w.loop.call_soon_threadsafe(w.loop.stop)
                if w.thread is not None:
                    await asyncio.to_thread(w.thread.join, 5)
                if not w.loop.is_running():
                    w.loop.close()
            w.loop = None
