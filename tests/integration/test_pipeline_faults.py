"""The write pipeline under faults, against the real service, database and S3:
a batch the database refuses, a worker's connection killed, a role whose
login is revoked, a shutdown while the database is slow, and a client that
sends fast and never reads its acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from ingest.healthcheck import check
from ingest.store.sessions import application_name
from steplog import Experiment, Run
from steplog.client import Client
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from tests.sql import fetchval, stored_points
from tests.support import ServiceProcess, free_port

T = TypeVar("T")

pytestmark = pytest.mark.timeout(240)


class Sql:
    """One connection of the test's own, on a loop in a thread, so a lock
    can be held while the test goes on."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn: asyncpg.Connection = self.call(asyncpg.connect(url))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def execute(self, query: str, *args: Any) -> str:
        return self.call(self.conn.execute(query, *args))

    def fetchval(self, query: str, *args: Any) -> Any:
        return self.call(self.conn.fetchval(query, *args))

    def close(self) -> None:
        self.call(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def sql(database_url: str) -> Iterator[Sql]:
    s = Sql(database_url)
    yield s
    s.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def scrape(svc: ServiceProcess, name: str, **labels: str) -> float:
    """A sample of the service's /metrics (0 when it is not there yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def scalar_request(
    run_id: str, writer: str, seq: int, name: str, steps: list[int], values: list[float]
) -> pb.Batch:
    return pb.Batch(
        writer_id=writer,
        sequence=seq,
        series=[
            pb.RunSeries(
                run_id=run_id,
                series=data_pb2.SeriesData(
                    name=name, scalars=data_pb2.ScalarColumns(steps=steps, values=values)
                ),
            )
        ],
    )


def write(client: Client, batch: pb.Batch, timeout: float = 60) -> pb.WriteResponse:
    return client.ingest.Write(pb.WriteRequest(workspace="default", batch=batch), timeout=timeout)


def lock_waiters(sql: Sql) -> int:
    return int(
        sql.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
    )


def hold_series(sql: Sql, run_id: str, name: str) -> None:
    """Lock a series row: the next commit that writes to it waits (a slow database)."""
    sql.execute("BEGIN")
    sql.fetchval(
        "SELECT series_id FROM series WHERE run_id = $1 AND name = $2 FOR UPDATE", run_id, name
    )


def service(env: dict[str, str], tmp_path: Path, name: str, **settings: str) -> ServiceProcess:
    extra = {"STEPLOG_" + k.upper(): v for k, v in settings.items()}
    return ServiceProcess(
        env, metrics_port=free_port(), log_path=tmp_path / f"{name}.log", extra_env=extra
    )


# -- a batch the database refuses -------------------------------------------------------

# A database rule the service does not know about: series named poison-* are
# refused with a data exception, as PostgreSQL refuses a value it cannot store.
POISON_SQL = """
CREATE OR REPLACE FUNCTION h2_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.name LIKE 'poison-%' THEN
    RAISE EXCEPTION 'refused by a rule of this database' USING ERRCODE = '22023';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS h2_refuse_poison ON series;
CREATE TRIGGER h2_refuse_poison BEFORE INSERT ON series
  FOR EACH ROW EXECUTE FUNCTION h2_refuse_poison();
"""


def test_a_batch_the_database_refuses_is_answered_alone_and_its_neighbours_commit(
    service_env: dict[str, str],
    url: str,
    sql: Sql,
    database_url: str,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    sql.execute(POISON_SQL)
    tag = uuid.uuid4().hex[:8]
    try:
        with service(service_env, tmp_path, "refused", pipeline_workers="1") as svc:
            client = Client(svc.address, "default")
            run = Experiment(experiment_name, url=svc.address).start_logging()
            write(client, scalar_request(run.id, f"gate-{tag}", 1, "gate", [0], [0.0]))
            hold_series(sql, run.id, "gate")
            with ThreadPoolExecutor(8) as pool:
                # The worker waits in this commit; what comes next queues up
                # behind it and is committed as one group.
                gate = pool.submit(
                    write, client, scalar_request(run.id, f"gate-{tag}", 2, "gate", [1], [1.0])
                )
                wait_until(lambda: lock_waiters(sql) >= 1, 30, "the gate commit to wait")
                neighbours = [
                    pool.submit(
                        write,
                        client,
                        scalar_request(run.id, f"n{i}-{tag}", 1, f"ok-{i}", [0, 1], [1.0, 2.0]),
                    )
                    for i in range(5)
                ]
                # The client library's stream, one batch with a series the database refuses.
                run.log(f"poison-{tag}", 1.0, step=0)
                wait_until(
                    lambda: scrape(svc, "steplog_ingest_queue_batches") >= 6,
                    30,
                    "six batches queued behind the gate",
                )
                sql.execute("ROLLBACK")
                assert gate.result(60).result.accepted == 1
                for i, fut in enumerate(neighbours):
                    assert fut.result(60).result.accepted == 2, f"neighbour {i} lost"
            # The group of six failed as a whole, then was bisected.
            refusals = scrape(svc, "steplog_db_errors_total", operation="commit", kind="refused")
            assert refusals >= 2
            assert run.flush(60)
            refused = [r for r in run._client.writer.rejections() if r.run_id == run.id]
            assert [r.name for r in refused] == [f"poison-{tag}"]
            assert refused[0].reason == "INVALID_VALUE"
            assert "the database refused this batch" in refused[0].message
            assert "22023" in refused[0].message
            # The writer is not stalled: its next 1,000 points flow, the run completes.
            for step in range(1000):
                run.log("loss", float(step), step=step)
            assert run.flush(60)
            run.complete()
            stored = stored_points(database_url, run.id)
            assert [p for p in stored if p[0] == "loss"] == [
                ("loss", s, float(s)) for s in range(1000)
            ]
            assert {p[0] for p in stored} == {"gate", "loss"} | {f"ok-{i}" for i in range(5)}
    finally:
        sql.execute("DROP TRIGGER IF EXISTS h2_refuse_poison ON series")


# -- supervision --------------------------------------------------------------------------


def log_steps(run: Run, name: str, start: int, stop: int) -> None:
    for step in range(start, stop):
        run.log(name, step * 0.5, step=step)


def test_a_killed_worker_connection_is_replaced(
    service_env: dict[str, str],
    url: str,
    sql: Sql,
    database_url: str,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    with service(service_env, tmp_path, "terminate") as svc:
        assert svc.proc is not None
        workers = application_name(svc.proc.pid)
        run = Experiment(experiment_name, url=svc.address).start_logging()
        log_steps(run, "loss", 0, 500)
        assert run.flush(60)
        killed = sql.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            workers,
        )
        assert killed == 2  # both workers' connections
        log_steps(run, "loss", 500, 1000)
        assert run.flush(60)
        assert check(svc.address)[0]
        assert len(stored_points(database_url, run.id)) == 1000
        # Both workers reconnected by themselves.
        wait_until(
            lambda: (
                sql.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = $1",
                    workers,
                )
                == 2
            ),
            30,
            "two worker connections again",
        )


def test_a_revoked_login_turns_health_not_serving_and_the_service_recovers(
    service_env: dict[str, str],
    url: str,
    sql: Sql,
    database_url: str,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    role = f"h2_{uuid.uuid4().hex[:10]}"
    sql.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    user, at, rest = database_url.partition("@")
    assert at and user.startswith("postgresql://")
    env = dict(service_env, STEPLOG_DATABASE_URL=f"postgresql://{role}@{rest}")
    svc = service(env, tmp_path, "nologin", pipeline_workers="1", db_pool_size="2").start()
    try:
        client = Client(svc.address, "default")
        run = Experiment(experiment_name, url=svc.address).start_logging()
        log_steps(run, "loss", 0, 100)
        assert run.flush(60)
        sql.execute(f'ALTER ROLE "{role}" NOLOGIN')
        sql.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
            role,
        )
        wait_until(lambda: not check(svc.address)[0], 30, "health NOT_SERVING")
        assert "NOT_SERVING" in check(svc.address)[1]
        # A write is answered at once (retryable), not left waiting.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            write(client, scalar_request(run.id, f"w-{role}", 1, "x", [0], [1.0]), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
        log_steps(run, "loss", 100, 200)  # the client keeps these until it can send them
        sql.execute(f'ALTER ROLE "{role}" LOGIN')
        wait_until(lambda: check(svc.address)[0], 30, "health SERVING again")
        assert run.flush(60)
        assert len(stored_points(database_url, run.id)) == 200
    finally:
        svc.stop()
        sql.execute(f'DROP ROLE IF EXISTS "{role}"')


# -- shutdown with a slow database ----------------------------------------------------------


def test_batches_of_a_cancelled_stream_are_not_committed_at_shutdown(
    service_env: dict[str, str],
    url: str,
    sql: Sql,
    database_url: str,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """SIGTERM while the database is slow: the stream's call is cancelled (its
    client is told it failed and resends elsewhere); its queued batches must
    not commit afterwards."""
    tag = uuid.uuid4().hex[:8]
    svc = service(service_env, tmp_path, "sigterm", pipeline_workers="1", shutdown_grace_s="3")
    svc.start()
    try:
        client = Client(svc.address, "default")
        run = Experiment(experiment_name, url=svc.address).start_logging()
        write(client, scalar_request(run.id, f"gate-{tag}", 1, "gate", [0], [0.0]))
        hold_series(sql, run.id, "gate")
        with ThreadPoolExecutor(4) as pool:
            gate = pool.submit(
                write, client, scalar_request(run.id, f"gate-{tag}", 2, "gate", [1], [1.0])
            )
            wait_until(lambda: lock_waiters(sql) >= 1, 30, "the gate commit to wait")
            done = threading.Event()

            def requests() -> Iterator[pb.IngestRequest]:
                for seq in (1, 2, 3):
                    yield pb.IngestRequest(
                        workspace="default",
                        batch=scalar_request(run.id, f"w-{tag}", seq, f"late-{seq}", [0], [1.0]),
                    )
                done.wait(60)

            def stream() -> grpc.StatusCode:
                try:
                    for _ in client.ingest.Ingest(requests(), timeout=60):
                        pass
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            ended = pool.submit(stream)
            wait_until(lambda: scrape(svc, "steplog_ingest_queue_batches") >= 3, 30, "three queued")
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
            code = ended.result(30)
            assert code != grpc.StatusCode.OK, f"the stream ended {code}"  # told it failed
            done.set()
            # The database recovers while the service still drains its queue.
            sql.execute("ROLLBACK")
            assert svc.proc.wait(30) == 0
            with pytest.raises(grpc.RpcError):
                gate.result(30)
    finally:
        svc.stop()
    late = fetchval(
        database_url,
        "SELECT count(*) FROM series WHERE run_id = $1 AND name LIKE 'late-%'",
        run.id,
    )
    assert late == 0, "a batch of a cancelled call was committed after its client was told"


# -- memory: a client that never reads its acks ----------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


RSS_BOUND_MIB = 350


def test_memory_stays_bounded_when_a_client_sends_fast_and_never_reads_acks(
    service_env: dict[str, str],
    url: str,
    sql: Sql,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """1 MiB batches (4,000 series of 25 points each; decoded, one holds about
    6 MiB) sent as fast as the service takes them, acks never read, the database
    holding every commit: the service stops reading the stream at its bounds
    and its RSS stays under RSS_BOUND_MIB (the old count bounds held 64 such
    batches per stream, over 500 MiB)."""
    tag = uuid.uuid4().hex[:8]
    with service(
        service_env, tmp_path, "memory", pipeline_workers="1", backpressure_timeout_s="120"
    ) as svc:
        assert svc.proc is not None
        pid = svc.proc.pid
        client = Client(svc.address, "default")
        run = Experiment(experiment_name, url=svc.address).start_logging()
        write(client, scalar_request(run.id, f"gate-{tag}", 1, "gate", [0], [0.0]))
        baseline = rss_mib(pid)
        hold_series(sql, run.id, "gate")

        def hold() -> None:
            with contextlib.suppress(grpc.RpcError):
                write(client, scalar_request(run.id, f"gate-{tag}", 2, "gate", [1], [1.0]), 200)

        gate = threading.Thread(target=hold, daemon=True)
        gate.start()
        wait_until(lambda: lock_waiters(sql) >= 1, 30, "the gate commit to wait")

        def batch(seq: int) -> pb.IngestRequest:
            series = [
                pb.RunSeries(
                    run_id=run.id,
                    series=data_pb2.SeriesData(
                        name=f"m{seq}-{i}",
                        scalars=data_pb2.ScalarColumns(steps=list(range(25)), values=[0.5] * 25),
                    ),
                )
                for i in range(4000)
            ]
            return pb.IngestRequest(
                workspace="default",
                batch=pb.Batch(writer_id=f"fast-{tag}", sequence=seq, series=series),
            )

        one = batch(1)
        assert 0.9 * 2**20 < one.ByteSize() < 1.3 * 2**20
        sent = [0]
        stop = threading.Event()

        def requests() -> Iterator[pb.IngestRequest]:
            for seq in range(1, 400):
                if stop.is_set():
                    return
                yield batch(seq)
                sent[0] = seq
            stop.wait(200)

        call = client.ingest.Ingest(requests(), timeout=200)  # its acks are never read
        peak = 0.0
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(pid))
            if sent[0] != last:
                last, still_since = sent[0], time.monotonic()
            elif time.monotonic() - still_since > 3:
                break  # the service stopped reading: backpressure
            time.sleep(0.05)
        for _ in range(20):
            peak = max(peak, rss_mib(pid))
            time.sleep(0.05)
        inflight = scrape(svc, "steplog_ingest_inflight_bytes")
        stop.set()
        call.cancel()  # the client goes away; its queued batches are dropped
        sql.execute("ROLLBACK")
        gate.join(60)
        print(f"sent={sent[0]} baseline={baseline:.0f} MiB peak={peak:.0f} MiB inflight={inflight}")
        assert 5 < sent[0] < 200, "the stream was not held back at its bound"
        assert inflight <= 64 * 2**20 + 8 * 2**20
        assert peak < RSS_BOUND_MIB, f"RSS {peak:.0f} MiB (baseline {baseline:.0f} MiB)"
        wait_until(lambda: scrape(svc, "steplog_ingest_inflight_bytes") == 0, 30, "memory released")
        assert check(svc.address)[0]


# -- load shedding ---------------------------------------------------------------------------


def test_a_call_that_waits_too_long_for_room_is_shed_with_retry_info(
    service_env: dict[str, str],
    url: str,
    sql: Sql,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    with service(
        service_env,
        tmp_path,
        "shed",
        pipeline_workers="1",
        service_inflight_bytes=str(2**20),
        backpressure_timeout_s="0.5",
    ) as svc:
        client = Client(svc.address, "default")
        run = Experiment(experiment_name, url=svc.address).start_logging()
        write(client, scalar_request(run.id, f"gate-{tag}", 1, "gate", [0], [0.0]))
        hold_series(sql, run.id, "gate")
        with ThreadPoolExecutor(2) as pool:
            gate = pool.submit(
                write,
                client,
                scalar_request(
                    run.id, f"gate-{tag}", 2, "gate", list(range(1, 40_000)), [1.0] * 39_999
                ),
            )
            wait_until(lambda: lock_waiters(sql) >= 1, 30, "the gate commit to wait")
            big = scalar_request(
                run.id, f"big-{tag}", 1, "big", list(range(120_000)), [2.0] * 120_000
            )
            assert big.ByteSize() > 2**20
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                write(client, big, timeout=30)
            waited = time.monotonic() - started
            sql.execute("ROLLBACK")
            assert gate.result(60).result.accepted == 39_999
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0.4 < waited < 10
        status = rpc_status.from_call(err.value)
        assert status is not None
        infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(infos) == 1
        info = error_details_pb2.RetryInfo()
        infos[0].Unpack(info)
        assert info.retry_delay.ToTimedelta().total_seconds() > 0
        assert scrape(svc, "steplog_ingest_shed_total", bound="service") == 1
        # Once there is room the same batch is taken.
        assert write(client, big).result.accepted == 120_000
