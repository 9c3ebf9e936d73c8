"""The write pipeline: queues bounded in batches and bytes, one worker per
database connection, group commit of many batches per transaction.

Each worker runs on a thread and event loop of its own: the Python work of
a large commit (100,000 series take seconds of CPU) then holds neither the
service's gRPC loop nor the other workers. The bounds (`slots`, `budget`)
and the callers' futures live on the service's loop; results, health and
freed room cross back with call_soon_threadsafe.

A writer's batches always go to the same worker (hash of its id), so they
commit in order. `submit` waits when that worker's queue is full (in batches
or in bytes): the stream handler stops reading, gRPC flow control pushes
back, and the client slows down in its background thread. A caller that
gives `submit` a timeout gets `Overloaded` when the wait would pass it.

Faults, by kind (`classify`):
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

Supervision: a worker connects before it takes batches; while it cannot
connect it reports unhealthy (`healthy`, `on_health`), answers batches
hashed to it at once with StoreUnavailable, and retries with backoff. A
worker that fails for any reason is restarted with backoff; it never ends
silently.

Batches whose caller is gone (the RPC was cancelled: the client was told it
failed) are dropped before their commit. A committed batch keeps only what
its acknowledgement needs (the outcome); its arrays and payloads go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from ingest.core.batch import INVALID_VALUE, REASON_NAMES, DecodedBatch
from ingest.core.errors import ApiError, StoreUnavailable
from ingest.observe.metrics import Metrics
from ingest.store.db import UNAVAILABLE_ERRORS, init_connection
from ingest.store.points import PointStore
from ingest.store.writers import CommitResult

log = logging.getLogger(__name__)

T = TypeVar("T")

KIND_LABELS = {1: "scalar", 2: "table", 3: "image", 4: "evaluation", 5: "histogram"}

# Tries of one group commit on transient errors, and the backoff between them.
COMMIT_TRIES = 5
_RETRY_BASE_S = 0.05
_RETRY_MAX_S = 1.0
# Reconnect and restart backoff of a worker.
_RECONNECT_MAX_S = 2.0
_RESTART_MAX_S = 5.0
_IDLE_CHECK_S = 1.0
# Batches with more chunks than this are freed in a thread after commit.
_FREE_INLINE_CHUNKS = 2000

# How the workers' connections show in pg_stat_activity (with the process id).
APPLICATION_NAME = "steplog-pipeline"

# Memory a decoded chunk holds beyond its arrays (the object, its dicts,
# strings and array headers; measured at about 1.2 KiB with CPython 3.11).
CHUNK_OVERHEAD_BYTES = 1536
# What an acknowledgement needs once its batch is committed.
ACK_BYTES = 512

_CONFLICT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.LockNotAvailableError,
)
_UNAVAILABLE: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, TimeoutError)
# SQLSTATE classes of errors that a value of the batch causes, every time:
# data exceptions, integrity constraint violations, program limits.
_REFUSED_CLASSES = ("22", "23", "54")
# Classes of errors that come and go with the server: insufficient resources,
# operator intervention (shutdown, cancel), system errors, connection errors.
_TRANSIENT_CLASSES = ("08", "53", "57", "58")

CONFLICT = "conflict"
UNAVAILABLE = "unavailable"
REFUSED = "refused"
OTHER = "other"


def classify(exc: BaseException) -> str:
    """What a commit error means: conflict and unavailable are transient
    (retry); refused is a value the database will never store; other is
    anything else."""
    if isinstance(exc, _CONFLICT):
        return CONFLICT
    if isinstance(exc, _UNAVAILABLE):
        return UNAVAILABLE
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state[:2] in _TRANSIENT_CLASSES:
            return UNAVAILABLE
        if state[:2] in _REFUSED_CLASSES:
            return REFUSED
    return OTHER


def error_name(exc: BaseException) -> str:
    """A short, safe name of an error: its class and SQLSTATE, no message
    (messages can carry values, relation names, host names)."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} (SQLSTATE {state})" if state else type(exc).__name__


def batch_cost(batch: DecodedBatch) -> int:
    """The bytes a decoded batch holds in memory, estimated from above: its
    size on the wire (payloads may share the request's memory) plus its
    arrays, the copies kept for a retried transaction, and a fixed cost per
    chunk."""
    n = batch.nbytes
    for c in batch.chunks:
        n += CHUNK_OVERHEAD_BYTES + c.times.nbytes + 2 * (c.steps.nbytes + c.alive.nbytes)
        if c.values is not None:
            n += c.values.nbytes
        if c.texts is not None:
            n += 56 * len(c.texts) + sum(map(len, c.texts))
        if c.payload is not None:
            n += 64 * len(c.payload)
    return n


class Overloaded(Exception):
    """A bound stayed full for longer than the caller waits: the request is
    shed (RESOURCE_EXHAUSTED) with a hint of when to try again."""

    def __init__(self, message: str, bound: str = "queue", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.bound = bound
        self.retry_after = retry_after


class ByteBudget:
    """Bytes reserved against a limit. Waiters are served in arrival order,
    so a large request is not starved by small ones; a request larger than
    the whole limit passes when nothing else is reserved."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._on_change = on_change

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def _add(self, n: int) -> None:
        self.used += n
        if self._on_change is not None:
            self._on_change(n)

    async def acquire(self, n: int, wait: float | None = None) -> None:
        """Reserve n bytes, waiting for room; TimeoutError after `wait` seconds."""
        if not self._waiters and self._fits(n):
            self._add(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait({fut}, timeout=wait)
            if not done:
                raise TimeoutError(f"no room for {n} bytes within {wait} s")
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted in the same moment: give it back
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def force(self, n: int) -> None:
        """Count bytes that are already taken (no waiting)."""
        if n > 0:
            self._add(n)

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self._add(-min(n, self.used))
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._add(n)
            fut.set_result(None)


class _Refused(Exception):
    """The database refused the group for a reason a value of it causes."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error_name(error))
        self.error = error


class _Failed(Exception):
    """The group failed for a reason that is neither transient nor a refused value."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error_name(error))
        self.error = error


@dataclass
class _Item:
    batch: DecodedBatch
    future: asyncio.Future[CommitResult]
    cost: int
    held: bool = True  # its slot and bytes in the queue's bounds
    answered: bool = False


@dataclass
class _Worker:
    """One database connection, on its own event loop (its own thread), so
    the Python work of a large commit holds neither the gRPC loop nor the
    other workers. The queue, task, connection and `tried` belong to that
    loop; `slots` and `budget` (the bounds) to the service's loop."""

    index: int
    slots: asyncio.Semaphore
    budget: ByteBudget
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    conn: asyncpg.Connection | None = None
    task: asyncio.Task[None] | None = None
    healthy: bool = False
    problem: str = "not connected yet"
    tried: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[_Item] = field(default_factory=list)
    # Batches a failed try may have changed (reset before the next try).
    dirty: set[int] = field(default_factory=set)


HealthCallback = Callable[[bool, str], Awaitable[None]]


class Pipeline:
    def __init__(
        self,
        dsn: str,
        store: PointStore,
        metrics: Metrics,
        workers: int = 2,
        queue_batches: int = 256,
        group_points: int = 200_000,
        queue_bytes: int = 256 * 1024 * 1024,
        commit_tries: int = COMMIT_TRIES,
        connect_timeout: float = 5.0,
        command_timeout: float = 60.0,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        threads: bool = True,
    ) -> None:
        self.dsn = dsn
        self.store = store
        self.metrics = metrics
        self.group_points = group_points
        self.commit_tries = commit_tries
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._connect = connect or self._connect_dsn
        per_worker = max(1, queue_batches // workers)
        per_worker_bytes = max(1, queue_bytes // workers)
        self._workers = [
            _Worker(i, asyncio.Semaphore(per_worker), ByteBudget(per_worker_bytes))
            for i in range(workers)
        ]
        # Each worker on a thread of its own (False: on the caller's loop, for tests).
        self.threads = threads
        self._main: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Told when the pipeline turns healthy or unhealthy (and why), on the
        # service's loop.
        self.on_health: HealthCallback | None = None
        # Told right after each commit, on the worker's thread and before the
        # batches are freed, which batches committed (early termination,
        # ingest/write/sweeps.py); it must be quick and keep no batch.
        self.on_committed: Callable[[Sequence[DecodedBatch]], None] | None = None
        self._reported: bool | None = None  # None until started

    # -- health ----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Every worker has a database connection and is taking batches."""
        return all(w.healthy for w in self._workers)

    @property
    def problem(self) -> str:
        return "; ".join(f"worker {w.index}: {w.problem}" for w in self._workers if not w.healthy)

    async def _set_health(self, w: _Worker, ok: bool, problem: str = "") -> None:
        if w.healthy == ok and w.problem == problem:
            return
        was = w.healthy
        w.healthy, w.problem = ok, problem
        if ok and not was:
            log.info("pipeline worker %d connected to the database", w.index)
        elif not ok:
            log.warning("pipeline worker %d unhealthy: %s", w.index, problem)
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

    async def _on_worker(self, w: _Worker, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the worker's loop and wait for it here."""
        if not self.threads:
            return await coro
        assert w.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, w.loop))

    def _on_main(self, fn: Callable[..., None], *args: Any) -> None:
        """Call fn on the service's loop (from a worker's)."""
        if self.threads and self._main is not None:
            with contextlib.suppress(RuntimeError):  # the service's loop is gone: exiting
                self._main.call_soon_threadsafe(fn, *args)
        else:
            fn(*args)

    # -- the API -----------------------------------------------------------------------

    async def start(self, wait: float = 10.0) -> None:
        """Start the workers and wait (up to `wait` seconds) until each has
        tried its first connection, so `healthy` means something."""
        self._main = asyncio.get_running_loop()
        for w in self._workers:
            name = f"steplog-pipeline-{w.index}"
            if self.threads:
                w.loop = asyncio.new_event_loop()
                w.thread = threading.Thread(target=w.loop.run_forever, name=name, daemon=True)
                w.thread.start()
            else:
                w.loop = self._main
            w.task = await self._on_worker(w, _spawn(self._supervise(w), name))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                for w in self._workers:
                    await self._on_worker(w, w.tried.wait())
        self._reported = self.healthy

    def _worker_for(self, batch: DecodedBatch) -> _Worker:
        return self._workers[zlib.crc32(batch.writer_id.encode()) % len(self._workers)]

    async def submit(
        self, batch: DecodedBatch, cost: int | None = None, wait: float | None = None
    ) -> asyncio.Future[CommitResult]:
        """Queue a batch; waits while its worker's queue is full (backpressure),
        at most `wait` seconds (then Overloaded). The future resolves after
        the batch's transaction commits. `cost` is the bytes the batch holds
        (default: its size on the wire)."""
        if self._closing:
            raise StoreUnavailable("the service is shutting down")
        worker = self._worker_for(batch)
        if not worker.healthy and worker.tried.is_set():
            raise StoreUnavailable(f"database unavailable: {_public(worker.problem)}")
        cost = batch.nbytes if cost is None else cost
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
        item = _Item(batch, fut, cost)
        self.metrics.queue_bytes.inc(cost)
        self.metrics.queue_batches.inc()
        if self.threads:
            assert worker.loop is not None
            worker.loop.call_soon_threadsafe(worker.queue.put_nowait, item)
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
                await self._on_worker(w, self._stop(w))
            if self.threads:
                w.loop.call_soon_threadsafe(w.loop.stop)
                if w.thread is not None:
                    await asyncio.to_thread(w.thread.join, 5)
                if not w.loop.is_running():
                    w.loop.close()
            w.loop = None

    async def _stop(self, w: _Worker) -> None:
        """On the worker's loop: end its task, fail what is left, close its connection."""
        if w.task is not None:
            for _ in range(5):
                w.task.cancel()
                done, _ = await asyncio.wait({w.task}, timeout=1)
                if done:
                    break
            else:
                log.error("pipeline worker %d did not stop", w.index)
        self._finish(w, list(w.pending) + self._drain(w), StoreUnavailable("shutting down"))
        w.pending = []
        if w.conn is not None:
            with contextlib.suppress(Exception):
                await w.conn.close(timeout=2)
            w.conn = None

    # -- the workers --------------------------------------------------------------------

    async def _supervise(self, w: _Worker) -> None:
        """Run the worker; restart it (with backoff) whatever it fails with."""
        backoff = _RETRY_BASE_S
        while True:
            started = time.monotonic()
            try:
                await self._work(w)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.pipeline_restarts.inc()
                log.exception("pipeline worker %d failed; restarting it", w.index)
                self._finish(w, w.pending, StoreUnavailable("the write pipeline restarted; resend"))
                w.pending = []
                self._drop_connection(w)
                await self._set_health(w, False, f"restarting after {error_name(exc)}")
                if time.monotonic() - started > 60:
                    backoff = _RETRY_BASE_S
                await asyncio.sleep(_jitter(backoff))
                backoff = min(backoff * 2, _RESTART_MAX_S)

    async def _work(self, w: _Worker) -> None:
        while True:
            if w.conn is None or w.conn.is_closed():
                await self._reconnect(w)
            try:
                # Wake now and then: a connection that died while idle is
                # replaced before a batch needs it (and health tells). Not
                # wait_for: in 3.11 it can swallow a cancel that meets a result.
                async with asyncio.timeout(_IDLE_CHECK_S):
                    first = await w.queue.get()
            except TimeoutError:
                continue
            group = [first]
            points = first.batch.points
            while points < self.group_points and not w.queue.empty():
                item = w.queue.get_nowait()
                group.append(item)
                points += item.batch.points
            w.pending = group
            self.metrics.queue_batches.dec(len(group))
            try:
                await self._process(w, group)
            except Exception:
                self._finish(w, group, StoreUnavailable("the write pipeline restarted; resend"))
                raise
            finally:
                self._finish(w, group, StoreUnavailable("the write pipeline stopped; resend"))
                w.pending = []

    async def _connect_dsn(self) -> asyncpg.Connection:
        # A command that hangs (a frozen server) ends and counts as transient.
        conn = await asyncpg.connect(
            self.dsn,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings={"application_name": application_name()},
        )
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _open(self, w: _Worker) -> asyncpg.Connection:
        w.conn = await self._connect()
        return w.conn

    async def _reconnect(self, w: _Worker) -> None:
        """Connect, retrying with backoff until it works. Meanwhile the worker
        reports unhealthy and what is queued for it fails at once (StoreUnavailable):
        its clients resend later, none of them hangs."""
        backoff = _RETRY_BASE_S
        while True:
            try:
                await self._open(w)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind = classify(exc)
                self.metrics.db_errors.labels("connect", kind).inc()
                problem = f"cannot connect to the database: {error_name(exc)}: {_first_line(exc)}"
                w.tried.set()
                await self._set_health(w, False, problem)
                self._finish(
                    w,
                    self._drain(w),
                    StoreUnavailable(f"database unavailable: {_public(problem)}"),
                )
                await asyncio.sleep(_jitter(backoff))
                backoff = min(backoff * 2, _RECONNECT_MAX_S)
                continue
            w.tried.set()
            await self._set_health(w, True)
            return

    def _drop_connection(self, w: _Worker) -> None:
        if w.conn is not None and not w.conn.is_closed():
            w.conn.terminate()
        w.conn = None

    # -- commits ------------------------------------------------------------------------

    async def _process(self, w: _Worker, group: list[_Item]) -> None:
        live = [i for i in group if not i.future.done()]
        if len(live) < len(group):
            # Their RPC was cancelled (client gone, deadline, shutdown): the
            # client was told they failed and resends them, here or elsewhere.
            self.metrics.batches.labels("cancelled").inc(len(group) - len(live))
        if live:
            await self._commit_isolating(w, live)

    async def _commit_isolating(self, w: _Worker, items: list[_Item]) -> bool:
        """Commit the items; when the database refuses the group, bisect it
        (in order, so a writer's batches still commit in sequence) until the
        batch it refuses is alone. False when the database is unavailable:
        the caller fails what is left."""
        try:
            results = await self._commit(w, [i.batch for i in items])
        except StoreUnavailable as exc:
            self._fail(w, items, exc)
            return False
        except (_Refused, _Failed) as exc:
            if len(items) > 1:
                log.warning(
                    "group commit of %d batches failed (%s); isolating the batch",
                    len(items),
                    exc,
                )
                mid = len(items) // 2
                if not await self._commit_isolating(w, items[:mid]):
                    self._fail(w, items[mid:], StoreUnavailable("database unavailable; resend"))
                    return False
                return await self._commit_isolating(w, items[mid:])
            if isinstance(exc, _Refused):
                return await self._answer_refused(w, items[0], exc.error)
            log.error(
                "batch %d of writer %r failed alone: %s",
                items[0].batch.sequence,
                items[0].batch.writer_id,
                exc,
                exc_info=exc.error,
            )
            error = exc.error
            self._fail(
                w,
                items,
                error
                if isinstance(error, ApiError)
                else StoreUnavailable(f"the database failed this batch ({exc}); resend"),
            )
            return True
        self._resolve(w, items, results)
        return True

    async def _answer_refused(self, w: _Worker, item: _Item, error: BaseException) -> bool:
        """Reject every point of a batch the database refuses, and commit it
        again: only its writer's high-water mark moves, the client gets an
        ordinary ack with the reason, and the writer's next batches flow."""
        batch = item.batch
        batch.reset()
        w.dirty.discard(id(batch))
        message = (
            f"the database refused this batch: {error_name(error)}; none of its points were"
            " stored (a value the database cannot hold, such as a NUL character?)"
        )
        for chunk in batch.chunks:
            batch.outcome.reject(chunk, None, INVALID_VALUE, message)
        batch.snapshot()
        self.metrics.batches.labels("refused").inc()
        log.warning(
            "the database refused batch %d of writer %r (%s): its points are rejected",
            batch.sequence,
            batch.writer_id,
            error_name(error),
        )
        try:
            results = await self._commit(w, [batch])
        except StoreUnavailable as exc:
            self._fail(w, [item], exc)
            return False
        except (_Refused, _Failed) as exc:
            log.error(
                "batch %d of writer %r failed even with no points: %s",
                batch.sequence,
                batch.writer_id,
                exc,
                exc_info=exc.error,
            )
            self._fail(w, [item], StoreUnavailable(f"the database failed this batch ({exc})"))
            return True
        self._resolve(w, [item], results)
        return True

    async def _commit(self, w: _Worker, batches: Sequence[DecodedBatch]) -> list[CommitResult]:
        """One group commit, tried again on transient errors. Raises
        StoreUnavailable (transient errors persisted), _Refused or _Failed."""
        last: BaseException | None = None
        for attempt in range(self.commit_tries):
            # A failed try may have moved outcomes and steps: start over from
            # the validated state (only then: the copy costs on large batches).
            for b in batches:
                if id(b) in w.dirty:
                    b.reset()
            started = time.perf_counter()
            try:
                conn = w.conn if w.conn is not None and not w.conn.is_closed() else None
                if conn is None:
                    conn = await self._open(w)
                results, _stats = await self.store.commit_group(conn, batches)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                w.dirty.update(map(id, batches))
                kind = classify(exc)
                self.metrics.db_errors.labels("commit", kind).inc()
                if kind == REFUSED:
                    raise _Refused(exc) from exc
                if kind == OTHER:
                    # The connection may be in any state: start a fresh one.
                    self._drop_connection(w)
                    raise _Failed(exc) from exc
                if kind == UNAVAILABLE:
                    self._drop_connection(w)
                last = exc
                log.info(
                    "group commit: %s (%s); try %d of %d",
                    kind,
                    error_name(exc),
                    attempt + 1,
                    self.commit_tries,
                )
                if attempt + 1 < self.commit_tries:
                    await asyncio.sleep(_jitter(min(_RETRY_BASE_S * 2**attempt, _RETRY_MAX_S)))
                continue
            elapsed = time.perf_counter() - started
            self.metrics.commit_seconds.observe(elapsed)
            self.metrics.commit_batches.observe(len(batches))
            self.metrics.db_seconds.labels("commit").observe(elapsed)
            return results
        assert last is not None
        raise StoreUnavailable(
            f"database unavailable ({error_name(last)} after {self.commit_tries} tries); resend"
        )

    def _resolve(self, w: _Worker, items: Sequence[_Item], results: Sequence[CommitResult]) -> None:
        now = time.time()
        if self.on_committed is not None:
            try:
                self.on_committed(
                    [
                        i.batch
                        for i, r in zip(items, results, strict=True)
                        if r.gap is None and not r.duplicate_batch
                    ]
                )
            except Exception:  # a hook's bug never fails a committed batch
                log.exception("the after-commit hook failed")
        for item, result in zip(items, results, strict=True):
            self._account(item.batch, result, now)
            item.answered = True
            self._on_main(_settle, item.future, result, None)
            self._release(w, item.batch)

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

    def _fail(self, w: _Worker, items: Sequence[_Item], exc: BaseException) -> None:
        for item in items:
            if not item.answered and not item.future.done():
                item.answered = True
                self.metrics.batches.labels("error").inc()
                self._on_main(_settle, item.future, None, exc)
            self._release(w, item.batch)

    def _release(self, w: _Worker, batch: DecodedBatch) -> None:
        """Keep only what the acknowledgement needs (sequence, outcome). A
        large batch is freed in a thread, one chunk at a time, so no loop is
        held while 100,000 objects are deallocated."""
        w.dirty.discard(id(batch))
        chunks: list[Any] = batch.chunks
        saved = batch._saved
        batch.chunks = []
        batch._saved = None
        if len(chunks) > _FREE_INLINE_CHUNKS:
            garbage = [saved, *chunks] if saved is not None else chunks
            chunks = []
            asyncio.get_running_loop().run_in_executor(None, _free, garbage)

    def _finish(self, w: _Worker, items: Sequence[_Item], exc: BaseException) -> None:
        """Fail what is still open among the items, and give back their room."""
        self._fail(w, items, exc)
        for item in items:
            if item.held:
                item.held = False
                self.metrics.queue_bytes.dec(item.cost)
                self._on_main(_give_back, w, item.cost)

    def _drain(self, w: _Worker) -> list[_Item]:
        items = []
        while not w.queue.empty():
            items.append(w.queue.get_nowait())
        self.metrics.queue_batches.dec(len(items))
        return items


def application_name(pid: int | None = None) -> str:
    return f"{APPLICATION_NAME} pid={os.getpid() if pid is None else pid}"


def _settle(
    fut: asyncio.Future[CommitResult], result: CommitResult | None, exc: BaseException | None
) -> None:
    if fut.done():
        return  # its caller is gone
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert result is not None
        fut.set_result(result)


def _give_back(w: _Worker, cost: int) -> None:
    w.budget.release(cost)
    w.slots.release()


async def _spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a task on the running loop (used to start one on a worker's loop)."""
    return asyncio.create_task(coro, name=name)


def _free(garbage: list[Any]) -> None:
    while garbage:
        garbage.pop()  # one object at a time: the GIL passes between them


def _jitter(delay: float) -> float:
    return delay * (0.5 + random.random())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _public(problem: str) -> str:
    """What a client may read of a worker's problem: the error class, not the
    server's message (it can name hosts, roles, files)."""
    return problem.split(":", 2)[1].strip() if problem.count(":") >= 2 else problem
