"""Exactly once per (workspace, writer), across service replicas and shutdowns.

Two real service processes on one database; raw batches with the generated
stubs, so each test controls sequence numbers, resends and lost answers; what
is stored is counted with SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from ingest.devstack import LocalStack
from steplog import Experiment
from steplog._writer import RejectedPointsWarning
from steplog.v1 import data_pb2, ingest_service_pb2_grpc
from steplog.v1 import ingest_service_pb2 as pb
from tests.sql import fetch, fetchval
from tests.support import ServiceProcess

WAIT = 30.0  # upper bound for anything these tests wait on


def series(
    run_id: str, name: str, values: list[float], steps: list[int] | None = None
) -> pb.RunSeries:
    return pb.RunSeries(
        run_id=run_id,
        series=data_pb2.SeriesData(
            name=name, scalars=data_pb2.ScalarColumns(steps=steps or [], values=values)
        ),
    )


def batch(writer: str, seq: int, *items: pb.RunSeries) -> pb.Batch:
    return pb.Batch(writer_id=writer, sequence=seq, series=list(items))


def stub(address: str) -> ingest_service_pb2_grpc.IngestServiceStub:
    return ingest_service_pb2_grpc.IngestServiceStub(grpc.insecure_channel(address))


def write(
    s: ingest_service_pb2_grpc.IngestServiceStub, b: pb.Batch, workspace: str = "default"
) -> pb.WriteResponse:
    return s.Write(pb.WriteRequest(workspace=workspace, batch=b), timeout=WAIT)


class Stream:
    """An Ingest stream whose requests the test feeds one by one; it can be
    dropped before its acknowledgements are read."""

    def __init__(self, address: str, workspace: str = "default") -> None:
        self.workspace = workspace
        self._requests: queue.Queue[pb.IngestRequest | None] = queue.Queue()
        self.channel = grpc.insecure_channel(address)
        stub = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.call = stub.Ingest(self._feed(), timeout=120)

    def _feed(self) -> Iterator[pb.IngestRequest]:
        while (item := self._requests.get()) is not None:
            yield item

    def send(self, b: pb.Batch) -> None:
        self._requests.put(pb.IngestRequest(workspace=self.workspace, batch=b))

    def ack(self) -> pb.IngestResponse:
        return next(self.call)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class HeldLock:
    """A transaction of the test's own holding row locks until released: to
    the service, a database that is slow to commit."""

    def __init__(self, url: str, query: str, *args: Any) -> None:
        self.url, self.query, self.args = url, query, args
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                await conn.execute(self.query, *self.args)
                self._held.set()
                await asyncio.to_thread(self._release.wait, 4 * WAIT)
        finally:
            await conn.close()

    def __enter__(self) -> HeldLock:
        self._thread.start()
        assert self._held.wait(WAIT), "could not take the lock"
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(WAIT)

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_waiters(url: str) -> set[int]:
    """Backends of this database waiting for a lock."""
    rows = fetch(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'",
    )
    return {r["pid"] for r in rows}


def points_by_series(url: str, run_id: str) -> dict[str, int]:
    rows = fetch(
        url,
        "SELECT s.name, count(*) AS n FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 GROUP BY s.name",
        run_id,
    )
    return {r["name"]: r["n"] for r in rows}


def mark(url: str, writer: str) -> Any:
    """The writer's high-water mark (the writer id is unique to the test)."""
    return fetchval(url, "SELECT max(last_sequence) FROM writers WHERE writer_id = $1", writer)


@pytest.fixture(scope="module")
def replicas(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    logs = tmp_path_factory.mktemp("replicas")
    a = ServiceProcess(service_env, log_path=logs / "a.log").start()
    b = ServiceProcess(service_env, log_path=logs / "b.log").start()
    yield a, b
    a.stop()
    b.stop()


def test_first_batch_sent_to_two_replicas_at_once_is_stored_once(
    replicas: tuple[ServiceProcess, ServiceProcess], experiment_name: str, database_url: str
) -> None:
    a, b = replicas
    run = Experiment(experiment_name, url=a.address).start_logging()
    stubs = [stub(a.address), stub(b.address)]
    rounds = 60
    barrier = threading.Barrier(2)

    def send(i: int, k: int, writer: str) -> pb.WriteResponse:
        # Unstepped points: a second commit would append them again.
        req = batch(writer, 1, series(run.id, f"r{i}", [float(i)] * 5))
        barrier.wait(WAIT)
        return write(stubs[k], req)

    with ThreadPoolExecutor(2) as pool:
        for i in range(rounds):
            writer = f"first-{i}-{uuid.uuid4().hex}"
            replies = list(pool.map(lambda k, i=i, w=writer: send(i, k, w), (0, 1)))
            fresh = [r for r in replies if not r.duplicate_batch]
            assert len(fresh) == 1, f"round {i}: {replies}"
            for r in replies:  # the duplicate answers with the original result
                assert (r.result.accepted, r.result.rejected) == (5, 0), f"round {i}: {r}"
    assert points_by_series(database_url, run.id) == {f"r{i}": 5 for i in range(rounds)}


def test_a_window_resent_to_the_other_replica_meanwhile_is_stored_once(
    replicas: tuple[ServiceProcess, ServiceProcess], experiment_name: str, database_url: str
) -> None:
    """One replica gets batches 1..8 while the other gets the same 1..8 (a
    client that gave up on the first and resent its window): each batch is
    committed once, the mark ends at 8 and never went back (batch 9 follows)."""
    a, b = replicas
    run = Experiment(experiment_name, url=a.address).start_logging()
    k = 8
    for i in range(15):
        writer = f"window-{i}-{uuid.uuid4().hex}"
        name = f"w{i}"
        reqs = [batch(writer, s, series(run.id, name, [float(s)] * 3)) for s in range(1, k + 1)]
        streams = [Stream(a.address), Stream(b.address)]
        try:
            for st in streams:
                for r in reqs:
                    st.send(r)
            acks = [[st.ack() for _ in reqs] for st in streams]
        finally:
            for st in streams:
                st.close()
        fresh = sorted(x.sequence for side in acks for x in side if not x.duplicate_batch)
        assert fresh == list(range(1, k + 1)), f"round {i}: committed {fresh}"
        for side in acks:
            assert [x.sequence for x in side] == list(range(1, k + 1))
            assert all(x.result.accepted == 3 for x in side), f"round {i}: {side}"
        assert mark(database_url, writer) == k
        assert points_by_series(database_url, run.id)[name] == 3 * k
        nxt = write(stub(b.address), batch(writer, k + 1, series(run.id, name, [0.0])))
        assert not nxt.duplicate_batch and nxt.result.accepted == 1


def test_a_late_old_batch_is_a_duplicate_and_the_mark_stays(
    replicas: tuple[ServiceProcess, ServiceProcess], experiment_name: str, database_url: str
) -> None:
    a, b = replicas
    run = Experiment(experiment_name, url=a.address).start_logging()
    writer = f"late-{uuid.uuid4().hex}"
    sa, sb = stub(a.address), stub(b.address)
    for s in range(1, 6):
        write(sa, batch(writer, s, series(run.id, "x", [float(s)], [s])))
    late = write(sb, batch(writer, 3, series(run.id, "x", [3.0], [3])))
    assert late.duplicate_batch and late.result.accepted == 1
    assert mark(database_url, writer) == 5
    nxt = write(sb, batch(writer, 6, series(run.id, "x", [6.0], [6])))
    assert not nxt.duplicate_batch and nxt.result.accepted == 1
    assert points_by_series(database_url, run.id) == {"x": 6}


def test_writers_are_per_workspace(
    replicas: tuple[ServiceProcess, ServiceProcess], experiment_name: str, database_url: str
) -> None:
    """The same writer id and sequence numbers in two workspaces are two
    writers: both are stored, neither is a duplicate, and a gap error says
    nothing of the other workspace's writer."""
    a, b = replicas
    tag = uuid.uuid4().hex[:8]
    ws_a, ws_b = f"team-a-{tag}", f"team-b-{tag}"
    run_a = Experiment(ws_a, experiment_name, url=a.address).start_logging()
    run_b = Experiment(ws_b, experiment_name, url=a.address).start_logging()
    writer = f"shared-{uuid.uuid4().hex}"
    sa, sb = stub(a.address), stub(b.address)
    for s in range(1, 6):
        r = write(sa, batch(writer, s, series(run_a.id, "x", [1.0])), ws_a)
        assert not r.duplicate_batch and r.result.accepted == 1
    r = write(sb, batch(writer, 1, series(run_b.id, "x", [2.0, 3.0])), ws_b)
    assert not r.duplicate_batch and r.result.accepted == 2
    assert points_by_series(database_url, run_a.id) == {"x": 5}
    assert points_by_series(database_url, run_b.id) == {"x": 2}
    with pytest.raises(grpc.RpcError) as err:
        write(sa, batch(writer, 9, series(run_b.id, "x", [4.0])), ws_b)
    assert err.value.code() == grpc.StatusCode.ABORTED
    details = err.value.details() or ""
    assert "expected batch sequence 2, got 9" in details
    assert "6" not in details.replace(writer, "")  # workspace A's next number
    # Workspace A's writer goes on where it was.
    r = write(sb, batch(writer, 6, series(run_a.id, "x", [1.0])), ws_a)
    assert not r.duplicate_batch and r.result.accepted == 1


def rejecting_batch(writer: str, run_id: str) -> pb.Batch:
    """3 accepted points and 5 rejected for 4 different reasons."""
    return batch(
        writer,
        1,
        series(run_id, "loss", [0.0, 1.0, 2.0, 1.5, 9.0], [0, 1, 2, 1, -1]),
        series(run_id, "n" * 300, [1.0]),
        series(f"no-such-run-{uuid.uuid4().hex}", "loss", [1.0, 2.0]),
    )


def assert_original_result(result: pb.BatchResult) -> None:
    assert (result.accepted, result.duplicates, result.rejected) == (3, 0, 5), result
    assert {c.reason: c.count for c in result.reject_counts} == {
        pb.REJECT_REASON_STEP_NOT_INCREASING: 1,
        pb.REJECT_REASON_INVALID_STEP: 1,
        pb.REJECT_REASON_INVALID_NAME: 1,
        pb.REJECT_REASON_RUN_NOT_FOUND: 2,
    }
    got = {(p.name[:4], p.index, p.reason) for p in result.rejected_points}
    assert got == {
        ("loss", 3, pb.REJECT_REASON_STEP_NOT_INCREASING),
        ("loss", 4, pb.REJECT_REASON_INVALID_STEP),
        ("nnnn", 0, pb.REJECT_REASON_INVALID_NAME),
        ("loss", 0, pb.REJECT_REASON_RUN_NOT_FOUND),
        ("loss", 1, pb.REJECT_REASON_RUN_NOT_FOUND),
    }
    assert all(p.message for p in result.rejected_points)


def test_resend_after_a_lost_ack_carries_the_original_result(
    replicas: tuple[ServiceProcess, ServiceProcess], experiment_name: str, database_url: str
) -> None:
    """Sent to one replica, committed, the stream dropped before the ack was
    read; resent to the other: a duplicate that says what the commit decided,
    rejections included, on the stream and on the unary call."""
    a, b = replicas
    run = Experiment(experiment_name, url=a.address).start_logging()
    writer = f"lost-{uuid.uuid4().hex}"
    req = rejecting_batch(writer, run.id)
    first = Stream(a.address)
    first.send(req)
    wait_for(lambda: mark(database_url, writer) == 1, "the commit")
    first.close()  # the ack is never read
    again = Stream(b.address)
    try:
        again.send(req)
        ack = again.ack()
    finally:
        again.close()
    assert ack.sequence == 1 and ack.duplicate_batch
    assert_original_result(ack.result)
    unary = write(stub(a.address), req)
    assert unary.duplicate_batch
    assert_original_result(unary.result)
    assert points_by_series(database_url, run.id) == {"loss": 3}


def test_sigterm_while_the_database_is_slow_then_resend_stores_once(
    service_env: dict[str, str], experiment_name: str, database_url: str, tmp_path: Path
) -> None:
    """A replica stopped with SIGTERM while its commit waits on the database;
    the client resends to the other replica. Whether the stopped replica
    still commits or not, the batch is stored once and the resend's answer is
    right (no false STEP_NOT_INCREASING)."""
    b = ServiceProcess(service_env, log_path=tmp_path / "b.log").start()
    a = ServiceProcess(service_env, log_path=tmp_path / "a.log").start()
    try:
        run = Experiment(experiment_name, url=b.address).start_logging()
        sb = stub(b.address)
        # The series exists (1 point), so its row can be locked.
        write(sb, batch(f"setup-{uuid.uuid4().hex}", 1, series(run.id, "u", [0.0])))
        writer = f"slow-{uuid.uuid4().hex}"
        req = batch(writer, 1, series(run.id, "u", [float(i) for i in range(10)]))
        pool = ThreadPoolExecutor(1)
        with HeldLock(database_url, "SELECT 1 FROM series WHERE run_id = $1 FOR UPDATE", run.id):
            stream = Stream(a.address)
            stream.send(req)
            blocked = wait_for(lambda: lock_waiters(database_url), "replica A's commit to wait")
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError):
                stream.ack()  # cancelled by the shutdown, never answered
            stream.close()
            resent = pool.submit(write, sb, req)
            wait_for(lambda: lock_waiters(database_url) - blocked, "replica B's commit to wait")
        reply = resent.result(WAIT)
        pool.shutdown()
        assert (reply.result.accepted, reply.result.rejected) == (10, 0), reply
        assert a.proc.wait(WAIT) is not None
        assert points_by_series(database_url, run.id) == {"u": 11}
        assert mark(database_url, writer) == 1
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def own_database(stack: LocalStack) -> Iterator[str]:
    """A database of this test's own: a tiny retention expires every idle
    writer of its database, which must not be other tests' writers."""
    name = f"steplog_retention_{uuid.uuid4().hex[:10]}"
    yield stack.create_database(name)
    stack.drop_database(name)


def test_idle_writers_expire_and_active_ones_stay(
    service_env: dict[str, str], own_database: str, experiment_name: str, tmp_path: Path
) -> None:
    env = {**service_env, "STEPLOG_DATABASE_URL": own_database}
    retention = 2.0
    with ServiceProcess(
        env,
        log_path=tmp_path / "svc.log",
        extra_env={"STEPLOG_WRITER_RETENTION_S": str(retention)},
    ) as svc:
        run = Experiment(experiment_name, url=svc.address).start_logging()
        s = stub(svc.address)
        idle, active = f"idle-{uuid.uuid4().hex}", f"active-{uuid.uuid4().hex}"
        write(s, rejecting_batch(idle, run.id))
        seq = 1
        write(s, batch(active, seq, series(run.id, "a", [0.0])))

        def idle_gone() -> bool:
            nonlocal seq
            seq += 1  # the active writer keeps writing meanwhile
            r = write(s, batch(active, seq, series(run.id, "a", [0.0])))
            assert not r.duplicate_batch and r.result.accepted == 1
            time.sleep(0.1)
            return mark(own_database, idle) is None

        started = time.monotonic()
        wait_for(idle_gone, "the idle writer to expire", timeout=retention * 10)
        assert time.monotonic() - started >= retention * 0.5
        assert mark(own_database, active) == seq
        # Its kept outcomes went with it; the active writer's are bounded.
        kept = fetch(
            own_database,
            "SELECT writer_id, count(*) AS n FROM writer_batches GROUP BY writer_id",
        )
        assert {r["writer_id"]: r["n"] for r in kept} == {active: min(seq, 64)}
        # After expiry the writer is unknown: its next batch is a gap.
        with pytest.raises(grpc.RpcError) as err:
            write(s, batch(idle, 2, series(run.id, "a", [0.0])))
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "expected batch sequence 1" in (err.value.details() or "")


class Proxy:
    """A TCP proxy in front of a service that can swallow the service's
    answers (the acknowledgement is lost), cut every connection, and send
    the next ones to another replica."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.drop_replies = False
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            host, _, port = self.backend.rpartition(":")
            upstream = socket.create_connection((host, int(port)), timeout=WAIT)
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (replies and self.drop_replies):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._sock.close()
        self.cut()


def test_the_client_counts_rejections_once_after_a_lost_ack(
    replicas: tuple[ServiceProcess, ServiceProcess], experiment_name: str, database_url: str
) -> None:
    """Through the client library: the batch commits on one replica, its ack
    is lost, the client resends to the other replica; `rejections()` and
    `writer_stats()` report the rejected point exactly once."""
    a, b = replicas
    proxy = Proxy(a.address)
    try:
        run = Experiment(experiment_name, url=proxy.address).start_logging()
        writer = run.writer_stats().writer_id
        proxy.drop_replies = True
        run.log("loss", 5.0, step=5)
        run.log("loss", 1.0, step=1)  # step_not_increasing
        run.log("loss", 6.0, step=6)
        wait_for(lambda: mark(database_url, writer) == 1, "the commit on replica A")
        proxy.backend, proxy.drop_replies = b.address, False
        proxy.cut()
        with pytest.warns(RejectedPointsWarning, match="STEP_NOT_INCREASING"):
            assert run.flush(WAIT)
        stats = run.writer_stats()
        assert stats.batches_acked == 1 and stats.reconnects >= 1
        assert (stats.rejected, stats.rejected_by_reason) == (1, {"STEP_NOT_INCREASING": 1})
        assert [(r.name, r.step, r.reason) for r in run.rejections()] == [
            ("loss", 1, "STEP_NOT_INCREASING")
        ]
        assert points_by_series(database_url, run.id) == {"loss": 2}
    finally:
        proxy.close()
