"""One worker of the write pipeline: a connection of its own, a queue, and
the supervision that keeps it alive.

A worker connects before it takes batches; while it cannot connect it
reports unhealthy, answers the batches hashed to it at once with
StoreUnavailable, and retries with backoff. A worker that fails for any
reason is restarted with backoff; it never ends silently. Its queue, task,
connection and `tried` belong to its own loop; `slots` and `budget` (the
bounds) to the service's loop, reached through `on_main`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ingest.core.batch import CommitResult
from ingest.core.errors import StoreUnavailable
from ingest.observe.metrics import Metrics
from ingest.write.backpressure import ByteBudget
from ingest.write.crossing import Crossing
from ingest.write.groupcommit import GroupCommit, Item
from ingest.write.ports import CommitSession, CommitStore
from ingest.write.retry import (
    RECONNECT_MAX_S,
    RESTART_MAX_S,
    RETRY_BASE_S,
    error_name,
    first_line,
    jitter,
    public,
)

log = logging.getLogger(__name__)

_IDLE_CHECK_S = 1.0

# Call fn(*args) on the service's loop (from the worker's).
OnMain = Callable[..., None]


class Worker:
    def __init__(
        self,
        index: int,
        store: CommitStore,
        metrics: Metrics,
        slots: asyncio.Semaphore,
        budget: ByteBudget,
        group_points: int,
        commit_tries: int,
        on_main: OnMain,
        on_health: Callable[[Worker], Awaitable[None]],
    ) -> None:
        self.index = index
        self.store = store
        self.metrics = metrics
        self.slots = slots
        self.budget = budget
        self.group_points = group_points
        self.on_main = on_main
        # Told (on the worker's loop) when healthy or problem changed.
        self.on_health = on_health
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inbox: Crossing | None = None  # calls onto self.loop (pipeline.py sets it)
        self.thread: threading.Thread | None = None
        self.conn: CommitSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.healthy = False
        self.problem = "not connected yet"
        self.tried = asyncio.Event()
        self.pending: list[Item] = []
        self.commits = GroupCommit(store, self, self._answer, metrics, commit_tries)

    # -- the connection (GroupCommit's Link) ---------------------------------------------

    async def session(self) -> CommitSession:
        if self.conn is None or self.conn.is_closed():
            self.conn = await self.store.connect()
        return self.conn

    def drop(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            self.conn.terminate()
        self.conn = None

    # -- health ---------------------------------------------------------------------------

    async def set_health(self, ok: bool, problem: str = "") -> None:
        if self.healthy == ok and self.problem == problem:
            return
        was = self.healthy
        self.healthy, self.problem = ok, problem
        if ok and not was:
            log.info("pipeline worker %d connected to the database", self.index)
        elif not ok:
            log.warning("pipeline worker %d unhealthy: %s", self.index, problem)
        await self.on_health(self)

    # -- supervision ------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Run the worker; restart it (with backoff) whatever it fails with."""
        backoff = RETRY_BASE_S
        while True:
            started = time.monotonic()
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.pipeline_restarts.inc()
                log.exception("pipeline worker %d failed; restarting it", self.index)
                self.finish(self.pending, StoreUnavailable("the write pipeline restarted; resend"))
                self.pending = []
                self.drop()
                await self.set_health(False, f"restarting after {error_name(exc)}")
                if time.monotonic() - started > 60:
                    backoff = RETRY_BASE_S
                await asyncio.sleep(jitter(backoff))
                backoff = min(backoff * 2, RESTART_MAX_S)

    async def _work(self) -> None:
        while True:
            if self.conn is None or self.conn.is_closed():
                await self._reconnect()
            try:
                # Wake now and then: a connection that died while idle is
                # replaced before a batch needs it (and health tells). Not
                # wait_for: in 3.11 it can swallow a cancel that meets a result.
                async with asyncio.timeout(_IDLE_CHECK_S):
                    first = await self.queue.get()
            except TimeoutError:
                continue
            group = [first]
            points = first.batch.points
            while points < self.group_points and not self.queue.empty():
                item = self.queue.get_nowait()
                group.append(item)
                points += item.batch.points
            self.pending = group
            self.metrics.queue_batches.dec(len(group))
            try:
                await self.commits.process(group)
            except Exception:
                self.finish(group, StoreUnavailable("the write pipeline restarted; resend"))
                raise
            finally:
                self.finish(group, StoreUnavailable("the write pipeline stopped; resend"))
                self.pending = []

    async def _reconnect(self) -> None:
        """Connect, retrying with backoff until it works. Meanwhile the worker
        reports unhealthy and what is queued for it fails at once (StoreUnavailable):
        its clients resend later, none of them hangs."""
        backoff = RETRY_BASE_S
        while True:
            try:
                self.conn = await self.store.connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind = self.store.classify(exc)
                self.metrics.db_errors.labels("connect", kind).inc()
                problem = f"cannot connect to the database: {error_name(exc)}: {first_line(exc)}"
                self.tried.set()
                await self.set_health(False, problem)
                self.finish(
                    self.drain(),
                    StoreUnavailable(f"database unavailable: {public(problem)}"),
                )
                await asyncio.sleep(jitter(backoff))
                backoff = min(backoff * 2, RECONNECT_MAX_S)
                continue
            self.tried.set()
            await self.set_health(True)
            return

    async def stop(self) -> None:
        """On the worker's loop: end its task, fail what is left, close its connection."""
        if self.task is not None:
            for _ in range(5):
                self.task.cancel()
                done, _ = await asyncio.wait({self.task}, timeout=1)
                if done:
                    break
            else:
                log.error("pipeline worker %d did not stop", self.index)
        self.finish(list(self.pending) + self.drain(), StoreUnavailable("shutting down"))
        self.pending = []
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:
                log.debug("closing worker %d's connection failed", self.index, exc_info=True)
            self.conn = None

    # -- answers and room -------------------------------------------------------------------

    def _answer(self, item: Item, result: CommitResult | None, exc: BaseException | None) -> None:
        self.on_main(_settle, item.future, result, exc)

    def finish(self, items: list[Item], exc: BaseException) -> None:
        """Fail what is still open among the items, and give back their room."""
        self.commits.fail(items, exc)
        for item in items:
            if item.held:
                item.held = False
                self.metrics.queue_bytes.dec(item.cost)
                self.on_main(self._give_back, item.cost)

    def _give_back(self, cost: int) -> None:
        """On the service's loop."""
        self.budget.release(cost)
        self.slots.release()

    def drain(self) -> list[Item]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        self.metrics.queue_batches.dec(len(items))
        return items


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


async def spawn(coro: Any, name: str) -> asyncio.Task[None]:
    """Start a task on the running loop (used to start one on a worker's loop)."""
    task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
    return task
