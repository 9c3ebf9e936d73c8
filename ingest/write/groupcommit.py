"""Group commit of one worker: many batches in one transaction, tried again
on transient errors, bisected when the database refuses the group, and the
answer of every batch (see ingest/write/pipeline.py for the faults by kind).

Runs on the worker's loop. The worker gives it its connection (`Link`) and
how to answer a caller (`Answer`, which crosses to the service's loop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ingest.core.batch import INVALID_VALUE, REASON_NAMES, CommitResult, DecodedBatch
from ingest.core.errors import OTHER, REFUSED, UNAVAILABLE, ApiError, StoreUnavailable
from ingest.core.kinds import KIND_LABELS
from ingest.observe.metrics import Metrics
from ingest.write.ports import CommitSession, CommitStore
from ingest.write.retry import COMMIT_TRIES, commit_backoff, error_name

log = logging.getLogger(__name__)

# Batches with more chunks than this are freed in a thread after commit.
_FREE_INLINE_CHUNKS = 2000


@dataclass
class Item:
    """A queued batch, its caller's future and the room it holds."""

    batch: DecodedBatch
    future: asyncio.Future[CommitResult]
    cost: int
    held: bool = True  # its slot and bytes in the queue's bounds
    answered: bool = False


class Link(Protocol):
    """The worker's connection, as the group commit uses it."""

    async def session(self) -> CommitSession:
        """The open connection (a new one when there is none)."""
        ...

    def drop(self) -> None:
        """Forget the connection (terminated: its state is unknown)."""


# Tell a caller its batch's result or error (on the service's loop).
Answer = Callable[[Item, CommitResult | None, BaseException | None], None]
AfterCommit = Callable[[Sequence[DecodedBatch]], None]


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


class GroupCommit:
    def __init__(
        self,
        store: CommitStore,
        link: Link,
        answer: Answer,
        metrics: Metrics,
        commit_tries: int = COMMIT_TRIES,
    ) -> None:
        self.store = store
        self.link = link
        self.answer = answer
        self.metrics = metrics
        self.commit_tries = commit_tries
        # Told right after each commit, before the batches are freed, which
        # batches committed; it must be quick and keep no batch.
        self.on_committed: AfterCommit | None = None
        # Batches a failed try may have changed (reset before the next try).
        self.dirty: set[int] = set()

    async def process(self, group: list[Item]) -> None:
        live = [i for i in group if not i.future.done()]
        if len(live) < len(group):
            # Their RPC was cancelled (client gone, deadline, shutdown): the
            # client was told they failed and resends them, here or elsewhere.
            self.metrics.batches.labels("cancelled").inc(len(group) - len(live))
        if live:
            await self._commit_isolating(live)

    async def _commit_isolating(self, items: list[Item]) -> bool:
        """Commit the items; when the database refuses the group, bisect it
        (in order, so a writer's batches still commit in sequence) until the
        batch it refuses is alone. False when the database is unavailable:
        the caller fails what is left."""
        try:
            results = await self._commit([i.batch for i in items])
        except StoreUnavailable as exc:
            self.fail(items, exc)
            return False
        except (_Refused, _Failed) as exc:
            if len(items) > 1:
                log.warning(
                    "group commit of %d batches failed (%s); isolating the batch",
                    len(items),
                    exc,
                )
                mid = len(items) // 2
                if not await self._commit_isolating(items[:mid]):
                    self.fail(items[mid:], StoreUnavailable("database unavailable; resend"))
                    return False
                return await self._commit_isolating(items[mid:])
            if isinstance(exc, _Refused):
                return await self._answer_refused(items[0], exc.error)
            log.error(
                "batch %d of writer %r failed alone: %s",
                items[0].batch.sequence,
                items[0].batch.writer_id,
                exc,
                exc_info=exc.error,
            )
            error = exc.error
            self.fail(
                items,
                error
                if isinstance(error, ApiError)
                else StoreUnavailable(f"the database failed this batch ({exc}); resend"),
            )
            return True
        self._resolve(items, results)
        return True

    async def _answer_refused(self, item: Item, error: BaseException) -> bool:
        """Reject every point of a batch the database refuses, and commit it
        again: only its writer's high-water mark moves, the client gets an
        ordinary ack with the reason, and the writer's next batches flow."""
        batch = item.batch
        batch.reset()
        self.dirty.discard(id(batch))
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
            results = await self._commit([batch])
        except StoreUnavailable as exc:
            self.fail([item], exc)
            return False
        except (_Refused, _Failed) as exc:
            log.error(
                "batch %d of writer %r failed even with no points: %s",
                batch.sequence,
                batch.writer_id,
                exc,
                exc_info=exc.error,
            )
            self.fail([item], StoreUnavailable(f"the database failed this batch ({exc})"))
            return True
        self._resolve([item], results)
        return True

    async def _commit(self, batches: Sequence[DecodedBatch]) -> Sequence[CommitResult]:
        """One group commit, tried again on transient errors. Raises
        StoreUnavailable (transient errors persisted), _Refused or _Failed."""
        last: BaseException | None = None
        for attempt in range(self.commit_tries):
            # A failed try may have moved outcomes and steps: start over from
            # the validated state (only then: the copy costs on large batches).
            for b in batches:
                if id(b) in self.dirty:
                    b.reset()
            started = time.perf_counter()
            try:
                session = await self.link.session()
                results = await session.commit_group(batches)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.dirty.update(map(id, batches))
                kind = self.store.classify(exc)
                self.metrics.db_errors.labels("commit", kind).inc()
                if kind == REFUSED:
                    raise _Refused(exc) from exc
                if kind == OTHER:
                    # The connection may be in any state: start a fresh one.
                    self.link.drop()
                    raise _Failed(exc) from exc
                if kind == UNAVAILABLE:
                    self.link.drop()
                last = exc
                log.info(
                    "group commit: %s (%s); try %d of %d",
                    kind,
                    error_name(exc),
                    attempt + 1,
                    self.commit_tries,
                )
                if attempt + 1 < self.commit_tries:
                    await asyncio.sleep(commit_backoff(attempt))
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

    def _resolve(self, items: Sequence[Item], results: Sequence[CommitResult]) -> None:
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
            self.answer(item, result, None)
            self.release(item.batch)

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

    def fail(self, items: Sequence[Item], exc: BaseException) -> None:
        """Answer the items not answered yet with exc."""
        for item in items:
            if not item.answered and not item.future.done():
                item.answered = True
                self.metrics.batches.labels("error").inc()
                self.answer(item, None, exc)
            self.release(item.batch)

    def release(self, batch: DecodedBatch) -> None:
        """Keep only what the acknowledgement needs (sequence, outcome). A
        large batch is freed in a thread, one chunk at a time, so no loop is
        held while 100,000 objects are deallocated."""
        self.dirty.discard(id(batch))
        chunks: list[Any] = batch.chunks
        saved = batch._saved
        batch.chunks = []
        batch._saved = None
        if len(chunks) > _FREE_INLINE_CHUNKS:
            garbage = [saved, *chunks] if saved is not None else chunks
            chunks = []
            asyncio.get_running_loop().run_in_executor(None, _free, garbage)


def _free(garbage: list[Any]) -> None:
    while garbage:
        garbage.pop()  # one object at a time: the GIL passes between them
