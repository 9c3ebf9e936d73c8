"""Faults in the middle of a stream: nothing lost, nothing doubled.

kill -9 of the service, a PostgreSQL restart, an S3 outage while a run logs
images and scalars, and an offline spool replayed twice. Every check
compares what was logged with what SQL finds stored."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest.devstack import LocalStack
from steplog import Experiment, Run
from steplog.client import Client
from tests import imagegen
from tests.sql import fetchval, stored_points
from tests.support import ServiceProcess, free_port

NAMES = [f"m{i}" for i in range(20)]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def log_steps(run: Run, start: int, stop: int) -> None:
    for step in range(start, stop):
        for name in NAMES:
            run.log(name, step * 0.5 + len(name), step=step)


def expected(steps: int) -> list[tuple[str, int, float]]:
    return sorted((n, s, s * 0.5 + len(n)) for n in NAMES for s in range(steps))


def test_kill_9_service_mid_stream(
    service_env: dict[str, str], experiment_name: str, database_url: str
) -> None:
    port = free_port()
    svc = ServiceProcess(service_env, port=port).start()
    try:
        client = Client(svc.address, "default")
        run = Run._create(client, experiment_name)
        writer = client.writer
        log_steps(run, 0, 2000)
        wait_until(lambda: writer.stats.points_acked > 0, 30, "a first acknowledgement")
        svc.kill()  # kill -9 while batches are in flight
        log_steps(run, 2000, 4000)  # logging goes on while the service is down
        svc = ServiceProcess(service_env, port=port).start()
        log_steps(run, 4000, 5000)
        assert run.flush(120), writer.stats
        assert writer.stats.reconnects >= 1
        assert stored_points(database_url, run.id) == expected(5000)
        assert writer.stats.rejected == 0
    finally:
        svc.stop()


def test_postgres_restart_mid_stream(
    stack: LocalStack, url: str, experiment_name: str, database_url: str
) -> None:
    client = Client(url, "default")
    run = Run._create(client, experiment_name)
    writer = client.writer
    log_steps(run, 0, 2000)
    wait_until(lambda: writer.stats.points_acked > 0, 30, "a first acknowledgement")
    stack.stop_postgres()
    log_steps(run, 2000, 3000)
    stack.start_postgres()
    log_steps(run, 3000, 4000)
    assert run.flush(120), writer.stats
    assert stored_points(database_url, run.id) == expected(4000)
    # The service recovered for everything else too.
    run.complete()
    assert run.get_status() == "Completed"


def test_offline_spool_replayed_twice_stores_each_point_once(
    url: str, experiment_name: str, database_url: str, tmp_path: Path
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    spool = tmp_path / "spool"
    script = (
        "from steplog import Run\n"
        "run = Run.get_context()\n"
        "for step in range(3000):\n"
        "    run.log('loss', 1.0 / (step + 1), step=step)\n"
        "    run.log('acc', step / 3000, step=step)\n"
        "run.log('note', 'offline')\n"
        "assert run.flush(30)\n"
    )
    env = dict(os.environ)
    env.pop("STEPLOG_URL", None)
    env.update(
        {
            "STEPLOG_RUN_ID": run.id,
            "STEPLOG_OFFLINE": "true",
            "STEPLOG_SPOOL_DIR": str(spool),
            "STEPLOG_MAX_BATCH_POINTS": "1000",
        }
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert any(spool.rglob("*")), "the offline run wrote no spool"
    assert stored_points(database_url, run.id) == []  # nothing sent while offline
    for attempt in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "steplog.cli", "sync", str(spool), "--url", url],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        if attempt == 0:
            assert "6001 accepted" in out, out
        else:
            assert "0 accepted" in out and "already stored" in out, out
    metrics = run.get_metrics()
    assert metrics["loss"] == [1.0 / (s + 1) for s in range(3000)]
    assert len(metrics["acc"]) == 3000 and metrics["note"] == "offline"


@pytest.mark.parametrize("policy", ["drop_oldest", "spool"])
def test_memory_bound_policies_with_the_service_down(
    policy: str, experiment_name: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody listening, log() never blocks under drop_oldest and spool;
    drop_oldest counts what it dropped, spool keeps it on disk."""
    monkeypatch.setenv("STEPLOG_ON_FULL", policy)
    monkeypatch.setenv("STEPLOG_MAX_BUFFERED_BYTES", "240000")  # ~10,000 points
    monkeypatch.setenv("STEPLOG_SPOOL_DIR", str(tmp_path / "spool"))
    run = Experiment(experiment_name, url=url).start_logging()
    down = Client(f"127.0.0.1:{free_port()}", "default")
    detached = Run(_proto=run._proto, _client=down)
    started = time.perf_counter()
    for step in range(50_000):
        detached.log("loss", 1.0, step=step)
    elapsed = time.perf_counter() - started
    assert elapsed < 20  # it returned; nothing waited on the network
    stats = down.writer.stats
    if policy == "drop_oldest":
        assert stats.dropped >= 40_000
    else:
        assert stats.spooled > 0
    assert not down.writer.flush(0.5)
    # Nobody will ever listen there: close now rather than wait at exit.
    down.writer.close(0.5)


def test_scalars_keep_flowing_while_s3_is_down(
    stack: LocalStack, url: str, experiment_name: str, database_url: str
) -> None:
    """Images travel on their own stream: while the object store is down they
    wait (and are retried), and every scalar logged meanwhile is stored."""
    run = Experiment(experiment_name, url=url).start_logging()
    writer = run._client.writer
    # The process's writer is shared by the session's tests: count from here.
    rejected_before = writer.stats.rejected
    pictures = [imagegen.png(8, 8, seed=7000 + i) for i in range(40)]
    log_steps(run, 0, 100)
    run.log_image("frames", pictures[0], step=0)
    assert run.flush(60), writer.stats
    stack.stop_s3()
    try:
        for step in range(100, 400):
            for name in NAMES:
                run.log(name, step * 0.5 + len(name), step=step)
            if step % 10 == 0:
                run.log_image("frames", pictures[step // 10], step=step)
        # Every scalar is stored while S3 is still down.
        wait_until(
            lambda: len(stored_points(database_url, run.id)) == len(NAMES) * 400,
            60,
            "the scalars logged during the outage",
        )
        images = fetchval(
            database_url,
            "SELECT count(*) FROM image_points p JOIN series s USING (series_id)"
            " WHERE s.run_id = $1",
            run.id,
        )
        assert images == 1  # the images wait for S3
    finally:
        stack.start_s3()
    assert run.flush(180), writer.stats
    assert stored_points(database_url, run.id) == expected(400)
    images = fetchval(
        database_url,
        "SELECT count(*) FROM image_points p JOIN series s USING (series_id) WHERE s.run_id = $1",
        run.id,
    )
    assert images == 31
    assert writer.stats.rejected == rejected_before
