"""Several independent writers in one process (`Run.new_stream`): each stream
has its own writer id and sequence numbers, is acknowledged on its own, and
stores each of its points exactly once, also when the service is killed
under it (its unacknowledged batches are resent and deduplicated by its own
high-water mark). Real service process; what is stored is counted with SQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from steplog import Experiment, Run
from tests.sql import fetch
from tests.support import ServiceProcess

STREAMS = 6
NAMES = ("loss", "acc")
STEPS = 1500
WAIT = 60.0


def _log(stream: Run, rank: int, steps: range, logged: threading.Event | None) -> None:
    log = stream.log
    for step in steps:
        for name in NAMES:
            log(name, rank * 1e6 + step, step=step)
        if logged is not None and step == steps.start + len(steps) // 2:
            logged.set()


def test_streams_of_one_process_each_have_a_writer_and_store_every_point_once(
    service_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    experiment_name: str,
) -> None:
    # Small batches, sent often: many sequence numbers per stream, and
    # batches in flight when the service dies.
    monkeypatch.setenv("STEPLOG_MAX_BATCH_POINTS", "50")
    monkeypatch.setenv("STEPLOG_FLUSH_INTERVAL", "0.01")
    monkeypatch.setenv("STEPLOG_SPOOL_DIR", str(tmp_path / "spool"))
    proc = ServiceProcess(service_env, log_path=tmp_path / "service.log").start()
    try:
        # A workspace of its own, without quotas: its usage row counts by increments.
        workspace = f"ws-{experiment_name}"
        run = Experiment(workspace, experiment_name, url=proc.address).start_logging()
        streams = [run.new_stream(labels={"rank": str(r)}) for r in range(STREAMS)]
        assert all(s.id == run.id for s in streams)
        assert [s.labels for s in streams] == [{"rank": str(r)} for r in range(STREAMS)]

        # First half, everything acknowledged, then the second half with a
        # kill -9 of the service in the middle of it.
        threads = [
            threading.Thread(target=_log, args=(s, r, range(STEPS // 2), None))
            for r, s in enumerate(streams)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s.flush(WAIT) for s in streams)
        before = [s.writer_stats() for s in streams]
        assert all(b.points_acked == STEPS // 2 * len(NAMES) for b in before)

        halfway = [threading.Event() for _ in streams]
        threads = [
            threading.Thread(target=_log, args=(s, r, range(STEPS // 2, STEPS), halfway[r]))
            for r, s in enumerate(streams)
        ]
        for t in threads:
            t.start()
        for e in halfway:
            assert e.wait(WAIT)
        proc.kill()
        proc.start()
        for t in threads:
            t.join()
        assert all(s.flush(WAIT) for s in streams)
        stats = [s.writer_stats() for s in streams]
        run.complete()
    finally:
        proc.stop()

    # Each stream its own writer, none of them the process's shared one.
    ids = [s.writer_id for s in stats]
    assert len(set(ids)) == STREAMS
    assert run._client.writer.writer_id not in ids
    assert [s.writer_id for s in before] == ids  # a kill -9 is no new writer
    for s in stats:
        assert s.points_logged == STEPS * len(NAMES)
        assert s.points_acked == STEPS * len(NAMES)
        assert s.rejected == s.dropped == s.refused == 0
        assert s.points_unacked == s.points_buffered == 0
    assert any(s.reconnects for s in stats)  # the kill reached the streams

    # Each writer's own sequence, from 1 up to its own number of batches.
    marks = {
        r["writer_id"]: r["last_sequence"]
        for r in fetch(
            service_env["STEPLOG_DATABASE_URL"],
            "SELECT writer_id, last_sequence FROM writers WHERE writer_id = ANY($1::text[])",
            ids,
        )
    }
    assert sorted(marks) == sorted(ids)
    for s in stats:
        # Batches of at most 50 points: at least 60 of them, each counted once.
        assert marks[s.writer_id] == s.batches_acked >= STEPS * len(NAMES) // 50

    # Every point of every rank stored once, under its rank's label.
    rows = fetch(
        service_env["STEPLOG_DATABASE_URL"],
        "SELECT s.labels->>'rank' AS rank, s.name, count(*) AS n,"
        " count(DISTINCT p.step) AS steps, min(p.step) AS lo, max(p.step) AS hi,"
        " bool_and(p.value = (s.labels->>'rank')::float8 * 1e6 + p.step) AS right"
        " FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 AND NOT p.hidden GROUP BY 1, 2 ORDER BY 1, 2",
        run.id,
    )
    assert [(r["rank"], r["name"]) for r in rows] == [
        (str(rank), name) for rank in range(STREAMS) for name in sorted(NAMES)
    ]
    for r in rows:
        assert (r["n"], r["steps"], r["lo"], r["hi"], r["right"]) == (
            STEPS,
            STEPS,
            0,
            STEPS - 1,
            True,
        )

    # The workspace's usage row counts every series the streams' commits
    # created, though no commit locked it before its last statement.
    usage = fetch(
        service_env["STEPLOG_DATABASE_URL"],
        "SELECT u.series, u.runs, (SELECT count(*) FROM series s WHERE s.workspace = $1) AS n"
        " FROM workspace_usage u WHERE u.workspace = $1",
        workspace,
    )
    assert [(r["series"], r["runs"], r["n"]) for r in usage] == [
        (STREAMS * len(NAMES), 1, STREAMS * len(NAMES))
    ]


def test_a_stream_closes_on_its_own_with_its_own_memory_bound(
    url: str, experiment_name: str, database_url: str
) -> None:
    """`with stream:` and `stream.close()` flush that stream and stop its
    writer (its lanes leave the streams' shared thread), leaving the run and
    the other streams running; a stream's `max_buffered_bytes` bounds its
    writer alone."""
    from steplog.errors import FailedPreconditionError

    run = Experiment(experiment_name, url=url).start_logging()
    with run.new_stream(labels={"rank": "0"}, max_buffered_bytes=1 << 20) as first:
        assert first._client.writer.settings.max_buffered_bytes == 1 << 20
        for step in range(100):
            first.log("loss", float(step), step=step)
    assert first._client.writer._main.finished  # its last round ran: stopped
    assert first.writer_stats().points_acked == 100

    second = run.new_stream(labels={"rank": "1"})
    assert second._client.writer.settings.max_buffered_bytes == 256 * 1024 * 1024
    second.log("loss", 1.0, step=0)
    assert second.close(30) and second.close(30)  # twice: the first result
    assert second.writer_stats().points_acked == 1

    run.log("loss", 5.0, step=0)  # the run's own writer is untouched
    assert run.flush(30)
    with pytest.raises(FailedPreconditionError):
        run.close()  # not a stream: complete() ends a run
    run.complete()
    stored = fetch(
        database_url,
        "SELECT coalesce(s.labels->>'rank', '-') AS rank, count(*) AS n"
        " FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 AND s.name = 'loss' GROUP BY 1 ORDER BY 1",
        run.id,
    )
    assert [(r["rank"], r["n"]) for r in stored] == [("-", 1), ("0", 100), ("1", 1)]


def _writer_threads() -> list[threading.Thread]:
    from steplog._writer.sender import THREAD_NAME

    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def test_the_streams_of_a_process_share_one_thread_and_close_one_by_one(
    url: str, experiment_name: str, database_url: str
) -> None:
    """N streams: one background thread for all of them (not one each), each
    its own writer id; closing one stops its writer while the others go on
    delivering on the same thread."""
    from steplog._writer.sender import STREAMS_THREAD_NAME

    run = Experiment(experiment_name, url=url).start_logging()
    run.log("loss", 0.0, step=0)  # the run's own writer: a thread of its own
    assert run.flush(30)
    before = set(_writer_threads())
    streams = [run.new_stream(labels={"rank": str(r)}) for r in range(STREAMS)]
    for step in range(200):
        for s in streams:
            s.log("loss", float(step), step=step)
    assert all(s.flush(30) for s in streams)
    added = [t for t in _writer_threads() if t not in before]
    shared = {s._client.writer.thread for s in streams}
    assert len(shared) == 1
    (thread,) = shared
    assert thread is not None and thread.name == STREAMS_THREAD_NAME and thread.is_alive()
    assert added in ([], [thread])  # at most one new thread for all the streams
    assert len({s.writer_stats().writer_id for s in streams}) == STREAMS

    assert streams[0].close(30)
    assert streams[0]._client.writer._main.finished
    for step in range(200, 400):
        for s in streams[1:]:
            s.log("loss", float(step), step=step)
    assert all(s.flush(30) for s in streams[1:])
    assert thread.is_alive() and all(s._client.writer.thread is thread for s in streams[1:])
    for s in streams[1:]:
        assert s.close(30)
    run.complete()
    stored = fetch(
        database_url,
        "SELECT s.labels->>'rank' AS rank, count(*) AS n"
        " FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 AND s.name = 'loss' AND s.labels ? 'rank'"
        " GROUP BY 1 ORDER BY 1",
        run.id,
    )
    assert [(r["rank"], r["n"]) for r in stored] == [("0", 200)] + [
        (str(r), 400) for r in range(1, STREAMS)
    ]


_AT_EXIT = """
import sys
from steplog import Run
run = Run.get(sys.argv[2], url=sys.argv[1])
streams = [run.new_stream(labels={"rank": str(r)}) for r in range(int(sys.argv[3]))]
for step in range(300):
    for s in streams:
        s.log("loss", float(step), step=step)
# No flush, no close: interpreter exit closes every stream (steplog._lifecycle).
"""


def test_streams_left_open_are_delivered_at_interpreter_exit(
    url: str, experiment_name: str, database_url: str
) -> None:
    import subprocess
    import sys

    run = Experiment(experiment_name, url=url).start_logging()
    done = subprocess.run(
        [sys.executable, "-c", _AT_EXIT, url, run.id, str(STREAMS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "steplog" not in done.stderr  # no warning: nothing was lost at exit
    run.complete()
    stored = fetch(
        database_url,
        "SELECT s.labels->>'rank' AS rank, count(*) AS n"
        " FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 GROUP BY 1 ORDER BY 1",
        run.id,
    )
    assert [(r["rank"], r["n"]) for r in stored] == [(str(r), 300) for r in range(STREAMS)]
