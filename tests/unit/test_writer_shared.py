"""Several writers driven by ONE sender thread (the streams of
`Run.new_stream`, steplog._writer.sender.shared_sender): each keeps its own
writer id, sequence, buffers, bound and window; closing one stops only its
lanes; a stream that cannot send holds no other back; fork resets the shared
sender once. Against the in-memory fake service of test_writer."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator

import pytest

from steplog._writer import BatchWriter
from steplog._writer.sender import STREAMS_THREAD_NAME, THREAD_NAME, Sender, shared_sender
from tests.unit.test_writer import WAIT, FakeTransport, settings, stored

WRITERS = 8


@pytest.fixture
def sender() -> Sender:
    return Sender(STREAMS_THREAD_NAME)


@pytest.fixture
def made() -> Iterator[list[BatchWriter]]:
    writers: list[BatchWriter] = []
    yield writers
    for w in writers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.close(timeout=2)


def _writer(
    made: list[BatchWriter], fake: FakeTransport, sender: Sender, **kw: object
) -> BatchWriter:
    w = BatchWriter(fake, "ws", settings(**kw), sender=sender)
    made.append(w)
    return w


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def test_writers_on_a_shared_sender_run_on_one_thread_each_with_its_own_sequence(
    sender: Sender, made: list[BatchWriter]
) -> None:
    fake = FakeTransport()
    before = set(_writer_threads())
    ws = [_writer(made, fake, sender, max_batch_points=50) for _ in range(WRITERS)]
    for step in range(500):
        for r, w in enumerate(ws):
            w.log_scalar("r1", "loss", (("rank", str(r)),), float(step), step, 1.0)
    assert all(w.flush(WAIT) for w in ws)
    new = [t for t in _writer_threads() if t not in before]
    assert [t.name for t in new] == [STREAMS_THREAD_NAME]
    assert all(w.thread is new[0] for w in ws)
    assert sender.lanes() == WRITERS
    ids = [w.writer_id for w in ws]
    assert len(set(ids)) == WRITERS
    for r, w in enumerate(ws):
        points = fake.service.points[("r1", "loss", (("rank", str(r)),))]
        assert [v for _, v in points] == [float(s) for s in range(500)]
        # Its own sequence space: 1, 2, ... in the order it sent them.
        seqs = [seq for _, wid, seq in fake.sent if wid == w.writer_id]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 10
        assert w.stats.points_acked == 500


def test_closing_one_writer_stops_its_lanes_and_the_others_go_on(
    sender: Sender, made: list[BatchWriter]
) -> None:
    fake = FakeTransport()
    ws = [_writer(made, fake, sender) for _ in range(3)]
    for r, w in enumerate(ws):
        w.log_scalar("r1", "loss", (("rank", str(r)),), 1.0, 0, 1.0)
    assert ws[0].close(WAIT) is True
    thread = sender.thread
    assert thread is not None and thread.is_alive()  # serving the other two
    assert ws[0]._main.finished and sender.lanes() == 2
    for step in range(1, 200):
        for r, w in enumerate(ws[1:], start=1):
            w.log_scalar("r1", "loss", (("rank", str(r)),), float(step), step, 1.0)
    assert all(w.flush(WAIT) for w in ws[1:])
    for r in (1, 2):
        assert len(fake.service.points[("r1", "loss", (("rank", str(r)),))]) == 200
    assert len(fake.service.points[("r1", "loss", (("rank", "0"),))]) == 1
    # The last close ends the thread; a new writer on the sender starts it again.
    assert ws[1].close(WAIT) and ws[2].close(WAIT)
    thread.join(WAIT)
    assert not thread.is_alive() and sender.thread is None
    again = _writer(made, fake, sender)
    again.log_scalar("r1", "late", (), 1.0, 0, 1.0)
    assert again.flush(WAIT)
    assert stored(fake, "late") == [1.0]
    assert sender.thread is not None and sender.thread is not thread


def test_closing_a_writer_that_logged_nothing_returns_at_once(
    sender: Sender, made: list[BatchWriter]
) -> None:
    w = _writer(made, FakeTransport(), sender)
    assert w.close(WAIT) is True
    assert w._main.finished


@pytest.mark.parametrize("trouble", ["down", "acks_held"])
def test_a_writer_that_cannot_send_holds_no_other_back(
    sender: Sender, made: list[BatchWriter], trouble: str
) -> None:
    """Per-lane fairness: writer A's service is down (its stream reconnects
    under backoff) or never acknowledges (its window fills, its logging
    thread waits on its own bound); writer B, on the same thread, is
    delivered all the same, and A catches up once its service is back."""
    slow, fast = FakeTransport(), FakeTransport()
    if trouble == "down":
        slow.down = True
    else:
        slow.hold_acks = True
    a = _writer(made, slow, sender, max_buffered_bytes=64 * 1024, max_batch_points=100)
    b = _writer(made, fast, sender, max_batch_points=100)
    stop = threading.Event()
    logged = [0]

    def log_a() -> None:
        step = 0
        while not stop.is_set() and step < 100_000:
            a.log_scalar("r1", "loss", (), float(step), step, 1.0)
            step += 1
        logged[0] = step

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # A's bound: spill/drop warnings are not the point
        t = threading.Thread(target=log_a, daemon=True)
        t.start()
        try:
            for round_ in range(20):
                for step in range(round_ * 100, (round_ + 1) * 100):
                    b.log_scalar("r1", "loss", (), float(step), step, 1.0)
                assert b.flush(WAIT), f"round {round_}"
        finally:
            stop.set()
            t.join(WAIT)
        assert stored(fast) == [float(s) for s in range(2000)]
        if trouble == "down":
            assert slow.service.count() == 0
        assert a.stats.points_acked == 0  # held: committed, never acknowledged
        slow.down = False
        slow.release_acks()
        assert a.flush(WAIT)
    st = a.stats
    assert st.points_acked + st.dropped + st.dropped_unspooled == logged[0]
    assert st.points_acked > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_resets_the_shared_sender_once_for_all_its_writers(
    sender: Sender, made: list[BatchWriter]
) -> None:
    fakes = [FakeTransport() for _ in range(3)]  # a transport each, as streams have
    for f in fakes:
        f.hold_acks = True
    ws = [_writer(made, f, sender, max_batch_points=5) for f in fakes]
    for w in ws:
        for i in range(20):
            w.log_scalar("r1", "loss", (), float(i), i, 1.0)
    assert all(f.wait_for(lambda f=f: len(f.sent) >= 1) for f in fakes)
    parent_ids = [w.writer_id for w in ws]
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return to pytest
        code = 1
        try:
            checks = [
                sender.thread is None,
                sender.lanes() == 3,  # every writer's lane, once
                all(w.stats.points_logged == 0 for w in ws),
                all(w.writer_id not in parent_ids for w in ws),
            ]
            for f in fakes:
                f.hold_acks = False
            for w in ws:
                w.log_scalar("r1", "child", (), 1.0, 0, 1.0)
            checks.append(all(w.flush(WAIT) for w in ws))
            checks.append(all(stored(f, "child") == [1.0] for f in fakes))
            checks.append(all(f.forked == 1 for f in fakes))
            checks.append([t.name for t in _writer_threads()] == [STREAMS_THREAD_NAME])
            code = 0 if all(checks) else 10 + checks.index(False)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for f in fakes:
        f.release_acks()
    assert all(w.flush(WAIT) for w in ws)
    assert all(stored(f) == [float(i) for i in range(20)] for f in fakes)


def test_shared_sender_is_one_per_process() -> None:
    assert shared_sender() is shared_sender()
    assert shared_sender().name == STREAMS_THREAD_NAME
