"""The writer's pure parts, without threads, streams or grpc: the
acknowledgement ledger, the outcomes bookkeeping, the wire encoding, the one
settings parser and the lifecycle registry's shared exit deadline."""

from __future__ import annotations

from array import array

import pytest

from steplog import _lifecycle, _settings
from steplog._writer import wire
from steplog._writer.ledger import MAX_INFLIGHT_BATCHES, Entry, Ledger
from steplog._writer.outcomes import Outcomes, PointsRejectedError, RejectedPointsWarning
from steplog._writer.settings import WriterSettings
from steplog._writer.transport import Rejection
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb


def entry(ledger: Ledger, points: int = 10, nbytes: int = 100) -> Entry:
    e = Entry(ledger.next_ordinal(), points, nbytes, pb.IngestRequest())
    ledger.stamp(e)
    return e


def test_sequences_follow_ordinals_and_acks_finish_them_in_any_order() -> None:
    ledger = Ledger("host-1-ab", window_bytes=1000)
    a, b, c = entry(ledger), entry(ledger), entry(ledger)
    assert [x.request.batch.sequence for x in (a, b, c) if x.request] == [1, 2, 3]
    for x in (a, b, c):
        ledger.sent(x)
    assert ledger.inflight_bytes == 300 and not ledger.settled()
    assert ledger.acked(2) is b
    assert ledger.done_through == 0  # 1 is still in flight
    assert ledger.acked(2) is None  # a late duplicate ack
    assert ledger.acked(1) is a
    assert ledger.done_through == 0  # finished only once resolved
    ledger.resolve(2)
    ledger.resolve(1)
    assert ledger.done_through == 2
    assert ledger.acked(3) is c
    ledger.resolve(3)
    assert ledger.settled() and ledger.inflight_bytes == 0


def test_a_new_writer_id_restarts_the_sequence_at_the_next_batch() -> None:
    ledger = Ledger("host-1-ab", window_bytes=1000)
    first = entry(ledger)
    ledger.sent(first)
    refused = ledger.pop_oldest()
    assert refused is first
    ledger.new_id(refused.ordinal)
    ledger.resolve(refused.ordinal, lost=True)
    nxt = entry(ledger)
    assert ledger.writer_id == "host-1-ab.r1"
    assert nxt.request is not None and nxt.request.batch.sequence == 1
    assert nxt.request.batch.writer_id == "host-1-ab.r1"
    ledger.sent(nxt)
    assert ledger.acked(1) is nxt  # the ack of the new id's sequence 1
    ledger.resolve(nxt.ordinal)
    assert ledger.lost_in(0, 1) and not ledger.lost_in(1, 2)


def test_the_window_holds_one_probe_until_the_stream_proves_itself() -> None:
    ledger = Ledger("w", window_bytes=250)
    assert ledger.room(100, proven=False)  # nothing in flight: always room
    ledger.sent(entry(ledger))
    assert not ledger.room(100, proven=False)
    assert ledger.room(100, proven=True)
    ledger.sent(entry(ledger))
    assert not ledger.room(100, proven=True)  # 300 bytes > 250
    many = Ledger("w", window_bytes=1 << 30)
    for _ in range(MAX_INFLIGHT_BATCHES):
        many.sent(entry(many, nbytes=1))
    assert not many.room(1, proven=True)
    assert len(many.pop_all()) == MAX_INFLIGHT_BATCHES and many.inflight_bytes == 0


def test_rejections_warn_once_per_series_and_reason() -> None:
    out = Outcomes(strict=False)
    loss = Rejection("r", "loss", (), "STEP_NOT_INCREASING", "no", 3)
    acc = Rejection("r", "acc", (), "STEP_NOT_INCREASING", "no", 3)
    out.record_rejections([loss, acc], 25, {"STEP_NOT_INCREASING": 25})
    out.record_rejections([loss], 1, {"STEP_NOT_INCREASING": 1})
    notes = out.take_notes()
    assert notes is not None and notes.error is None
    assert [c for c, _ in notes.warnings] == [RejectedPointsWarning] * 2
    assert "at least 1 point(s)" in notes.warnings[0][1]  # 25 rejected, 2 itemised
    assert out.rejected == 26 and out.rejected_by_reason == {"STEP_NOT_INCREASING": 26}
    assert out.take_notes() is None
    # One series in the batch: the unlisted ones are that series'.
    sole = Outcomes(strict=False)
    sole.record_rejections([loss], 7, {"STEP_NOT_INCREASING": 7}, loss.series)
    notes = sole.take_notes()
    assert notes is not None and "7 point(s)" in notes.warnings[0][1]


def test_strict_mode_gathers_rejections_into_one_error() -> None:
    out = Outcomes(strict=True)
    r = Rejection("r", "loss", (), "INVALID_VALUE", "nan", 1)
    out.record_rejections([r], 1, {"INVALID_VALUE": 1})
    out.record_rejections([r], 2, {"INVALID_VALUE": 2})
    notes = out.take_notes()
    assert notes is not None and isinstance(notes.error, PointsRejectedError)
    assert notes.error.count == 3
    assert out.take_losses()  # rejections are not losses
    out.refused += 5
    assert not out.take_losses() and out.take_losses()


def test_scalar_columns_use_the_descriptor_field_numbers() -> None:
    fields = data_pb2.ScalarColumns.DESCRIPTOR.fields_by_name
    assert (
        fields["steps"].number,
        fields["times"].number,
        fields["values"].number,
    ) == (wire.STEPS_FIELD, wire.TIMES_FIELD, wire.VALUES_FIELD)
    raw = wire.scalar_columns(
        array("q", [1, 300, -1]), array("d", [1.5, 2.5, 3.5]), array("d", [0.1, 0.2, 0.3])
    )
    got = data_pb2.ScalarColumns.FromString(raw)
    want = data_pb2.ScalarColumns(steps=[1, 300, -1], times=[1.5, 2.5, 3.5], values=[0.1, 0.2, 0.3])
    assert got == want
    assert raw == want.SerializeToString()


def test_one_settings_parser_names_the_variable() -> None:
    for word in ("1", "true", "YES", "on"):
        assert _settings.flag("STEPLOG_OFFLINE", environ={"STEPLOG_OFFLINE": word})
    for word in ("0", "false", "no", "Off"):
        assert not _settings.flag("STEPLOG_OFFLINE", True, {"STEPLOG_OFFLINE": word})
    assert _settings.flag("STEPLOG_OFFLINE", True, {"STEPLOG_OFFLINE": " "})  # unset: the default
    with pytest.raises(_settings.SettingError, match="STEPLOG_AZURE_STRICT='maybe'"):
        _settings.flag("STEPLOG_AZURE_STRICT", environ={"STEPLOG_AZURE_STRICT": "maybe"})
    with pytest.raises(ValueError, match="STEPLOG_HEARTBEAT_INTERVAL"):
        _settings.number("STEPLOG_HEARTBEAT_INTERVAL", 30, {"STEPLOG_HEARTBEAT_INTERVAL": "soon"})
    with pytest.raises(ValueError, match="STEPLOG_EXIT_TIMEOUT"):
        _settings.exit_timeout({"STEPLOG_EXIT_TIMEOUT": "-1"})
    # The writer's settings read the same words and sizes.
    s = WriterSettings.from_env({"STEPLOG_STRICT": "on", "STEPLOG_MAX_BUFFERED_BYTES": "2MiB"})
    assert s.strict and s.max_buffered_bytes == 2 << 20
    with pytest.raises(ValueError, match="STEPLOG_STRICT='maybe'"):
        WriterSettings.from_env({"STEPLOG_STRICT": "maybe"})
    with pytest.raises(ValueError, match="STEPLOG_MAX_BUFFERED_BYTES"):
        WriterSettings.from_env({"STEPLOG_MAX_BUFFERED_BYTES": "lots"})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Worker:
    def __init__(self, clock: _Clock, takes: float) -> None:
        self.clock = clock
        self.takes = takes
        self.given: list[float] = []

    def close_at_exit(self, timeout: float) -> None:
        self.given.append(timeout)
        self.clock.now += min(self.takes, timeout)

    def after_fork_in_child(self) -> None:
        pass


def test_every_worker_shares_one_exit_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(_lifecycle, "monotonic", clock)
    monkeypatch.setattr(_lifecycle, "_workers", type(_lifecycle._workers)())
    first, second, third = _Worker(clock, 20.0), _Worker(clock, 20.0), _Worker(clock, 20.0)
    for w in (first, second, third):
        _lifecycle.register(w)
    _lifecycle.close_all(30.0)
    assert first.given == [30.0]
    assert second.given == [10.0]  # what the first left of the one deadline
    assert third.given == [0.0]
    assert clock.now == 1030.0  # 30 s in all, not 30 s each
