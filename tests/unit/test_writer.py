"""The background writer against an in-memory fake of the ingest service.

The fake applies the service's delivery rules (a high-water mark per writer,
duplicate_batch at or below it, ABORTED on a gap, strict step order per series)
so "nothing lost, nothing doubled" is checked the way the service stores data.
Tests wait on conditions and events with timeouts, never on sleeps.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from time import monotonic
from typing import Any

import grpc
import numpy as np
import pytest

from steplog._writer import (
    BatchWriter,
    DeliveryWarning,
    DroppedPointsWarning,
    PointsRejectedError,
    RejectedPointsWarning,
    WriterSettings,
    replay_spool,
)
from steplog._writer.spool import spool_files
from steplog._writer.transport import (
    Backoff,
    DoneCallback,
    GrpcTransport,
    ResponseCallback,
    TransportError,
)
from steplog.v1 import data_pb2, ingest_service_pb2_grpc
from steplog.v1 import ingest_service_pb2 as pb

WAIT = 10.0  # generous upper bound for anything the tests wait on
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]


class FakeService:
    """Stores batches as the real service does: exactly once per (writer, sequence)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hwm: dict[str, int] = {}
        self.points: dict[SeriesKey, list[tuple[int | None, Any]]] = defaultdict(list)
        self.last_step: dict[SeriesKey, int] = {}
        self.committed: list[tuple[str, int]] = []
        self.duplicate_batches = 0
        self.reject_names: set[str] = set()
        self.results: dict[tuple[str, int], pb.BatchResult] = {}

    def commit(self, batch: pb.Batch) -> tuple[bool, pb.BatchResult]:
        """(duplicate_batch, result); raises TransportError(ABORTED) on a gap."""
        with self.lock:
            hwm = self.hwm.get(batch.writer_id, 0)
            if batch.sequence <= hwm:
                self.duplicate_batches += 1
                # As the service does: what the commit that stored it decided.
                return True, self.results.get((batch.writer_id, batch.sequence), pb.BatchResult())
            if batch.sequence != hwm + 1:
                raise TransportError(grpc.StatusCode.ABORTED, f"gap: {hwm} -> {batch.sequence}")
            result = pb.BatchResult()
            counts: dict[int, int] = defaultdict(int)
            for rs in batch.series:
                self._store(rs, result, counts)
            for reason, n in counts.items():
                result.reject_counts.add(reason=reason, count=n)
            self.hwm[batch.writer_id] = batch.sequence
            self.committed.append((batch.writer_id, batch.sequence))
            self.results[(batch.writer_id, batch.sequence)] = result
            return False, result

    def _store(self, rs: pb.RunSeries, result: pb.BatchResult, counts: dict[int, int]) -> None:
        s = rs.series
        key = (rs.run_id, s.name, tuple(sorted(s.labels.items())))
        kind = s.WhichOneof("points")
        if kind != "scalars":
            n = s.table.row_count if kind == "table" else 1
            self.points[key].extend((None, s) for _ in range(n))
            result.accepted += n
            return
        values: list[Any] = list(s.scalars.values) or list(s.scalars.text_values)
        steps: list[int | None] = list(s.scalars.steps) or [None] * len(values)
        for i, (step, value) in enumerate(zip(steps, values, strict=True)):
            reason = 0
            if s.name in self.reject_names:
                reason = pb.REJECT_REASON_INVALID_NAME
            elif step is not None and step <= self.last_step.get(key, -1):
                reason = pb.REJECT_REASON_STEP_NOT_INCREASING
            if reason:
                result.rejected += 1
                counts[reason] += 1
                if len(result.rejected_points) < 20:
                    p = result.rejected_points.add(
                        run_id=rs.run_id, name=s.name, index=i, reason=reason, message="no"
                    )
                    p.labels.update(s.labels)
                    if step is not None:
                        p.step = step
                continue
            if step is not None:
                self.last_step[key] = step
            self.points[key].append((step, value))
            result.accepted += 1

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.points.values())


class FakeStream:
    def __init__(
        self, transport: FakeTransport, on_response: ResponseCallback, on_done: DoneCallback
    ) -> None:
        self.t = transport
        self.on_response = on_response
        self.on_done = on_done
        self.dead = False
        self.held: list[pb.IngestResponse] = []

    def die(self, error: TransportError | None) -> None:
        if not self.dead:
            self.dead = True
            self.on_done(error)

    def send(self, request: pb.IngestRequest) -> None:
        t = self.t
        with t.cond:
            if self.dead:
                return  # lost on the wire
            batch = request.batch
            t.sent.append((t.opened, batch.writer_id, batch.sequence))
            t.sent_at.append(monotonic())
            t.cond.notify_all()
            failure = None
            if t.failures:
                n, *rest = t.failures[0]
                if n == 0:
                    failure = t.failures.pop(0)
                else:
                    t.failures[0] = (n - 1, *rest)  # type: ignore[assignment]
            refusal = t.refuse(batch) if t.refuse is not None else None
        if refusal is not None:
            self.die(TransportError(refusal, "refused"))
            return
        if failure is not None:
            _, code, commit_first, *hint = failure
            if commit_first:  # committed, but the ack is lost with the connection
                t.service.commit(batch)
            self.die(TransportError(code, t.failure_message, hint[0] if hint else None))
            return
        try:
            duplicate, result = t.service.commit(batch)
        except TransportError as err:
            self.die(err)
            return
        response = pb.IngestResponse(
            sequence=batch.sequence, duplicate_batch=duplicate, result=result
        )
        with t.cond:
            if t.hold_acks:
                self.held.append(response)
                return
        self.on_response(response)

    def release(self) -> None:
        held, self.held = self.held, []
        for response in held:
            self.on_response(response)

    def close(self) -> None:
        self.dead = True


class FakeTransport:
    """Implements the Transport protocol. `failures`: (after n more sends, code,
    commit before failing[, RetryInfo delay]) entries, consumed in order.
    `refuse`: a batch -> the code the service refuses it with, or None.
    `failure_message`: the details of the injected failures."""

    def __init__(self, service: FakeService | None = None) -> None:
        self.service = service or FakeService()
        self.cond = threading.Condition()
        self.down = False
        self.hold_acks = False
        self.failures: list[tuple[int, grpc.StatusCode, bool] | tuple[Any, ...]] = []
        self.refuse: Callable[[pb.Batch], grpc.StatusCode | None] | None = None
        self.failure_message = "injected"
        self.opened = 0
        self.sent: list[tuple[int, str, int]] = []
        self.sent_at: list[float] = []
        self.streams: list[FakeStream] = []
        self.forked = 0

    def open_stream(self, on_response: ResponseCallback, on_done: DoneCallback) -> FakeStream:
        with self.cond:
            self.opened += 1
            stream = FakeStream(self, on_response, on_done)
            self.streams.append(stream)
            down = self.down
            self.cond.notify_all()
        if down:
            stream.die(TransportError(UNAVAILABLE, "down"))
        return stream

    def write(self, request: pb.WriteRequest, timeout: float | None = None) -> pb.WriteResponse:
        if self.down:
            raise TransportError(UNAVAILABLE, "down")
        duplicate, result = self.service.commit(request.batch)
        return pb.WriteResponse(duplicate_batch=duplicate, result=result)

    def after_fork(self) -> None:
        self.cond = threading.Condition()
        self.service = FakeService()
        self.sent = []
        self.streams = []
        self.forked += 1

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def release_acks(self) -> None:
        with self.cond:
            self.hold_acks = False
            streams = list(self.streams)
        for stream in streams:
            stream.release()


def settings(**kw: Any) -> WriterSettings:
    base: dict[str, Any] = {"flush_interval": 0.01, "backoff_initial": 0.001, "backoff_max": 0.01}
    base.update(kw)
    return WriterSettings(**base)


@pytest.fixture(autouse=True)
def default_spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default spool directory (refused batches and what close() could
    not deliver go there without a spool_dir), inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "steplog" / "spool"


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def writers() -> Iterator[list[BatchWriter]]:
    made: list[BatchWriter] = []
    yield made
    for w in made:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.close(timeout=2)


def make(writers: list[BatchWriter], transport: Any, **kw: Any) -> BatchWriter:
    w = BatchWriter(transport, "ws", settings(**kw))
    writers.append(w)
    return w


def stored(fake: FakeTransport, name: str = "loss", run: str = "r1") -> list[Any]:
    return [v for _, v in fake.service.points[(run, name, ())]]


# ------------------------------------------------------------------ delivery


def test_points_of_every_kind_arrive_once_in_order(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake, max_batch_points=100)
    for i in range(1000):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        w.log_scalar("r1", "lr", (("rank", "3"),), 0.1, None, 1.0)
    w.log_scalar("r1", "note", (), "hello", None, 1.0)
    w.log_scalar("r1", "nan", (), float("nan"), 0, 1.0)
    w.log_scalars("r1", "list", (), np.arange(5.0), None, None)
    w.log_table_rows("r1", "tbl", (), {"a": [1, 2], "b": ["x", None]})
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(1000)]
    assert len(fake.service.points[("r1", "lr", (("rank", "3"),))]) == 1000
    assert stored(fake, "note") == ["hello"]
    assert np.isnan(stored(fake, "nan")[0])
    assert stored(fake, "list") == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(stored(fake, "tbl")) == 2
    st = w.stats
    assert st.points_logged == st.points_acked == 2009
    assert st.points_buffered == st.points_unacked == 0
    assert st.batches_acked == st.batches_sent == len(fake.service.committed)


def test_batches_respect_point_and_byte_limits(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    sizes: list[tuple[int, int]] = []
    real_send = FakeStream.send

    def spy(self: FakeStream, request: pb.IngestRequest) -> None:
        points = sum(
            len(rs.series.scalars.values) or len(rs.series.scalars.text_values)
            for rs in request.batch.series
        )
        sizes.append((points, request.ByteSize()))
        real_send(self, request)

    FakeStream.send = spy  # type: ignore[method-assign]
    try:
        w = make(writers, fake, max_batch_points=500, max_batch_bytes=8192)
        for i in range(3000):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
            w.log_scalar("r1", "text", (), "é" * (i % 50), i, 1.0)
        assert w.flush(WAIT)
    finally:
        FakeStream.send = real_send  # type: ignore[method-assign]
    assert sum(p for p, _ in sizes) == 6000
    assert all(p <= 500 and b <= 8192 for p, b in sizes)
    assert stored(fake) == [float(i) for i in range(3000)]


def test_a_point_too_large_for_any_batch_is_rejected_on_the_client(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake, max_batch_bytes=4096)
    w.log_scalar("r1", "big", (), "x" * 10_000, 1, 1.0)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    with pytest.warns(RejectedPointsWarning, match="LIMIT_EXCEEDED"):
        assert w.flush(WAIT)
    assert w.stats.rejected == 1
    assert w.rejections()[0].reason == "LIMIT_EXCEEDED"
    assert stored(fake) == [1.0]


def test_reconnects_resend_unacked_in_order_nothing_lost_nothing_doubled(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    # Fail with every retryable flavour: acks lost after commit, a refused
    # batch, ABORTED; each time the stream dies with batches in flight.
    fake.failures = [
        (3, UNAVAILABLE, True),
        (2, grpc.StatusCode.INTERNAL, False),
        (4, grpc.StatusCode.ABORTED, True),
        (1, grpc.StatusCode.RESOURCE_EXHAUSTED, True, 0.001),  # with RetryInfo
        (5, grpc.StatusCode.DEADLINE_EXCEEDED, False),
    ]
    fake.hold_acks = False
    w = make(writers, fake, max_batch_points=10)
    for i in range(2000):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        w.log_scalar("r1", "other", (), float(i), None, 1.0)
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(2000)]  # each once, in order
    assert stored(fake, "other") == [float(i) for i in range(2000)]
    assert w.stats.reconnects >= 5
    assert fake.service.duplicate_batches >= 1  # resent after a lost ack
    # After every reconnect the first sends are the oldest unacked, ascending.
    by_stream: dict[int, list[int]] = defaultdict(list)
    for stream, _, seq in fake.sent:
        by_stream[stream].append(seq)
    for seqs in by_stream.values():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    committed = [seq for _, seq in fake.service.committed]
    assert committed == list(range(1, len(committed) + 1))
    assert w.stats.rejected == 0


def test_duplicate_batch_acks_count_as_acked(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake)
    fake.service.hwm[w.writer_id] = 1  # as if batch 1 had been committed before
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.flush(WAIT)
    assert fake.service.duplicate_batches == 1
    assert w.stats.points_acked == 1 and w.stats.batches_acked == 1


def test_flush_times_out_while_the_service_is_down(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.down = True
    w = make(writers, fake)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.flush(0.2) is False
    assert w.stats.points_acked == 0
    fake.down = False
    assert w.flush(WAIT)
    assert stored(fake) == [1.0]


def test_flush_waits_for_acks(fake: FakeTransport, writers: list[BatchWriter]) -> None:
    fake.hold_acks = True
    w = make(writers, fake)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.flush(0.1) is False  # sent, not acknowledged
    assert fake.sent
    fake.release_acks()
    assert w.flush(WAIT)


# ------------------------------------------------------------------ linger


def proven_stream(w: BatchWriter, fake: FakeTransport) -> None:
    """One acknowledged batch on the stream (until then only one batch is in
    flight: the first is a probe), of a series the tests do not read."""
    w.log_scalar("r1", "warmup", (), 0.0, 0, 1.0)
    assert w.flush(WAIT)
    assert len(fake.sent) == 1


def one_batch_in_flight(
    writers: list[BatchWriter], fake: FakeTransport, **settings: Any
) -> BatchWriter:
    """A writer (flush interval 10 ms) on a proven stream whose acks are held,
    with one batch, loss at step 0 = 0.0, sent at the flush interval (the
    stream was idle) and not acknowledged."""
    w = make(writers, fake, flush_interval=0.01, **settings)
    proven_stream(w, fake)
    fake.hold_acks = True
    w.log_scalar("r1", "loss", (), 0.0, 0, 1.0)
    assert fake.wait_for(lambda: len(fake.sent) == 2)
    return w


def test_a_batch_due_by_time_lingers_while_one_is_in_flight_and_goes_on_its_ack(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    """Nagle-like: while the stream's batch is unacknowledged, points that
    are due only by the flush interval wait for its ack (or max_linger), so
    a service that is behind gets fewer, larger batches."""
    w = one_batch_in_flight(writers, fake, max_linger=60.0)
    for i in range(1, 10):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    # 30 flush intervals: without the linger each would have cut a batch.
    assert not fake.wait_for(lambda: len(fake.sent) > 2, timeout=0.3)
    assert w.stats.points_buffered == 9
    fake.release_acks()  # the ack wakes the sender: the rest goes at once, in one batch
    assert fake.wait_for(lambda: len(fake.sent) == 3)
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(10)]
    assert w.stats.batches_acked == 3


def test_the_linger_ends_at_max_linger_without_an_ack(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = one_batch_in_flight(writers, fake, max_linger=0.3)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    logged = monotonic()
    assert fake.wait_for(lambda: len(fake.sent) == 3)
    assert fake.sent_at[2] - logged >= 0.25  # waited for the ack, up to max_linger
    fake.release_acks()
    assert w.flush(WAIT)
    assert stored(fake) == [0.0, 1.0]


def test_flush_does_not_wait_for_the_linger(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = one_batch_in_flight(writers, fake, max_linger=60.0)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.flush(0.2) is False  # acks held; but the lingering points were cut and sent
    assert len(fake.sent) == 3
    fake.release_acks()
    assert w.flush(WAIT)
    assert stored(fake) == [0.0, 1.0]


@pytest.mark.parametrize(
    "kw",
    [
        {"max_linger": 0.0},  # off
        {"max_linger": 60.0, "on_full": "spool"},  # spooled every flush interval (kill -9)
    ],
)
def test_no_linger_when_off_or_spooling(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path, kw: dict[str, Any]
) -> None:
    w = one_batch_in_flight(writers, fake, spool_dir=tmp_path, **kw)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert fake.wait_for(lambda: len(fake.sent) == 3, timeout=5.0)  # not 60 s
    fake.release_acks()
    assert w.flush(WAIT)
    assert stored(fake) == [0.0, 1.0]


def test_logging_does_not_block_while_the_service_is_down(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.down = True
    w = make(writers, fake, max_buffered_bytes=2_400_000)
    done = threading.Event()

    def log() -> None:
        for i in range(99_999):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        done.set()

    threading.Thread(target=log, daemon=True).start()
    assert done.wait(WAIT)
    st = w.stats
    assert st.points_logged == 99_999
    assert st.points_unacked <= w._main._batch_points  # one probe batch at most, resent later
    assert fake.wait_for(lambda: fake.opened >= 2)  # it kept trying in the background
    fake.down = False
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(99_999)]


# ------------------------------------------------------------- memory bound


def test_on_full_wait_waits_at_most_max_block_s_then_spills_to_the_spool(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path
) -> None:
    fake.down = True
    w = make(
        writers, fake, max_buffered_bytes=2400, on_full="wait", max_block_s=0.2, spool_dir=tmp_path
    )
    longest = 0.0
    for i in range(3000):
        started = monotonic()
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        longest = max(longest, monotonic() - started)
    # The bound, plus scheduling slack on a loaded machine (the wait is 0.2 s).
    assert longest < 0.2 + 0.5, longest
    st = w.stats
    assert 1 <= st.blocked_calls <= 3  # once over the bound, it spills without waiting
    assert st.dropped == 0 and st.spooled > 2000
    assert spool_files(tmp_path)
    fake.down = False
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(3000)]
    assert w.close(WAIT)
    assert spool_files(tmp_path) == []


def test_with_the_spool_unwritable_the_bound_drops_the_oldest_and_counts(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path
) -> None:
    fake.down = True
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("the spool cannot be created under a file")
    w = make(
        writers,
        fake,
        max_buffered_bytes=2400,
        on_full="wait",
        max_block_s=0.05,
        spool_dir=not_a_dir / "spool",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2000):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        w.flush(0.01)
    assert any(
        issubclass(c.category, DroppedPointsWarning) and "spool cannot be written" in str(c.message)
        for c in caught
    ), [str(c.message) for c in caught]
    st = w.stats
    assert st.dropped_unspooled > 0 and st.dropped == st.dropped_unspooled
    assert st.points_logged == 2000
    fake.down = False
    assert w.flush(WAIT)
    values = stored(fake)
    assert len(values) + st.dropped == 2000  # every point stored or counted
    assert values == sorted(values) and values[-1] == 1999.0


def test_on_full_drop_oldest_drops_and_counts(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.down = True
    w = make(writers, fake, max_buffered_bytes=2400, on_full="drop_oldest")
    with pytest.warns(DroppedPointsWarning) as caught:
        for i in range(150):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    assert len(caught) == 1  # warned once
    assert w.stats.dropped == 50
    fake.down = False
    assert w.flush(WAIT) is False  # the drop is reported by the next flush
    assert w.flush(WAIT)  # once
    values = stored(fake)
    # Which 50 go depends on how far the sender got before the bound (points
    # already in a sequenced batch are never dropped); the newest always stay.
    assert len(values) == 100 and values == sorted(values)
    assert values[-50:] == [float(i) for i in range(100, 150)]
    st = w.stats
    assert st.points_logged == 150 and st.points_acked == 100


def _image(step: int, size: int) -> data_pb2.SeriesData:
    images = data_pb2.ImagePoints(times=[1.0], steps=[step])
    images.images.add(data=bytes([step % 251]) * size)
    return data_pb2.SeriesData(name="frames", images=images)


def test_the_memory_bound_counts_bytes_of_images_and_text(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    """With the service down, 100 images of 100 KiB and 100 texts of 100 KB
    stay within a 1 MiB bound (plus half of it for the image stream): they
    count by size, not as one point each."""
    fake.down = True
    bound = 1 << 20
    w = make(writers, fake, max_buffered_bytes=bound, on_full="drop_oldest")
    largest = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(100):
            w.log_series("r1", _image(step, 100 * 1024))
            w.log_scalar("r1", "note", (), "x" * 100_000, step, 1.0)
            largest = max(largest, w.stats.bytes_in_memory)
    # The bound (and half for images), plus the calls that crossed them.
    assert largest <= bound * 3 // 2 + 2 * 110_000
    st = w.stats
    assert st.dropped > 150  # 20 MB logged, 1.5 MiB kept
    assert st.bytes_in_memory <= bound * 3 // 2
    assert w.image_stats is not None and w.image_stats.bytes_in_memory <= bound // 2
    fake.down = False
    assert w.flush(WAIT) is False  # what was dropped is reported
    kept = fake.service.points[("r1", "frames", ())]
    assert 0 < len(kept) < 20 and len(stored(fake, "note")) < 20


def test_images_on_their_own_stream_hold_no_scalar_back(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    """The object store is down: every batch with an image fails (UNAVAILABLE,
    retried); scalars are acknowledged all the same."""

    def images_fail(batch: pb.Batch) -> grpc.StatusCode | None:
        if any(rs.series.WhichOneof("points") == "images" for rs in batch.series):
            return UNAVAILABLE
        return None

    fake.refuse = images_fail
    w = make(writers, fake)
    for step in range(200):
        w.log_scalar("r1", "loss", (), float(step), step, 1.0)
        if step % 20 == 0:
            w.log_series("r1", _image(step, 1000))
    assert fake.wait_for(lambda: len(stored(fake)) == 200)
    assert fake.service.points[("r1", "frames", ())] == []
    assert not w.flush(0.2)  # the images are still waiting
    assert w.image_stats is not None and w.image_stats.writer_id.endswith(".img")
    fake.refuse = None  # the object store is back
    assert w.flush(WAIT)
    assert len(fake.service.points[("r1", "frames", ())]) == 10
    assert w.stats.points_acked == 210 and w.stats.dropped == 0


def test_on_full_spool_spills_to_disk_and_sends_back_in_order(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path
) -> None:
    fake.down = True
    w = make(writers, fake, max_buffered_bytes=2400, on_full="spool", spool_dir=tmp_path)
    done = threading.Event()

    def log() -> None:
        for i in range(2000):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        done.set()

    threading.Thread(target=log, daemon=True).start()
    assert done.wait(WAIT)  # never held for long: the sender spills
    assert w.stats.spooled >= 1800
    assert spool_files(tmp_path)
    fake.down = False
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(2000)]
    assert w.close(WAIT)
    assert spool_files(tmp_path) == []  # acknowledged segments are deleted


# ------------------------------------------------------------ flush / close


def test_close_twice_and_log_after_close(fake: FakeTransport) -> None:
    w = BatchWriter(fake, "ws", settings())
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.close(WAIT) is True
    assert w.close(WAIT) is True
    assert w.flush(0.1) is True
    with pytest.warns(DroppedPointsWarning, match="after close"):
        w.log_scalar("r1", "loss", (), 2.0, 2, 1.0)
    assert stored(fake) == [1.0]
    assert w.stats.dropped == 1


def test_close_without_logging_starts_no_thread(fake: FakeTransport) -> None:
    w = BatchWriter(fake, "ws", settings())
    assert w.close(0) is True
    assert w.thread is None


def test_close_timeout_saves_undelivered_data_to_the_spool(
    fake: FakeTransport, tmp_path: Path
) -> None:
    fake.down = True
    w = BatchWriter(fake, "ws", settings(spool_dir=tmp_path))
    for i in range(10):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    with pytest.warns(DeliveryWarning, match="steplog sync"):
        assert w.close(0.2) is False
    assert w.stats.spooled == 10 and w.stats.dropped == 0
    fake.down = False
    report = replay_spool(tmp_path, fake)
    assert report.ok and report.accepted == 10
    assert stored(fake) == [float(i) for i in range(10)]


def test_close_timeout_without_a_spool_dir_saves_to_the_default_one(
    fake: FakeTransport, default_spool_dir: Path
) -> None:
    fake.down = True
    w = BatchWriter(fake, "ws", settings())
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    with pytest.warns(DeliveryWarning, match="steplog sync"):
        assert w.close(0.1) is False
    assert w.stats.spooled == 1 and w.stats.dropped == 0
    fake.down = False
    assert replay_spool(default_spool_dir, fake).accepted == 1


def test_close_timeout_with_the_spool_unwritable_counts_dropped(
    fake: FakeTransport, tmp_path: Path
) -> None:
    fake.down = True
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("the spool cannot be created under a file")
    w = BatchWriter(fake, "ws", settings(strict=True, spool_dir=not_a_dir / "spool"))
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    from steplog._writer import DeliveryError

    with (
        pytest.warns(DeliveryWarning, match="cannot write the spool"),
        pytest.raises(DeliveryError, match="spool cannot be written"),
    ):
        w.close(0.1)
    assert w.stats.dropped == 1


# -------------------------------------------------------------- rejections


def test_rejections_warn_once_per_series_and_reason(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake)
    w.log_scalar("r1", "loss", (), 1.0, 5, 1.0)
    assert w.flush(WAIT)
    with pytest.warns(RejectedPointsWarning) as caught:
        w.log_scalar("r1", "loss", (), 1.0, 3, 1.0)  # step goes back
        assert w.flush(WAIT)
        w.log_scalar("r1", "loss", (), 1.0, 4, 1.0)  # again: same series, same reason
        assert w.flush(WAIT)
        w.log_scalar("r1", "acc", (), 1.0, 1, 1.0)
        w.log_scalar("r1", "acc", (), 1.0, 1, 1.0)  # same batch, other series
        assert w.flush(WAIT)
    messages = [str(c.message) for c in caught]
    assert len(messages) == 2, messages
    assert "STEP_NOT_INCREASING" in messages[0] and "loss" in messages[0]
    assert "acc" in messages[1]
    assert w.stats.rejected == 3
    assert w.stats.rejected_by_reason == {"STEP_NOT_INCREASING": 3}
    assert [(r.name, r.step) for r in w.rejections()] == [("loss", 3), ("loss", 4), ("acc", 1)]


def test_strict_mode_raises(fake: FakeTransport, writers: list[BatchWriter]) -> None:
    fake.service.reject_names.add("bad")
    w = make(writers, fake, strict=True)
    w.log_scalar("r1", "bad", (), 1.0, 1, 1.0)
    with pytest.raises(PointsRejectedError) as info:
        w.flush(WAIT)
    assert info.value.count == 1 and info.value.rejections[0].reason == "INVALID_NAME"
    assert w.flush(WAIT)  # raised once
    # From the next log call, when the ack arrived in between.
    w.log_scalar("r1", "bad", (), 2.0, 2, 1.0)
    assert fake.wait_for(lambda: len(fake.service.committed) >= 2)
    assert _wait_check_at_zero(w)
    with pytest.raises(PointsRejectedError):
        w.log_scalar("r1", "ok", (), 1.0, 1, 1.0)
    assert w.flush(WAIT)
    assert stored(fake, "ok") == [1.0]  # the point of the raising call was kept


def _wait_check_at_zero(w: BatchWriter) -> bool:
    with w._main._cond:
        return w._main._cond.wait_for(lambda: w._main.buffers.check_at == 0, WAIT)


# ---------------------------------------------------------- non-retryable


def test_non_retryable_error_spools_in_flight_and_continues_under_new_id(
    fake: FakeTransport, writers: list[BatchWriter], default_spool_dir: Path
) -> None:
    fake.failures = [(0, grpc.StatusCode.PERMISSION_DENIED, False)]
    w = make(writers, fake)  # no spool_dir: the default one
    first_id = w.writer_id
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    with pytest.warns(DeliveryWarning, match="PERMISSION_DENIED.*saved 1 points"):
        assert w.flush(WAIT) is False
    assert w.stats.refused == 1 and w.stats.dropped == 0
    assert spool_files(default_spool_dir)
    w.log_scalar("r1", "loss", (), 2.0, 2, 1.0)
    assert w.flush(WAIT)
    assert w.writer_id != first_id
    assert stored(fake) == [2.0]
    assert fake.service.committed == [(w.writer_id, 1)]
    assert "PERMISSION_DENIED" in (w.stats.last_error or "")


def test_non_retryable_error_with_spool_saves_the_batches(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path
) -> None:
    fake.failures = [(0, grpc.StatusCode.UNAUTHENTICATED, False)]
    w = make(writers, fake, spool_dir=tmp_path)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    with pytest.warns(DeliveryWarning, match="steplog sync"):
        assert w.flush(WAIT) is False
    w.log_scalar("r1", "acc", (), 2.0, 2, 1.0)
    assert w.flush(WAIT)
    assert stored(fake, "acc") == [2.0]
    assert replay_spool(tmp_path, fake).ok
    assert stored(fake) == [1.0]


# --------------------------------------------------------- offline / replay


def test_offline_spool_replayed_twice_stores_each_point_once(tmp_path: Path) -> None:
    w = BatchWriter(None, "ws", settings(offline=True, spool_dir=tmp_path, max_batch_points=7))
    for i in range(100):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    w.log_scalar("r1", "note", (), "text", None, 1.0)
    assert w.flush(WAIT)
    assert w.stats.spooled == 101
    w.log_scalar("r1", "loss", (), 100.0, 100, 1.0)
    assert w.close(WAIT)
    files = spool_files(tmp_path)
    assert files and all(f.name.startswith(w.writer_id) for f in files)

    fake = FakeTransport()
    first = replay_spool(tmp_path, fake)
    assert first.ok and first.accepted == 102 and first.duplicate_batches == 0
    second = replay_spool(tmp_path, fake, remove=True)
    assert second.ok and second.accepted == 0 and second.duplicate_batches == first.batches
    assert stored(fake) == [float(i) for i in range(101)]
    assert stored(fake, "note") == ["text"]
    assert spool_files(tmp_path) == []


def test_replay_retries_retryable_errors(tmp_path: Path) -> None:
    w = BatchWriter(None, "ws", settings(offline=True, spool_dir=tmp_path))
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.close(WAIT)
    fake = FakeTransport()
    calls = {"n": 0}
    real = fake.write

    def flaky(request: pb.WriteRequest, timeout: float | None = None) -> pb.WriteResponse:
        calls["n"] += 1
        if calls["n"] < 3:
            raise TransportError(UNAVAILABLE, "blip")
        return real(request, timeout)

    fake.write = flaky  # type: ignore[method-assign]
    report = replay_spool(tmp_path, fake, backoff=Backoff(0.0, 0.0))
    assert report.ok and calls["n"] == 3
    fake.down = True
    fake.write = real  # type: ignore[method-assign]
    report = replay_spool(tmp_path, fake, attempts=2, backoff=Backoff(0.0, 0.0))
    assert not report.ok


# --------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_starts_empty_with_a_new_writer_id(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.hold_acks = True
    w = make(writers, fake, max_batch_points=5)
    for i in range(20):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    assert fake.wait_for(lambda: len(fake.sent) >= 1)  # some in flight, unacked
    parent_id = w.writer_id
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return to pytest
        code = 1
        try:
            st = w.stats
            checks = [
                st.points_buffered == 0,
                st.points_unacked == 0,
                st.points_logged == 0,
                w.writer_id != parent_id,
                w.thread is None,
            ]
            fake.hold_acks = False
            w.log_scalar("r1", "loss", (), 100.0, 100, 1.0)
            checks.append(w.flush(WAIT))
            checks.append(fake.forked == 1)
            checks.append(stored(fake) == [100.0])
            checks.append(fake.service.committed == [(w.writer_id, 1)])
            checks.append(len(w._sender._lanes) == 1)  # driven once per round
            code = 0 if all(checks) else 10 + checks.index(False)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fake.release_acks()
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(20)]
    assert {wid for wid, _ in fake.service.committed} == {parent_id}


# ----------------------------------------------------------------- settings


def test_settings_from_env_names_the_bad_variable() -> None:
    s = WriterSettings.from_env(
        {"STEPLOG_ON_FULL": "spool", "STEPLOG_MAX_BUFFERED_BYTES": "64MiB", "STEPLOG_STRICT": "1"}
    )
    assert (s.on_full, s.max_buffered_bytes, s.strict) == ("spool", 64 << 20, True)
    assert WriterSettings.from_env(
        {"STEPLOG_MAX_BUFFERED_BYTES": "1_000_000"}
    ).max_buffered_bytes == (1_000_000)
    assert WriterSettings().max_buffered_bytes == 256 << 20  # the documented default
    assert WriterSettings.from_env({"STEPLOG_STRICT": "1"}, strict=False).strict is False
    with pytest.raises(ValueError, match="STEPLOG_FLUSH_INTERVAL"):
        WriterSettings.from_env({"STEPLOG_FLUSH_INTERVAL": "soon"})
    with pytest.raises(ValueError, match="STEPLOG_ON_FULL"):
        WriterSettings.from_env({"STEPLOG_ON_FULL": "explode"})


def test_bad_value_raises_at_the_call_and_leaves_the_series_intact(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    with pytest.raises(TypeError):
        w.log_scalar("r1", "loss", (), None, 2, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        w.log_scalar("r1", "loss", (), 2.0, "two", 1.0)  # type: ignore[arg-type]
    w.log_scalar("r1", "loss", (), 3.0, 3, 1.0)
    assert w.flush(WAIT)
    assert fake.service.points[("r1", "loss", ())] == [(1, 1.0), (3, 3.0)]


def test_log_series_carries_prebuilt_messages(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake)
    doc = data_pb2.SeriesData(name="cm", evaluations=data_pb2.EvaluationPoints(documents=["{}"]))
    w.log_series("r1", doc)
    assert w.flush(WAIT)
    assert len(stored(fake, "cm")) == 1
    huge = data_pb2.SeriesData(
        name="img", images=data_pb2.ImagePoints(images=[data_pb2.Image(data=b"x" * 25_000_000)])
    )
    with pytest.raises(ValueError, match="do not fit"):
        w.log_series("r1", huge)


# ------------------------------------------------------- the real transport


class _Servicer(ingest_service_pb2_grpc.IngestServiceServicer):
    def __init__(self, service: FakeService) -> None:
        self.service = service
        self.fail_next_stream = False

    def Ingest(self, request_iterator: Any, context: Any) -> Iterator[pb.IngestResponse]:
        if self.fail_next_stream:
            self.fail_next_stream = False
            context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        for request in request_iterator:
            duplicate, result = self.service.commit(request.batch)
            yield pb.IngestResponse(
                sequence=request.batch.sequence, duplicate_batch=duplicate, result=result
            )

    def Write(self, request: pb.WriteRequest, context: Any) -> pb.WriteResponse:
        duplicate, result = self.service.commit(request.batch)
        return pb.WriteResponse(duplicate_batch=duplicate, result=result)


@pytest.fixture
def grpc_server() -> Iterator[tuple[str, _Servicer]]:
    service = FakeService()
    servicer = _Servicer(service)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_grpc_transport_streams_and_recovers(
    grpc_server: tuple[str, _Servicer], writers: list[BatchWriter], tmp_path: Path
) -> None:
    address, servicer = grpc_server
    servicer.fail_next_stream = True
    channel = grpc.insecure_channel(address)
    w = make(writers, GrpcTransport(channel), max_batch_points=50)
    for i in range(500):
        w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    assert w.flush(WAIT)
    assert w.stats.reconnects >= 1
    points = servicer.service.points[("r1", "loss", ())]
    assert [v for _, v in points] == [float(i) for i in range(500)]
    assert w.close(WAIT)

    # The unary Write, through replay_spool.
    off = BatchWriter(None, "ws", settings(offline=True, spool_dir=tmp_path))
    off.log_scalar("r2", "loss", (), 1.0, 1, 1.0)
    assert off.close(WAIT)
    assert replay_spool(tmp_path, GrpcTransport(channel)).accepted == 1
    channel.close()


def test_grpc_transport_reports_status_and_retry_info() -> None:
    from google.protobuf import duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    class Aborting(ingest_service_pb2_grpc.IngestServiceServicer):
        def Write(self, request: Any, context: Any) -> Any:
            detail = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
            status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="busy")
            status.details.add().Pack(detail)
            context.abort_with_status(rpc_status.to_status(status))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(Aborting(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(TransportError) as info,
        ):
            GrpcTransport(channel).write(pb.WriteRequest(), timeout=WAIT)
    finally:
        server.stop(None)
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retryable
    assert err.retry_after == 2.0
    assert Backoff(0.1, 1.0).next_delay(err.retry_after) >= 2.0


def _poison(batch: pb.Batch) -> grpc.StatusCode | None:
    if any(rs.series.name == "poison" for rs in batch.series):
        return grpc.StatusCode.INVALID_ARGUMENT
    return None


def test_a_refused_batch_is_set_aside_and_holds_nothing_back(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path
) -> None:
    fake.refuse = _poison
    w = make(writers, fake, max_batch_points=1, spool_dir=tmp_path)
    first_id = w.writer_id
    w.log_scalar("r1", "loss", (), 0.0, 0, 1.0)
    w.log_scalar("r1", "poison", (), 1.0, 1, 1.0)
    for i in range(20):
        w.log_scalar("r1", "acc", (), float(i), i, 1.0)
    with pytest.warns(DeliveryWarning, match="INVALID_ARGUMENT.*writer id"):
        assert w.flush(WAIT) is False  # the poison point was not delivered
    assert stored(fake) == [0.0]
    assert stored(fake, "acc") == [float(i) for i in range(20)]
    assert w.stats.refused == 1 and w.stats.dropped == 0
    assert (first_id, 1) in fake.service.committed and w.writer_id != first_id
    assert (w.writer_id, 20) in fake.service.committed  # acc 0..19: sequences 1..20
    fake.refuse = None  # the cause is fixed: the spool sends it
    report = replay_spool(tmp_path, fake)
    assert report.ok and report.accepted == 1
    assert stored(fake, "poison") == [1.0]


def test_internal_is_retried_a_few_times_then_the_batch_is_spooled_and_reported(
    fake: FakeTransport, writers: list[BatchWriter], tmp_path: Path
) -> None:
    fake.failures = [(0, grpc.StatusCode.INTERNAL, False)] * 3
    w = make(writers, fake, spool_dir=tmp_path)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    with pytest.warns(DeliveryWarning, match="INTERNAL"):
        assert w.flush(WAIT) is False
    assert len(fake.sent) == 3  # tried three times, not forever
    assert w.stats.refused == 1 and "INTERNAL" in (w.stats.last_error or "")
    w.log_scalar("r1", "acc", (), 2.0, 2, 1.0)
    assert w.flush(WAIT)
    assert stored(fake, "acc") == [2.0]
    assert replay_spool(tmp_path, fake).accepted == 1
    assert stored(fake) == [1.0]


STREAM_REMOVED = "Stream removed (RST_STREAM (Received RST_STREAM with error code 0))"


def test_a_stream_reset_under_the_call_is_retried_like_unavailable_and_nothing_is_lost(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    """A load balancer whose replica died resets the client's stream: gRPC
    reports INTERNAL "Stream removed ... RST_STREAM". That is transport loss,
    not the service refusing the batch: resent (the same batch, committed
    or not before the reset) as long as it takes, not three times."""
    fake.failure_message = STREAM_REMOVED
    fake.failures = [(0, grpc.StatusCode.INTERNAL, i % 2 == 0) for i in range(8)]
    w = make(writers, fake, max_batch_points=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(100):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
        assert w.flush(WAIT) is True
    assert not [c for c in caught if issubclass(c.category, DeliveryWarning)]
    assert stored(fake) == [float(i) for i in range(100)]  # each once, in order
    st = w.stats
    assert st.refused == st.dropped == 0 and st.points_acked == 100
    assert st.reconnects >= 8 and not fake.failures
    assert len(set(fake.service.committed)) == len(fake.service.committed) == 10


def test_flush_is_false_after_a_batch_refused_before_it_began(
    fake: FakeTransport, writers: list[BatchWriter], default_spool_dir: Path
) -> None:
    """The batch was given up (and spooled, no spool_dir given) while the
    script kept logging; the flush that follows says so, once."""
    fake.refuse = _poison
    w = make(writers, fake)
    with pytest.warns(DeliveryWarning, match="INVALID_ARGUMENT.*saved to"):
        w.log_scalar("r1", "poison", (), 1.0, 1, 1.0)
        with w._main._cond:
            assert w._main._cond.wait_for(lambda: w._main.out.refused == 1, WAIT)
        w.log_scalar("r1", "loss", (), 2.0, 2, 1.0)
        assert w.flush(WAIT) is False
    assert w.flush(WAIT) is True  # nothing new was lost
    assert stored(fake) == [2.0]
    assert w.stats.refused == 1 and w.stats.dropped == 0
    fake.refuse = None
    assert replay_spool(default_spool_dir, fake).accepted == 1
    assert stored(fake, "poison") == [1.0]


def test_resource_exhausted_is_retried_only_with_retry_info_and_after_its_delay(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.failures = [(0, grpc.StatusCode.RESOURCE_EXHAUSTED, False, 0.3)]
    w = make(writers, fake)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.flush(WAIT)
    assert stored(fake) == [1.0] and len(fake.sent_at) == 2
    assert fake.sent_at[1] - fake.sent_at[0] >= 0.3  # the service's delay, not ours (1 ms)
    # Without RetryInfo (a message over a size limit) it is not resent.
    fake.failures = [(0, grpc.StatusCode.RESOURCE_EXHAUSTED, False)]
    w.log_scalar("r1", "loss", (), 2.0, 2, 1.0)
    with pytest.warns(DeliveryWarning, match="RESOURCE_EXHAUSTED"):
        assert w.flush(WAIT) is False
    assert len(fake.sent_at) == 3 and w.stats.refused == 1 and w.stats.dropped == 0  # spooled
    w.log_scalar("r1", "loss", (), 3.0, 3, 1.0)
    assert w.flush(WAIT)
    assert stored(fake) == [1.0, 3.0]


def test_a_gap_the_service_keeps_reporting_moves_to_a_new_writer_id(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake)
    w.log_scalar("r1", "loss", (), 1.0, 1, 1.0)
    assert w.flush(WAIT)
    first_id = w.writer_id
    with fake.service.lock:
        fake.service.hwm[first_id] = -5  # the service lost track: every resend is a gap
    w.log_scalar("r1", "loss", (), 2.0, 2, 1.0)
    assert w.flush(WAIT)
    assert w.writer_id != first_id
    assert stored(fake) == [1.0, 2.0]
    assert (w.writer_id, 1) in fake.service.committed


def test_bulk_columns_from_numpy(fake: FakeTransport, writers: list[BatchWriter]) -> None:
    w = make(writers, fake)
    steps = np.arange(0, 3000, 3, dtype=np.int64)  # multi-byte varints
    w.log_scalars("r1", "loss", (), np.linspace(0, 1, len(steps)), steps, None)
    w.log_scalars("r1", "big", (), [1.0, 2.0], [2**40, 2**62], [5.0, 6.0])
    assert w.flush(WAIT)
    assert [s for s, _ in fake.service.points[("r1", "loss", ())]] == steps.tolist()
    assert fake.service.points[("r1", "big", ())] == [(2**40, 1.0), (2**62, 2.0)]
    with pytest.raises(ValueError):
        w.log_scalars("r1", "loss", (), [1.0, 2.0], [1], None)


# ------------------------------------- the training thread does only appends


class _RecordingProtos:
    """Stands in for the data_pb2 module inside steplog._tables and
    steplog._writer.items / .series: every message they build is recorded with its thread."""

    def __init__(self) -> None:
        self.built: list[tuple[str, str]] = []
        self.threads: set[int] = set()  # the idents of the threads that built them

    def __getattr__(self, name: str) -> Any:
        real = getattr(data_pb2, name)
        if not (isinstance(real, type) and name[:1].isupper()):
            return real
        built, threads = self.built, self.threads

        def make(*args: Any, **kwargs: Any) -> Any:
            built.append((name, threading.current_thread().name))
            threads.add(threading.get_ident())
            return real(*args, **kwargs)

        return make


def test_log_calls_build_no_protobuf_on_the_callers_thread(
    fake: FakeTransport, writers: list[BatchWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    from steplog import _tables
    from steplog._writer import items, series

    protos = _RecordingProtos()
    monkeypatch.setattr(_tables, "data_pb2", protos)
    monkeypatch.setattr(items, "data_pb2", protos)
    monkeypatch.setattr(series, "data_pb2", protos)
    w = make(writers, fake, flush_interval=60.0)  # nothing is due on its own
    n = 2 * _tables.MAX_ROWS + 5  # more than one message's worth of rows
    for i in range(n):
        w.log_row("r1", "tbl", (), {"i": i, "loss": 1.0 / (i + 1), "tag": f"t{i}"}, 1.0)
    w.log_table_rows("r1", "tbl", (), {"i": [n, n + 1]})
    w.log_item(
        "r1",
        "cm",
        (),
        "evaluations",
        _tables.evaluation_item(
            "confusion_matrix", {"data": {"class_labels": ["a"], "matrix": [[1]]}}, "", 1, 1.0
        ),
    )
    image = items.ImageItem(b"\x89PNG fake", 1.0, 3, "")
    w.log_item("r1", "img", (), "images", image, image.encoded_bound("img", ()))
    me = threading.current_thread().name
    assert [b for b in protos.built if b[1] == me] == []  # nothing encoded here
    assert w.flush(WAIT)
    assert protos.built and {t for _, t in protos.built} == {"steplog-writer"}
    assert [b for b in protos.built if b[1] == me] == []
    # Nothing lost, nothing reordered: every row once, in order.
    tables = []
    for _, s in fake.service.points[("r1", "tbl", ())]:
        if not tables or tables[-1] is not s:
            tables.append(s)
    from steplog._decoders import table_columns

    assert [v for s in tables for v in table_columns(s.table)["i"]] == list(range(n + 2))
    assert max(s.table.row_count for s in tables) <= _tables.MAX_ROWS
    assert len(stored(fake, "cm")) == 1 and len(stored(fake, "img")) == 1
    assert w.stats.points_logged == w.stats.points_acked == n + 2 + 1 + 1
    # ONE thread encoded rows, tables, evaluations and the image (whose
    # stream is a second one); no timer thread.
    assert w.thread is not None and protos.threads == {w.thread.ident}
    assert w.image_stats is not None and w.image_stats.writer_id.endswith(".img")
    assert not [t for t in threading.enumerate() if t.name == "steplog-rows"]


def test_rows_wait_for_the_flush_interval_or_a_flush_not_a_timer_thread(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake, flush_interval=0.05)
    w.log_row("r1", "tbl", (), {"i": 1}, 1.0)
    # The writer's own timer (the flush interval) sends the row: no flush call.
    assert fake.wait_for(lambda: len(fake.service.points[("r1", "tbl", ())]) == 1)
    w2 = make(writers, fake, flush_interval=60.0)
    for i in range(3):
        w2.log_row("r2", "tbl", (), {"i": i}, 1.0)
    assert w2.stats.points_buffered == 3 and w2.stats.bytes_in_memory > 0
    assert w2.flush(WAIT)  # flush hands the rows over (one message)
    sent = fake.service.points[("r2", "tbl", ())]
    assert len(sent) == 3 and sent[0][1].table.row_count == 3


def test_rows_count_against_the_memory_bound_and_drop_oldest_whole(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.hold_acks = True
    fake.down = True
    w = make(writers, fake, max_buffered_bytes=64 * 1024, on_full="drop_oldest")
    with pytest.warns(DroppedPointsWarning):
        for i in range(2000):
            w.log_row("r1", "tbl", (), {"i": i, "s": "x" * 100}, 1.0)
    st = w.stats
    assert st.dropped > 0 and st.bytes_in_memory <= 64 * 1024 + 1024
    assert st.points_logged == 2000


def test_a_bad_cell_fails_at_the_call_and_leaves_the_table_intact(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    from steplog.errors import InvalidArgumentError

    w = make(writers, fake)
    w.log_row("r1", "tbl", (), {"i": 1}, 1.0)
    with pytest.raises(InvalidArgumentError, match="column 'x' value must be"):
        w.log_row("r1", "tbl", (), {"x": [1, 2]}, 1.0)
    with pytest.raises(InvalidArgumentError, match="column name"):
        w.log_row("r1", "tbl", (), {"": 1}, 1.0)
    w.log_row("r1", "tbl", (), {"i": 2}, 1.0)
    assert w.flush(WAIT)
    assert len(fake.service.points[("r1", "tbl", ())]) == 2
    assert w.stats.points_logged == w.stats.points_acked == 2


def test_rejection_warnings_count_per_series(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake)
    for name in ("a", "b"):
        w.log_scalar("r1", name, (), 1.0, 10, 1.0)
    assert w.flush(WAIT)
    with pytest.warns(RejectedPointsWarning) as caught:
        for i in range(3):
            w.log_scalar("r1", "a", (), 1.0, i, 1.0)  # 3 rejected in series a
        w.log_scalar("r1", "b", (), 1.0, 1, 1.0)  # 1 rejected in series b, same batch
        assert w.flush(WAIT)
    messages = [str(c.message) for c in caught]
    assert len(messages) == 2, messages
    heads = {m.split(" at step")[0] for m in messages}
    assert heads == {
        "steplog: 3 point(s) of this series rejected: a of run r1",  # not 4, the batch's count
        "steplog: 1 point(s) of this series rejected: b of run r1",
    }
    assert w.stats.rejected == 4
