"""The spool (SQLite, one file per writer process) and its replay, against the
in-memory fake of the service from test_writer (which stores each
(writer, sequence) once and rejects steps that do not increase)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest

from steplog._writer import BatchWriter
from steplog._writer.replay import replay_spool
from steplog._writer.spool import SPOOL_SUFFIX, spool_files, spooled_records
from steplog._writer.transport import Backoff, TransportError
from steplog.v1 import ingest_service_pb2 as pb
from tests.unit.test_writer import WAIT, FakeTransport, settings, stored


def offline_writer(spool: Path, writer_id: str, **kw: object) -> BatchWriter:
    return BatchWriter(
        None, "ws", settings(offline=True, spool_dir=spool, **kw), writer_id=writer_id
    )


def log_steps(w: BatchWriter, start: int, stop: int, name: str = "loss") -> None:
    for step in range(start, stop):
        w.log_scalar("r1", name, (), float(step), step, 1.0)
        if step % 10 == 9:
            assert w.flush(WAIT)  # one batch per 10 points


@pytest.mark.parametrize(("first", "second"), [("hostb-1-x", "hosta-2-y"), ("a-1", "b-2")])
def test_replay_follows_the_order_points_were_logged_across_writers(
    tmp_path: Path, first: str, second: str
) -> None:
    """A run resumed on another host: the earlier host's points go first,
    whichever way the writer ids sort."""
    a = offline_writer(tmp_path, first)
    log_steps(a, 0, 100)
    assert a.close(WAIT)
    b = offline_writer(tmp_path, second)
    log_steps(b, 100, 200)
    assert b.close(WAIT)
    assert len(spool_files(tmp_path)) == 2
    fake = FakeTransport()
    report = replay_spool(tmp_path, fake)
    assert report.ok, report
    assert report.accepted == 200 and report.rejected == 0
    assert stored(fake) == [float(s) for s in range(200)]
    again = replay_spool(tmp_path, fake)
    assert again.ok and again.accepted == 0 and again.already_stored == 200
    assert stored(fake) == [float(s) for s in range(200)]


def test_a_gap_is_reported_as_gone_and_the_rest_is_sent_once(tmp_path: Path) -> None:
    w = offline_writer(tmp_path, "w-1")
    log_steps(w, 0, 50)
    assert w.close(WAIT)
    (path,) = spool_files(tmp_path)
    with sqlite3.connect(path) as db:  # lose batch 3 (steps 20..29)
        db.execute("DELETE FROM records WHERE sequence = 3")
    fake = FakeTransport()
    report = replay_spool(tmp_path, fake)
    assert any("sequences 3 " in g and "gone" in g for g in report.gaps), report.gaps
    expected = [float(s) for s in range(50) if not 20 <= s < 30]
    assert stored(fake) == expected
    assert report.accepted == 40 and report.ok
    # Batches 4 and 5 went out under a new id; a second replay finds the same.
    assert ("w-1.g4", 1) in fake.service.committed
    again = replay_spool(tmp_path, fake)
    assert again.accepted == 0 and again.duplicate_batches == 4, again
    assert stored(fake) == expected


class RefusingTransport(FakeTransport):
    """Refuses whole every batch that carries a series named "poison"."""

    def write(self, request: pb.WriteRequest, timeout: float | None = None) -> pb.WriteResponse:
        if any(rs.series.name == "poison" for rs in request.batch.series):
            raise TransportError(grpc.StatusCode.INVALID_ARGUMENT, "poison")
        return super().write(request, timeout)


def test_a_refused_batch_holds_nothing_back(tmp_path: Path) -> None:
    w = offline_writer(tmp_path, "w-1")
    log_steps(w, 0, 20)
    w.log_scalar("r1", "poison", (), 1.0, 1, 1.0)
    assert w.flush(WAIT)
    log_steps(w, 20, 40)
    assert w.close(WAIT)
    fake = RefusingTransport()
    report = replay_spool(tmp_path, fake)
    assert not report.ok
    assert report.refused_batches == 1 and report.refused_points == 1
    assert "INVALID_ARGUMENT" in report.errors["writer w-1"]
    assert stored(fake) == [float(s) for s in range(40)]
    again = replay_spool(tmp_path, fake, remove=True)
    assert again.refused_points == 1 and again.accepted == 0
    assert stored(fake) == [float(s) for s in range(40)]
    # Only the refused batch is left on disk.
    (path,) = spool_files(tmp_path)
    assert [r[0] for r in spooled_records(path)] == ["batch"]


def test_the_service_down_stops_the_replay_in_order(tmp_path: Path) -> None:
    w = offline_writer(tmp_path, "w-1")
    log_steps(w, 0, 30)
    assert w.close(WAIT)
    fake = FakeTransport()
    fake.down = True
    report = replay_spool(tmp_path, fake, attempts=2, backoff=Backoff(0.0, 0.0))
    assert not report.ok and report.unsent_points == 30 and "service" in report.errors
    fake.down = False
    assert replay_spool(tmp_path, fake).ok
    assert stored(fake) == [float(s) for s in range(30)]


def test_an_unreadable_file_is_reported_and_the_rest_replayed(tmp_path: Path) -> None:
    w = offline_writer(tmp_path, "w-1")
    log_steps(w, 0, 10)
    assert w.close(WAIT)
    bad = tmp_path / f"junk{SPOOL_SUFFIX}"
    bad.write_bytes(b"not a database at all" * 100)
    fake = FakeTransport()
    report = replay_spool(tmp_path, fake)
    assert report.unreadable_files == [bad] and not report.ok
    assert stored(fake) == [float(s) for s in range(10)]


def test_online_spool_writes_each_batch_before_sending_and_deletes_it_on_ack(
    tmp_path: Path,
) -> None:
    fake = FakeTransport()
    fake.hold_acks = True
    w = BatchWriter(fake, "ws", settings(on_full="spool", spool_dir=tmp_path, max_batch_points=5))
    try:
        for i in range(5):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        assert fake.wait_for(lambda: len(fake.sent) >= 1)
        (path,) = spool_files(tmp_path)
        # The batch on the wire, not yet acknowledged, is on disk.
        assert [(r[1], r[2], r[3]) for r in spooled_records(path)] == [(w.writer_id, 1, 5)]
        fake.release_acks()
        assert w.flush(WAIT)
        assert list(spooled_records(path)) == []
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT writer_id, through FROM acked").fetchall() == [
                (w.writer_id, 1)
            ]
    finally:
        assert w.close(WAIT)
    assert spool_files(tmp_path) == []  # nothing left: the file is gone


def test_offline_run_operations_are_replayed_in_order_with_the_points(tmp_path: Path) -> None:
    w = offline_writer(tmp_path, "w-1")
    log_steps(w, 0, 20)
    assert w.record_operation("UpdateRunTags", b"tags")
    log_steps(w, 20, 30)
    assert w.record_operation("UpdateRunStatus", b"done")
    assert w.close(WAIT)
    fake = FakeTransport()
    seen: list[tuple[str, int]] = []

    def apply(kind: str, payload: bytes) -> None:
        seen.append((kind, fake.service.count()))

    report = replay_spool(tmp_path, fake, apply_operation=apply)
    assert report.ok and report.operations == 2
    # Each after exactly the points logged before it.
    assert seen == [("UpdateRunTags", 20), ("UpdateRunStatus", 30)]

    def refuse(kind: str, payload: bytes) -> None:
        raise TransportError(grpc.StatusCode.FAILED_PRECONDITION, "no such run")

    again = replay_spool(tmp_path, fake, apply_operation=refuse)
    assert not again.ok and len(again.errors) == 2
