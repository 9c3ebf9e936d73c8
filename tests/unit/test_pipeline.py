"""The write pipeline beside its boundary (ingest/write/ports.py): a fake
store and fake connections, so faults can be placed exactly (which batch the database
refuses, which try fails, when a connection cannot be made)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from ingest.core.batch import INVALID_VALUE, CommitResult, DecodedBatch, SequenceGap
from ingest.core.decode import decode_batch
from ingest.core.errors import Fault, StoreUnavailable
from ingest.core.validate import Limits
from ingest.observe.metrics import Metrics
from ingest.store.db import classify
from ingest.store.points import GroupStats
from ingest.write.backpressure import ByteBudget, Overloaded, batch_cost
from ingest.write.pipeline import Pipeline
from ingest.write.retry import COMMIT_TRIES
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def make_batch(writer: str, seq: int, name: str = "loss", n: int = 3) -> DecodedBatch:
    proto = pb.Batch(
        writer_id=writer,
        sequence=seq,
        series=[
            pb.RunSeries(
                run_id="run-1",
                series=data_pb2.SeriesData(
                    name=name,
                    scalars=data_pb2.ScalarColumns(
                        steps=list(range(n)), values=[float(i) for i in range(n)]
                    ),
                ),
            )
        ],
    )
    return decode_batch("default", proto, 1.0, Limits(), nbytes=proto.ByteSize())


class FakeConn:
    def __init__(self) -> None:
        self.closed = False
        self.store: FakeStore | None = None

    async def commit_group(self, batches: Sequence[DecodedBatch]) -> list[CommitResult]:
        assert self.store is not None
        results, _stats = await self.store.commit_group(self, batches)
        return results

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True

    async def close(self, **_: object) -> None:
        self.closed = True


class FakeStore:
    """commit_group with writer high-water marks, a gate to hold a commit
    (so batches queue up into one group), and faults chosen per call."""

    def __init__(self) -> None:
        self.hwm: dict[str, int] = {}
        self.calls: list[list[tuple[str, int]]] = []
        self.committed: list[tuple[str, int, int]] = []  # writer, seq, alive points
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()
        self.poison: set[tuple[str, int]] = set()
        self.fail_next: list[BaseException] = []
        self.broken: set[tuple[str, int]] = set()  # fail with an "other" error

    async def commit_group(
        self, conn: Any, batches: Sequence[DecodedBatch]
    ) -> tuple[list[CommitResult], GroupStats]:
        keys = [(b.writer_id, b.sequence) for b in batches]
        self.calls.append(keys)
        if self.gate is not None:
            self.held.set()
            await self.gate.wait()
            self.gate = None
        if self.fail_next:
            raise self.fail_next.pop(0)
        alive = {
            k: sum(int(c.alive.sum()) for c in b.chunks) for k, b in zip(keys, batches, strict=True)
        }
        if any(k in self.poison and alive[k] for k in keys):
            raise asyncpg.exceptions.CharacterNotInRepertoireError(
                'invalid byte sequence for encoding "UTF8": 0x00'
            )
        if any(k in self.broken for k in keys):
            raise asyncpg.exceptions.InsufficientPrivilegeError("permission denied")
        hwm = dict(self.hwm)
        results = []
        done = []
        for b, k in zip(batches, keys, strict=True):
            last = hwm.get(b.writer_id, 0)
            if b.sequence <= last:
                results.append(CommitResult(duplicate_batch=True))
            elif b.sequence == last + 1:
                hwm[b.writer_id] = b.sequence
                results.append(CommitResult())
                done.append((b.writer_id, b.sequence, alive[k]))
                b.outcome.accepted += alive[k]
            else:
                results.append(CommitResult(gap=SequenceGap(b.writer_id, last + 1, b.sequence)))
        self.hwm = hwm
        self.committed.extend(done)
        return results, GroupStats(batches=len(batches))


class Connector:
    def __init__(self) -> None:
        self.count = 0
        self.fail_with: BaseException | None = None

    async def __call__(self) -> FakeConn:
        self.count += 1
        if self.fail_with is not None:
            raise self.fail_with
        return FakeConn()


class Sessions:
    """The store's side of the pipeline (ingest.write.ports.CommitStore)."""

    def __init__(self, store: FakeStore, connector: Connector) -> None:
        self.store = store
        self.connector = connector

    async def connect(self) -> FakeConn:
        conn = await self.connector()
        conn.store = self.store
        return conn

    def classify(self, exc: BaseException) -> Fault:
        return classify(exc)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def connector() -> Connector:
    return Connector()


def make_pipeline(store: FakeStore, connector: Connector, **kw: Any) -> Pipeline:
    """Workers on the test's loop, so the fake store's gates can hold them."""
    kw.setdefault("workers", 1)
    kw.setdefault("threads", False)
    return Pipeline(Sessions(store, connector), Metrics(CollectorRegistry(), process=False), **kw)


async def gated(p: Pipeline, store: FakeStore) -> asyncio.Future[CommitResult]:
    """Hold the worker in a commit of a first batch, so what is submitted
    next waits and is committed as one group."""
    store.gate = asyncio.Event()
    fut = await p.submit(make_batch("gate", 1))
    await asyncio.wait_for(store.held.wait(), 5)
    return fut


async def test_a_refused_batch_is_isolated_and_its_neighbours_commit(
    store: FakeStore, connector: Connector
) -> None:
    p = make_pipeline(store, connector)
    await p.start()
    first = await gated(p, store)
    batches = [make_batch(f"w{i}", 1) for i in range(6)]
    store.poison.add(("w3", 1))
    futures = [await p.submit(b) for b in batches]
    assert store.gate is not None
    store.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *futures), 5)
    # The six were first tried as one group, which failed, then bisected.
    assert [("w0", 1), ("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1), ("w5", 1)] in store.calls
    assert all(r == CommitResult() for r in results)
    committed = {(w, s): n for w, s, n in store.committed}
    for i in (0, 1, 2, 4, 5):
        assert committed[(f"w{i}", 1)] == 3, f"neighbour w{i} lost"
        assert batches[i].outcome.accepted == 3
    # The refused batch: committed alone with no live points (only its
    # high-water mark moves), answered with every point rejected and why.
    assert committed[("w3", 1)] == 0
    assert store.calls[-1] == [("w3", 1)] or [("w3", 1)] in store.calls
    refused = batches[3].outcome
    assert refused.accepted == 0 and refused.rejected == 3
    assert refused.by_reason == {INVALID_VALUE: 3}
    message = refused.examples[0][6]
    assert message.startswith("the database refused this batch: CharacterNotInRepertoireError")
    assert "0x00" not in message  # the class and SQLSTATE, not the server's text
    assert (
        p.metrics.registry.get_sample_value("steplog_ingest_batches_total", {"outcome": "refused"})
        == 1
    )
    await p.close(1)


async def test_bisection_keeps_a_writers_order(store: FakeStore, connector: Connector) -> None:
    """The refused batch is answered before the same writer's next batch is
    committed, so that one is not a sequence gap."""
    p = make_pipeline(store, connector)
    await p.start()
    first = await gated(p, store)
    batches = [make_batch("other", 1), make_batch("w", 1), make_batch("w", 2), make_batch("w", 3)]
    store.poison.add(("w", 2))
    futures = [await p.submit(b) for b in batches]
    assert store.gate is not None
    store.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *futures), 5)
    assert all(r.gap is None and not r.duplicate_batch for r in results)
    assert [(w, s) for w, s, _ in store.committed if w == "w"] == [("w", 1), ("w", 2), ("w", 3)]
    assert batches[2].outcome.rejected == 3 and batches[3].outcome.accepted == 3
    # And the writer's next batch, later, flows as usual.
    after = make_batch("w", 4)
    assert (await asyncio.wait_for(await p.submit(after), 5)) == CommitResult()
    assert after.outcome.accepted == 3
    await p.close(1)


async def test_transient_errors_are_retried_on_a_fresh_connection(
    store: FakeStore, connector: Connector
) -> None:
    p = make_pipeline(store, connector)
    await p.start()
    assert connector.count == 1
    store.fail_next = [
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.SerializationError("could not serialize"),
    ]
    batch = make_batch("w", 1)
    result = await asyncio.wait_for(await p.submit(batch), 10)
    assert result == CommitResult()
    assert len(store.calls) == 4
    assert connector.count == 2  # the lost connection was replaced
    # The outcome counts the last try only (each try starts from the validated state).
    assert batch.outcome.accepted == 3
    await p.close(1)


async def test_transient_errors_that_persist_fail_with_unavailable(
    store: FakeStore, connector: Connector
) -> None:
    p = make_pipeline(store, connector)
    await p.start()
    store.fail_next = [
        asyncpg.exceptions.SerializationError("could not serialize") for _ in range(COMMIT_TRIES)
    ]
    fut = await p.submit(make_batch("w", 1))
    with pytest.raises(StoreUnavailable, match="after 5 tries"):
        await asyncio.wait_for(fut, 10)
    assert len(store.calls) == COMMIT_TRIES
    # The next batch commits: nothing stays stuck.
    assert await asyncio.wait_for(await p.submit(make_batch("w", 1)), 5) == CommitResult()
    await p.close(1)


async def test_an_unknown_error_fails_only_its_batch_and_loses_nothing(
    store: FakeStore, connector: Connector
) -> None:
    """An error that is not about a value (a permission, a bug) is isolated
    too, but its batch fails retryably instead of being rejected."""
    p = make_pipeline(store, connector)
    await p.start()
    first = await gated(p, store)
    batches = [make_batch(f"w{i}", 1) for i in range(3)]
    store.broken.add(("w1", 1))
    futures = [await p.submit(b) for b in batches]
    assert store.gate is not None
    store.gate.set()
    await asyncio.wait_for(first, 5)
    assert await asyncio.wait_for(futures[0], 5) == CommitResult()
    assert await asyncio.wait_for(futures[2], 5) == CommitResult()
    with pytest.raises(StoreUnavailable, match="InsufficientPrivilegeError"):
        await asyncio.wait_for(futures[1], 5)
    assert ("w1", 1) not in {(w, s) for w, s, _ in store.committed}
    await p.close(1)


async def test_batches_whose_caller_is_gone_are_not_committed(
    store: FakeStore, connector: Connector
) -> None:
    p = make_pipeline(store, connector)
    await p.start()
    first = await gated(p, store)
    keep = await p.submit(make_batch("a", 1))
    gone = await p.submit(make_batch("b", 1))
    gone.cancel()  # the RPC ended: the client was told this batch failed
    assert store.gate is not None
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(first, keep), 5)
    assert ("b", 1) not in {k for call in store.calls for k in call}
    assert ("a", 1) in {(w, s) for w, s, _ in store.committed}
    assert (
        p.metrics.registry.get_sample_value(
            "steplog_ingest_batches_total", {"outcome": "cancelled"}
        )
        == 1
    )
    await p.close(1)


async def test_a_committed_batch_keeps_only_its_outcome(
    store: FakeStore, connector: Connector
) -> None:
    p = make_pipeline(store, connector)
    await p.start()
    batch = make_batch("w", 1, n=1000)
    assert batch_cost(batch) > 1000 * 16
    await asyncio.wait_for(await p.submit(batch), 5)
    assert batch.chunks == [] and batch.outcome.accepted == 1000
    await p.close(1)


async def test_a_failed_worker_is_restarted_and_nothing_hangs(
    store: FakeStore, connector: Connector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure nothing below handles (here: a store that answers with no
    results) fails its batches and restarts the worker."""
    p = make_pipeline(store, connector)
    await p.start()
    real = store.commit_group

    async def broken(conn: Any, batches: Sequence[DecodedBatch]) -> Any:
        _, stats = await real(conn, batches)
        return [], stats

    monkeypatch.setattr(store, "commit_group", broken)
    fut = await p.submit(make_batch("w", 1))
    with pytest.raises(StoreUnavailable, match="restarted"):
        await asyncio.wait_for(fut, 5)
    assert p.metrics.registry.get_sample_value("steplog_ingest_pipeline_restarts_total") == 1
    monkeypatch.setattr(store, "commit_group", real)
    # The restarted worker takes the writer's next try.
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            result = await asyncio.wait_for(await p.submit(make_batch("w", 2)), 5)
            break
        except StoreUnavailable:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    assert result == CommitResult()
    await p.close(1)


async def test_a_worker_that_cannot_connect_reports_unhealthy_and_fails_fast(
    store: FakeStore, connector: Connector
) -> None:
    p = make_pipeline(store, connector, workers=2)
    seen: list[tuple[bool, str]] = []
    changed = asyncio.Event()

    async def on_health(ok: bool, problem: str) -> None:
        seen.append((ok, problem))
        changed.set()

    p.on_health = on_health
    await p.start()
    assert p.healthy
    # Lose the connection and forbid new ones (a role whose login was revoked).
    connector.fail_with = asyncpg.exceptions.InvalidAuthorizationSpecificationError(
        'role "w" is not permitted to log in'
    )
    store.fail_next = [asyncpg.exceptions.AdminShutdownError("terminating connection")] * 10
    fut = await p.submit(make_batch("w", 1))
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(fut, 10)
    await asyncio.wait_for(changed.wait(), 5)
    assert not p.healthy and seen[-1][0] is False
    assert "InvalidAuthorizationSpecificationError" in seen[-1][1]
    # Meanwhile a batch for that worker is answered at once, not queued.
    with pytest.raises(StoreUnavailable, match="InvalidAuthorizationSpecificationError"):
        await p.submit(make_batch("w", 2))
    # Login returns: the worker reconnects by itself, health follows.
    changed.clear()
    connector.fail_with = None
    store.fail_next = []
    await asyncio.wait_for(changed.wait(), 10)
    assert p.healthy and seen[-1] == (True, "")
    assert await asyncio.wait_for(await p.submit(make_batch("w", 1)), 5) == CommitResult()
    await p.close(1)


async def test_the_queue_is_bounded_in_bytes(store: FakeStore, connector: Connector) -> None:
    p = make_pipeline(store, connector, queue_bytes=10_000)
    await p.start()
    first = await gated(p, store)  # holds its own bytes until committed
    big = make_batch("a", 1, n=10)
    await p.submit(big, cost=6_000)
    with pytest.raises(Overloaded) as info:
        await p.submit(make_batch("b", 1), cost=6_000, wait=0.05)
    assert info.value.bound == "queue"
    waiting = asyncio.ensure_future(p.submit(make_batch("c", 1), cost=6_000))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # backpressure: it waits for room
    assert store.gate is not None
    store.gate.set()
    fut = await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(asyncio.gather(first, fut), 5)
    await p.close(1)


async def test_byte_budget_order_timeouts_and_oversize() -> None:
    b = ByteBudget(100)
    await b.acquire(60)
    second = asyncio.ensure_future(b.acquire(60))
    third = asyncio.ensure_future(b.acquire(10))
    await asyncio.sleep(0)
    assert not second.done() and not third.done()  # first come, first served
    with pytest.raises(TimeoutError):
        await b.acquire(50, wait=0.01)
    b.release(60)
    await asyncio.wait_for(asyncio.gather(second, third), 1)
    assert b.used == 70
    b.release(70)
    await b.acquire(1000)  # larger than the limit: passes when nothing else is held
    assert b.used == 1000
    cancelled = asyncio.ensure_future(b.acquire(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    b.release(1000)  # grants the waiter in the same moment it is cancelled
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert b.used == 0 and not b._waiters


def test_errors_are_classified() -> None:
    assert classify(asyncpg.exceptions.CharacterNotInRepertoireError("x")) == "refused"
    assert classify(asyncpg.exceptions.CheckViolationError("x")) == "refused"
    assert classify(asyncpg.exceptions.ProgramLimitExceededError("x")) == "refused"
    assert classify(asyncpg.exceptions.UniqueViolationError("x")) == "conflict"
    assert classify(asyncpg.exceptions.DeadlockDetectedError("x")) == "conflict"
    assert classify(asyncpg.exceptions.AdminShutdownError("x")) == "unavailable"
    assert classify(asyncpg.exceptions.DiskFullError("x")) == "unavailable"
    assert classify(ConnectionResetError()) == "unavailable"
    assert classify(TimeoutError()) == "unavailable"
    assert classify(asyncpg.exceptions.InsufficientPrivilegeError("x")) == "other"
    assert classify(ValueError("a bug")) == "other"


async def test_workers_on_threads_of_their_own(store: FakeStore, connector: Connector) -> None:
    """As the service runs them: each worker's loop on its own thread, results
    and health handed back to the caller's loop."""
    p = make_pipeline(store, connector, workers=2, threads=True)
    seen: list[bool] = []
    p.on_health = lambda ok, problem: _record(seen, ok)
    await p.start()
    assert p.healthy
    batches = [make_batch(f"w{i}", 1) for i in range(6)]
    store.poison.add(("w4", 1))
    futures = [await p.submit(b) for b in batches]
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert all(r == CommitResult() for r in results)
    assert batches[4].outcome.rejected == 3
    assert {(w, n) for w, _, n in store.committed} == {
        ("w0", 3),
        ("w1", 3),
        ("w2", 3),
        ("w3", 3),
        ("w4", 0),
        ("w5", 3),
    }
    cancelled = await p.submit(make_batch("w0", 2))
    cancelled.cancel()
    await p.close(2)
    assert all(w.thread is None or not w.thread.is_alive() for w in p._workers)
    # Every slot and byte was given back.
    assert all(w.budget.used == 0 for w in p._workers)


async def _record(seen: list[bool], ok: bool) -> None:
    seen.append(ok)
