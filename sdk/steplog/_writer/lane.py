"""One stream of the writer (a "lane"): its buffers, its ledger, its `Ingest`
stream and its spool file, driven by the writer's one sender thread
(steplog._writer.sender; for `Run.new_stream`'s writers, one thread shared by
all of them), which calls `tick()` and `next_wake()`.

Over 500 lines because it is the state machine of one stream (connect, send
within the window, acks, stream ends under the retry table, refusals, the
memory bound, spill and offline) and its pieces all act on the same few
fields; the pure parts are apart (ledger, outcomes, buffers, wire).

A writer has two lanes: the main one (scalars, rows, tables, evaluations)
and the image lane (`<writer id>.img`, created on the first image), so a
slow or failing object store never holds the rest behind images. See
steplog._writer.writer for what is guaranteed.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from time import monotonic
from time import time as wall_time
from typing import Any

import grpc

from steplog._retry import STREAM_WIDE_CODES
from steplog._writer.intake import Buffers, Wake
from steplog._writer.ledger import Entry, Ledger
from steplog._writer.outcomes import (
    DeliveryWarning,
    DroppedPointsWarning,
    Notes,
    Outcomes,
    WriterStats,
)
from steplog._writer.settings import WriterSettings
from steplog._writer.spooling import SpoolGlue
from steplog._writer.transport import (
    Backoff,
    IngestStream,
    Rejection,
    Transport,
    TransportError,
    reason_name,
)
from steplog._writer.wire import BATCH_HEADER_BYTES, sole_series
from steplog.v1 import ingest_service_pb2 as pb

# A stepped numeric point in memory (time, step, value columns).
_POINT_BYTES = 24
_ACK = 0
_END = 1
# In a forked child, the parent's stream and call objects are kept referenced
# forever: their finalizers must not run (they would act on the parent's socket).
FORK_GRAVEYARD: list[object] = []


class Lane:
    """One stream: buffers -> batches -> in flight -> acknowledged.

    `wake` is the sender's Event (shared by every lane of the writer);
    `start` asks the sender thread to run (lazily, also after fork)."""

    def __init__(
        self,
        transport: Transport | None,
        workspace: str,
        settings: WriterSettings,
        writer_id: str,
        wake: Wake,
        start: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._workspace = workspace
        self._settings = settings
        self._wake = wake
        self._start = start
        s = settings
        # Smaller batches for a small bound, so the window and the spill
        # watermark (half the bound each) hold whole batches of scalars.
        bound = s.max_buffered_bytes
        self._batch_points = max(1, min(s.max_batch_points, bound // (4 * _POINT_BYTES)))
        self._batch_bytes = s.max_batch_bytes - BATCH_HEADER_BYTES - len(workspace.encode())
        self._init_state(writer_id)

    # ------------------------------------------------------------------ state

    def _init_state(self, writer_id: str) -> None:
        """Everything a forked child must not share with its parent."""
        s = self._settings
        self.out = Outcomes(s.strict)
        self.buffers = Buffers(
            self.out,
            self._wake,
            self._ensure_started,
            self._rearm,
            s.max_batch_bytes,
            self._batch_bytes,
        )
        self._lock = self.buffers.lock
        self._cond = self.buffers.cond
        self.ledger = Ledger(writer_id, s.max_buffered_bytes // 2)
        self._spool = SpoolGlue(s, self.ledger, self.out, self._lock, self._rearm)
        self._spill = s.on_full == "spool" and not s.offline
        self._spill_at = max(1, s.max_buffered_bytes // 2)
        self._wake_pending = False
        self._spill_pending = False
        # A log call waited max_block_s: later calls do not wait until the
        # sender has spilled (lock).
        self._overflow = False
        self._spilling_after_overflow = False
        self._seq_mem = 0  # bytes of in-memory sequenced batches (lock)
        self._outbox: deque[Entry] = deque()  # formed, not yet sent (sender)
        self._outbox_mem = 0  # bytes of in-memory batches in the outbox (lock)
        # Flush handshake (lock).
        self._cut_requested = 0
        self._cut_done = 0
        self._cut_target = 0
        self._stop = False
        self.closed = False
        self.finished = False  # the last round ran (sender)
        self.failed: BaseException | None = None
        # Stream (sender).
        self._events: deque[tuple[int, int, Any]] = deque()
        self._stream: IngestStream | None = None
        self._stream_gen = 0
        self._reconnect_at = 0.0
        self._ever_connected = False
        self._stream_proven = False  # an ack arrived on the current stream
        self._sent_on_stream = 0
        self._to_resend: deque[Entry] = deque()  # unacked, not yet resent on this stream
        # Consecutive stream failures per code since the last ack (steplog._retry).
        self._failures: dict[grpc.StatusCode, int] = {}
        self._needs_after_fork = False
        self._backoff = Backoff(s.backoff_initial, s.backoff_max)
        self._rearm()

    @property
    def writer_id(self) -> str:
        return self.ledger.writer_id

    @property
    def wake(self) -> Wake:
        """How this lane's parts wake the sender (given at construction or fork)."""
        return self._wake

    def stats(self) -> WriterStats:
        o = self.out
        with self._lock:
            b = self.buffers
            return WriterStats(
                points_logged=b.buffered + o.drained + o.dropped_buffered,
                points_acked=o.points_acked,
                duplicates=o.duplicates,
                rejected=o.rejected,
                dropped=o.dropped,
                dropped_unspooled=o.dropped_unspooled,
                blocked_calls=o.blocked,
                refused=o.refused,
                spooled=o.spooled,
                batches_sent=o.batches_sent,
                batches_acked=o.batches_acked,
                reconnects=o.reconnects,
                points_buffered=b.buffered,
                bytes_in_memory=b.buffered_bytes + self._seq_mem,
                points_unacked=o.drained - o.resolved_points,
                rejected_by_reason=dict(o.rejected_by_reason),
                last_error=o.last_error,
                writer_id=self.ledger.writer_id,
            )

    def rejections(self) -> list[Rejection]:
        with self._lock:
            return list(self.out.rejections)

    # ------------------------------------------------------------ slow path

    def after_log(self, added: int) -> Notes | None:
        """The slow path of logging: wake the sender, apply the memory bound,
        take the sender's news (warnings, strict errors) for the caller to
        deliver. `added`: the bytes the call added."""
        b = self.buffers
        with self._cond:
            if self.closed:
                dropped = b.drop_points(b.buffered)
                self.out.note_once(
                    ("closed",),
                    DroppedPointsWarning,
                    f"steplog writer is closed: {dropped} points logged after close were dropped",
                )
            else:
                self._ensure_started()
                woke = False
                if b.buffered >= self._batch_points and not self._wake_pending:
                    self._wake_pending = woke = True
                    self._wake.set()
                if (
                    self._spill
                    and not self._spill_pending
                    and b.buffered_bytes + self._outbox_mem >= self._spill_at
                ):
                    self._spill_pending = woke = True
                    self._wake.set()
                if woke:
                    # The next calls stay on the fast path: the sender has been
                    # told (until its round rearms, each call would come here).
                    self._rearm()
                self._apply_bound(added)
            return self._take_notes()

    def _apply_bound(self, added: int) -> None:
        s = self._settings
        b = self.buffers
        if b.buffered_bytes + self._seq_mem <= s.max_buffered_bytes:
            return
        if self._drops_oldest:
            self._drop_over_bound()
            return
        # wait / spool: the sender frees room (acks, spill) and notifies; after
        # max_block_s it spills what is buffered to disk, and the call returns.
        # While that spill is under way, calls go on without waiting up to
        # twice the bound; past that one call waits (max_block_s again), and
        # if the spill has still not freed room, the oldest buffered points
        # are dropped and counted: memory stays within twice the bound.
        allowance = max(s.max_buffered_bytes, added)
        if self._overflow:
            allowance = max(2 * s.max_buffered_bytes, added)
        self._wake.set()
        deadline = monotonic() + s.max_block_s
        while (
            b.buffered_bytes + self._seq_mem > allowance and not self.closed and self.failed is None
        ):
            remaining = deadline - monotonic()
            if remaining <= 0:
                self.out.blocked += 1
                if not self._overflow:
                    self._overflow = True
                    self._spill_pending = True
                    self._wake.set()
                    return
                dropped = b.drop_bytes(b.buffered_bytes + self._seq_mem - allowance)
                self.out.dropped_unspooled += dropped
                self.out.note_once(
                    ("spill-behind",),
                    DroppedPointsWarning,
                    f"steplog: memory is at twice the bound and the spool has not freed room "
                    f"in {s.max_block_s} s: dropped the {dropped} oldest buffered points; later "
                    "drops are counted in stats.dropped_unspooled",
                )
                return
            self._cond.wait(remaining)

    @property
    def _drops_oldest(self) -> bool:
        """(lock held) Memory over the bound is freed by dropping the oldest
        buffered points: on_full="drop_oldest", or a writer that has failed."""
        return self._settings.on_full == "drop_oldest" or self.failed is not None

    def _drop_over_bound(self) -> None:
        """(lock held) on_full="drop_oldest" (or a failed writer): drop the
        oldest buffered points until memory is within the bound again, in
        chunks of 1% of it, so the next calls stay on the fast path. The
        sender calls it too before it sequences a batch: a point the
        log call added past the bound must go before the sender takes the
        buffers into batches that are never dropped."""
        s = self._settings
        b = self.buffers
        over = b.buffered_bytes + self._seq_mem - s.max_buffered_bytes
        if over <= 0:
            return
        dropped = b.drop_bytes(max(over, s.max_buffered_bytes // 100))
        if dropped:
            self.out.note_once(
                ("drop_oldest",),
                DroppedPointsWarning,
                f"steplog: {s.max_buffered_bytes} bytes are buffered; dropping the "
                f"oldest points (on_full='drop_oldest'); see stats.dropped",
            )

    def _rearm(self) -> None:
        """Where the hot path must next leave the fast path (lock held)."""
        b = self.buffers
        if self.out.notes or self.closed:
            b.check_at = b.mem_check_at = 0
            return
        mem_at = self._settings.max_buffered_bytes - self._seq_mem + 1
        if self._spill and not self._spill_pending:
            mem_at = min(mem_at, self._spill_at - self._outbox_mem)
        b.mem_check_at = mem_at
        b.check_at = 1 << 62 if self._wake_pending else self._batch_points

    def _take_notes(self) -> Notes | None:
        notes = self.out.take_notes()
        if notes is not None:
            self._rearm()
        return notes

    def take_news(self) -> tuple[bool, Notes | None]:
        """(no losses since the last call, the pending news) for flush/close."""
        with self._lock:
            return self.out.take_losses(), self._take_notes()

    def _ensure_started(self) -> None:
        if not self.closed:
            self._start()

    # ----------------------------------------------------------- flush/close

    def flush_until(self, deadline: float | None) -> bool:
        """Wait until every point logged before the call is finished (acked,
        or written offline); False on the deadline or if some were lost."""
        with self._cond:
            if self.buffers.buffered == 0 and self.ledger.settled():
                return True
            if self._stop or self.failed is not None:
                return False  # the sender is gone: nothing more will be delivered
            self._ensure_started()
            done_before = self.ledger.done_through
            self._cut_requested += 1
            request = self._cut_requested
            self._wake.set()
            while self._cut_done < request:
                if not self._wait(deadline):
                    return False
            target = self._cut_target
            while self.ledger.done_through < target:
                if not self._wait(deadline):
                    return False
            return not self.ledger.lost_in(done_before, target)

    def _wait(self, deadline: float | None) -> bool:
        """One wait on the condition (lock held); False once the deadline has
        passed or the sender is gone."""
        if self.failed is not None:
            return False
        if deadline is None:
            self._cond.wait()
            return True
        remaining = deadline - monotonic()
        if remaining <= 0:
            return False
        self._cond.wait(remaining)
        return True

    def request_stop(self) -> None:
        """No more points; the sender's next round is this lane's last."""
        with self._cond:
            self._stop = True
            self.closed = True
            self._rearm()
            self._wake.set()

    def wait_finished(self, timeout: float | None) -> bool:
        """Wait (after request_stop) until the sender has run this lane's
        last round; False on timeout. For a lane on a shared sender, whose
        thread goes on with other lanes."""
        deadline = None if timeout is None else monotonic() + timeout
        with self._cond:
            while not self.finished:
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def delivered_all(self) -> bool:
        with self._lock:
            return self.buffers.buffered == 0 and not self._outbox and not self.ledger.unacked

    def record_operation(self, kind: str, payload: bytes) -> None:
        self._spool.writer().append_operation(kind, payload)
        self._spool.writer().sync()

    def fail(self, exc: BaseException) -> None:
        """The sender thread hit a bug in this lane: never leave a logger or
        a flush waiting."""
        with self._cond:
            self.failed = exc
            self.finished = True
            self.out.last_error = f"writer thread failed: {exc!r}"
            self.out.note_once(
                ("sender-failed",),
                DeliveryWarning,
                f"steplog writer thread failed ({exc!r}); points are no longer sent",
            )
            self._rearm()
            self._cond.notify_all()

    # ----------------------------------------------------------------- sender

    def next_wake(self) -> float | None:
        """When the sender must next run this lane's round (monotonic), or
        None until an event wakes it."""
        wakes: list[float] = []
        with self._lock:
            oldest = self.buffers.oldest if self.buffers.buffered else None
            due_after = self._due_after()
        interval = self._settings.flush_interval
        if self._settings.offline:
            if oldest is not None:
                wakes.append(oldest + interval)
            if self._outbox:
                wakes.append(self._spool.retry_at)
        elif self._stream is None:
            if self.ledger.unacked or self._outbox or oldest is not None:
                wakes.append(self._reconnect_at)
            if self._spill and oldest is not None:
                wakes.append(max(oldest + interval, self._spool.retry_at))
        else:
            if oldest is not None and (self._spill or self._window_room(1)):
                wakes.append(oldest + due_after)
            if self._outbox and self._outbox[0].request is None:
                wakes.append(self._spool.retry_at)
        return min(wakes) if wakes else None

    def _due_after(self) -> float:
        """(lock held) How old the oldest buffered point must be before a
        batch that is not full is cut: the flush interval, or the linger
        bound while the stream lingers (`_lingers`)."""
        s = self._settings
        if self._lingers():
            return max(s.flush_interval, s.max_linger)
        return s.flush_interval

    def _lingers(self) -> bool:
        """(lock held) Nagle-like linger: while an earlier batch of this
        stream is unacknowledged, a batch due only by time waits for that
        ack (the ack wakes the sender, and the batch is cut at once if its
        oldest point is past the flush interval), at most until its oldest
        point is `max_linger` old. When the service is behind, each stream
        thus sends fewer, larger batches (the service's cost is mostly per
        batch, bench/README.md W2); an idle stream (nothing in flight) sends
        every flush interval as before. Never while spooling (on_full="spool"
        cuts due points every flush interval so they are on disk: the kill -9
        promise), offline (no acks), after a log call waited for room, or
        once the buffered data fills a batch's bytes or memory reaches half
        the bound. flush() and close() cut everything regardless."""
        if not self.ledger.unacked or self._settings.max_linger <= 0:
            return False
        if self._spill or self._spill_pending or self._overflow or self._settings.offline:
            return False
        b = self.buffers
        return (
            b.buffered_bytes < self._batch_bytes
            and b.buffered_bytes + self._seq_mem < self._settings.max_buffered_bytes // 2
        )

    def tick(self) -> None:
        """One round of the sender for this lane (sets `finished` at the end)."""
        self._handle_events()
        now = monotonic()
        with self._lock:
            b = self.buffers
            stop = self._stop
            cut = self._cut_requested > self._cut_done
            cut_request = self._cut_requested
            due = b.buffered >= self._batch_points or (
                b.oldest is not None and b.buffered > 0 and now >= b.oldest + self._due_after()
            )
        if stop:
            self._shutdown()
            with self._cond:
                self.finished = True
                self._cond.notify_all()
            return
        if self._settings.offline:
            self._write_offline(due or cut)
        else:
            self._connect(now)
            self._send_ready(due or cut)
            if cut:
                self._form_all()
                self._send_ready(False)
            if self._spill or self._spill_pending:
                self._maybe_spill(due or cut)
        if cut:
            self._spool.sync()
            with self._cond:
                self._cut_done = cut_request
                self._cut_target = self.ledger.ordinal
                self._cond.notify_all()
        with self._cond:
            if self.buffers.buffered < self._batch_points:
                self._wake_pending = False
            if (
                self._spilling_after_overflow
                and not self._outbox
                and self.buffers.buffered_bytes < self._spill_at
                and all(e.ref is None for e in self.ledger.unacked.values())
            ):
                self._spill = self._spilling_after_overflow = False  # drained
            self._rearm()
            self._cond.notify_all()

    # Stream events arrive on transport threads; they only queue and wake.
    def _push(self, gen: int, kind: int, payload: Any) -> None:
        self._events.append((gen, kind, payload))
        self._wake.set()

    def _handle_events(self) -> None:
        while self._events:
            gen, kind, payload = self._events.popleft()
            if gen != self._stream_gen:
                continue  # from a stream we already gave up on
            if kind == _ACK:
                self._on_ack(payload)
            else:
                self._on_stream_end(payload)

    def _connect(self, now: float) -> None:
        if self._stream is not None or now < self._reconnect_at:
            return
        with self._lock:
            work = bool(self.ledger.unacked or self._outbox or self.buffers.buffered)
        if not work:
            return
        assert self._transport is not None
        if self._needs_after_fork:
            self._needs_after_fork = False
            self._transport.after_fork()
        self._stream_gen += 1
        gen = self._stream_gen
        try:
            stream = self._transport.open_stream(
                lambda r: self._push(gen, _ACK, r), lambda e: self._push(gen, _END, e)
            )
        except TransportError as err:
            self._stream = None
            self._on_stream_end(err)
            return
        except Exception as exc:  # e.g. a closed channel: it will not get better
            code = grpc.StatusCode.FAILED_PRECONDITION
            self._on_stream_end(TransportError(code, f"cannot open a stream: {exc!r}"))
            return
        self._stream = stream
        self._stream_proven = False
        self._sent_on_stream = 0
        if self._ever_connected:
            with self._lock:
                self.out.reconnects += 1
        self._ever_connected = True
        # Resend everything unacknowledged, in order: the first batch now, the
        # rest once the stream has proven itself with an ack (see _send_ready).
        self._to_resend = deque(self.ledger.unacked.values())
        self._send_ready(False)

    def _window_room(self, nbytes: int) -> bool:
        return self.ledger.room(nbytes, self._stream_proven)

    def _send_ready(self, form: bool) -> None:
        """Resend the unacknowledged, then send the outbox, then (if `form`) new
        batches, while the window has room. Order is the sequence order."""
        while self._stream is not None and self._to_resend:
            if not self._stream_proven and self._sent_on_stream:
                return  # one probe at a time into a stream that has not acked yet
            if not self._send(self._to_resend.popleft()):
                return
        if self._to_resend:
            return
        while self._stream is not None and self._outbox:
            entry = self._outbox[0]
            if not self._window_room(entry.nbytes):
                return
            self._outbox.popleft()
            if entry.request is None:
                if not self._load(entry):
                    self._outbox.appendleft(entry)
                    return
            else:
                with self._lock:
                    self._outbox_mem -= entry.nbytes
            self._start_flight(entry)
        while form and self._stream is not None and self._window_room(0):
            formed = self._form_batch()
            if formed is None:
                return
            with self._lock:
                self._outbox_mem -= formed.nbytes
            self._start_flight(formed)

    def _start_flight(self, entry: Entry) -> None:
        if self._spill and entry.ref is None:
            self._spool.put(entry)  # on disk before it is on the wire
        self.ledger.sent(entry)
        self._send(entry)

    def _send(self, entry: Entry) -> bool:
        stream = self._stream
        if stream is None or entry.request is None:
            return False
        writer_id, sequence = self.ledger.stamp(entry)
        if entry.ref is not None:
            self._spool.restamp(entry.ref, writer_id, sequence)
        try:
            stream.send(entry.request)
        except TransportError as err:
            self._on_stream_end(err)
            return False
        except Exception as exc:
            self._on_stream_end(TransportError(grpc.StatusCode.UNKNOWN, repr(exc)))
            return False
        self._sent_on_stream += 1
        with self._lock:
            self.out.batches_sent += 1
        return True

    def _load(self, entry: Entry) -> bool:
        """Read a spooled batch back into memory to send it."""
        assert entry.ref is not None
        payload = self._spool.read(entry.ref)
        if payload is None:
            return False
        entry.request = pb.IngestRequest.FromString(payload)
        with self._lock:
            self._seq_mem += entry.nbytes
        return True

    def _form_batch(self) -> Entry | None:
        """Cut the next batch from the buffers and give it an ordinal. The
        columns are taken under the lock; the protobuf is built outside."""
        if self.buffers.raw:
            self.buffers.encode_pending()
        with self._lock:
            if self._drops_oldest:
                self._drop_over_bound()
            pieces, points, cost = self.buffers.take(self._batch_points, self._batch_bytes)
            if not pieces:
                self._rearm()
                return None
            ordinal = self.ledger.next_ordinal()
            self._seq_mem += cost
            self._outbox_mem += cost
            self._rearm()
        request = pb.IngestRequest(workspace=self._workspace)
        batch = request.batch
        batch.sent_time = wall_time()
        for piece in pieces:
            piece.add_to(batch)
        entry = Entry(ordinal, points, cost, request)
        self.ledger.stamp(entry)
        return entry

    def _form_all(self) -> None:
        while (entry := self._form_batch()) is not None:
            self._outbox.append(entry)
            if self._spill and self._spool.healthy():
                self._spool.put(entry)

    # ------------------------------------------------------------ outcomes

    def _on_ack(self, response: pb.IngestResponse) -> None:
        entry = self.ledger.acked(int(response.sequence))
        if entry is None:
            return  # an ack we no longer wait for (e.g. a late duplicate)
        self._stream_proven = True
        self._backoff.reset()
        self._failures.clear()
        if entry.ref is not None:
            self._spool.release(entry.ref)
        # A duplicate_batch ack carries the original commit's result: counted
        # here like any other, once (the entry is gone for any later ack).
        result = response.result
        o = self.out
        with self._cond:
            if entry.request is not None:
                self._seq_mem -= entry.nbytes
            o.points_acked += entry.points
            o.resolved_points += entry.points
            o.batches_acked += 1
            o.duplicates += result.duplicates
            if result.rejected:
                counts = {reason_name(c.reason): int(c.count) for c in result.reject_counts}
                o.record_rejections(
                    [Rejection.from_proto(p) for p in result.rejected_points],
                    int(result.rejected),
                    counts,
                    sole_series(entry.request),
                )
            self.ledger.resolve(entry.ordinal)
            self._rearm()
            self._cond.notify_all()

    def _on_stream_end(self, error: TransportError | None) -> None:
        stream, self._stream = self._stream, None
        self._to_resend.clear()
        self._stream_gen += 1  # ignore anything more from that stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        unacked = self.ledger.unacked
        if error is None and not unacked:
            self._reconnect_at = 0.0  # an idle stream ended: reopen on demand
            return
        if error is None:
            error = TransportError(grpc.StatusCode.UNAVAILABLE, "the service ended the stream")
        with self._lock:
            self.out.last_error = str(error)
        # Counted under the table's code: a stream a proxy reset (INTERNAL
        # "Stream removed ... RST_STREAM") is transport loss, as UNAVAILABLE.
        key = error.retry_code
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if error.code == grpc.StatusCode.ABORTED:
            if unacked and not error.retry_again(failures):
                # The service keeps seeing a gap we cannot fill: resend
                # what is unacknowledged under a fresh sequence space.
                self._failures.pop(key, None)
                self.ledger.new_id(self.ledger.oldest().ordinal - 1)
        elif error.retry_again(failures):
            pass  # reconnect after the backoff; resend the window
        elif unacked:
            self._failures.pop(key, None)
            if error.code in STREAM_WIDE_CODES:
                self._fail_unacked(error)
            else:
                self._refuse_oldest(error)
        else:
            with self._cond:
                self.out.note_once(
                    ("delivery", error.code),
                    DeliveryWarning,
                    f"steplog: cannot send to the service ({error}); retrying",
                )
                self._rearm()
        self._reconnect_at = monotonic() + self._backoff.next_delay(error.retry_after)

    def _refuse_oldest(self, error: TransportError) -> None:
        """The service refused the oldest batch in flight (the stream ends at
        the batch it refuses; those before it were acknowledged). Set it aside
        (spooled, in the default directory when none is set; dropped only
        when the spool cannot be written) and report it; the batches behind
        it were not committed, so they are resent under a new writer id whose
        sequence 1 is the next batch."""
        entry = self.ledger.pop_oldest()
        saved = self._spool.save([entry])  # the spool directory, or its default
        o = self.out
        with self._cond:
            self.ledger.new_id(entry.ordinal)
            if entry.request is not None:
                self._seq_mem -= entry.nbytes
            o.resolved_points += entry.points
            self.ledger.resolve(entry.ordinal, lost=True)
            o.refused += entry.points
            if saved:
                where = (
                    f"saved to {self._settings.resolved_spool_dir()} "
                    "(`steplog sync` sends it once the cause is fixed)"
                )
            else:
                o.dropped += entry.points
                where = f"dropped: the spool cannot be written ({o.last_error})"
            message = (
                f"steplog: the service refused a batch of {entry.points} points "
                f"({error.code.name}: {error.message}); it was {where}; the batches behind it "
                f"are sent under writer id {self.ledger.writer_id}"
            )
            o.report(message, error.code, entry.points, ("delivery", error.code))
            self._rearm()
            self._cond.notify_all()

    def _fail_unacked(self, error: TransportError) -> None:
        """The credentials were refused (steplog._retry.STREAM_WIDE_CODES): no
        batch in flight will be accepted as sent. Spool them if we can, else
        drop them; go on under a new id."""
        entries = self.ledger.pop_all()
        points = sum(e.points for e in entries)
        saved = self._spool.save(entries)  # the spool directory, or its default
        first_outbox = self._outbox[0].ordinal if self._outbox else None
        o = self.out
        with self._cond:
            self.ledger.new_id((first_outbox or self.ledger.ordinal + 1) - 1)
            for e in entries:
                if e.request is not None:
                    self._seq_mem -= e.nbytes
                o.resolved_points += e.points
                self.ledger.resolve(e.ordinal, lost=True)
            o.refused += points
            spooled = sum(e.points for e in saved)
            lost = points - spooled
            o.dropped += lost
            where = (
                f"saved {spooled} points to {self._settings.resolved_spool_dir()} "
                "(`steplog sync` sends them once the cause is fixed)"
                if spooled
                else f"dropped {lost} points (the spool cannot be written: {o.last_error})"
            )
            message = (
                f"steplog: the service refused batches ({error.code.name}: {error.message}); "
                f"{where}; later data is sent under writer id {self.ledger.writer_id}"
            )
            o.report(message, error.code, points, ("delivery", error.code))
            self._rearm()
            self._cond.notify_all()

    # ------------------------------------------------------- spill, offline

    def _write_offline(self, form: bool) -> None:
        """Offline: formed batches go to the spool and are done once written."""
        if self._outbox and not self._spool.healthy():
            return
        while True:
            if not self._outbox:
                formed = self._form_batch() if form else None
                if formed is None:
                    return
                self._outbox.append(formed)
            entry = self._outbox[0]
            if not self._spool.put(entry):
                return
            self._outbox.popleft()
            with self._cond:
                self._seq_mem -= entry.nbytes
                self._outbox_mem -= entry.nbytes
                self.out.resolved_points += entry.points
                entry.request = None
                self.ledger.resolve(entry.ordinal)
                self._rearm()
                self._cond.notify_all()

    def _maybe_spill(self, due: bool) -> None:
        """Move what cannot be sent now to disk. on_full="spool": every batch
        is on disk before it is sent, and buffered points are cut into
        batches (so written to disk) once they are due, whether or not they
        can be sent now; past half the bound the in-memory copies of what
        waits in the outbox are dropped. Any policy, after a log call waited
        max_block_s (`_spill_pending`): the same, at once. When the spool
        cannot be written and memory is over the bound, the oldest buffered
        points are dropped and counted (stats.dropped_unspooled)."""
        b = self.buffers
        with self._lock:
            over = self._spill_pending or (
                self._spill and b.buffered_bytes + self._outbox_mem >= self._spill_at
            )
        if not (over or (due and self._spill)):
            return
        healthy = self._spool.healthy()
        for entry in self._outbox:
            if not healthy:
                break
            if entry.request is None:
                continue
            healthy = self._spool.put(entry)
            if healthy and over:
                self._forget_request(entry)
        while healthy and (formed := self._form_batch()) is not None:
            self._outbox.append(formed)
            healthy = self._spool.put(formed)
            if healthy and over:
                self._forget_request(formed)
        with self._cond:
            if over and not healthy:
                excess = b.buffered_bytes + self._seq_mem - self._settings.max_buffered_bytes
                if excess > 0:
                    dropped = b.drop_bytes(excess)
                    self.out.dropped_unspooled += dropped
                    self.out.note_once(
                        ("spool-full",),
                        DroppedPointsWarning,
                        f"steplog: the memory bound is reached and the spool cannot be written "
                        f"({self.out.last_error}): dropped the {dropped} oldest buffered points; "
                        "later drops are counted in stats.dropped_unspooled",
                    )
            if self._overflow and not self._spill:
                # The bound filled faster than the service took data: spill
                # from half the bound, as on_full="spool" does, until the
                # backlog has drained (no log call waits again meanwhile).
                self._spill = self._spilling_after_overflow = True
            self._spill_pending = False
            self._overflow = False
            self._rearm()
            self._cond.notify_all()

    def _forget_request(self, entry: Entry) -> None:
        """The batch is on disk: free its memory (read back to send it)."""
        with self._cond:
            self._seq_mem -= entry.nbytes
            self._outbox_mem -= entry.nbytes
            entry.request = None
            self._cond.notify_all()

    def _shutdown(self) -> None:
        """The last round: end the stream; spool (or count as dropped) what
        was not delivered; release every waiter."""
        stream, self._stream = self._stream, None
        self._stream_gen += 1
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        self._form_all()
        if self._settings.offline:
            self._write_offline(False)
        pending = list(self.ledger.unacked.values()) + list(self._outbox)
        for e in self._outbox:  # never sent: stamp them as they would be
            if e.ref is not None:
                self._spool.restamp(e.ref, self.ledger.writer_id, self.ledger.sequence(e.ordinal))
        self.ledger.pop_all()
        points = sum(e.points for e in pending)
        saved = self._spool.save(pending) if pending else []  # the spool directory, or its default
        spooled = sum(e.points for e in saved)
        if self._spool.spool is not None:
            with contextlib.suppress(OSError):
                self._spool.spool.close()
        o = self.out
        with self._cond:
            self._outbox.clear()
            self._outbox_mem = 0
            self._seq_mem = 0
            for e in pending:
                o.resolved_points += e.points
                self.ledger.resolve(e.ordinal, lost=True)
            lost = points - spooled
            o.dropped += lost
            if points:
                where = (
                    f"{spooled} were saved to {self._settings.resolved_spool_dir()} "
                    "(send them with `steplog sync`)"
                    if spooled
                    else f"they were dropped (the spool cannot be written: {o.last_error})"
                )
                if lost and spooled:
                    where += f"; {lost} could not be saved"
                message = f"steplog: {points} points were not acknowledged before close; {where}"
                o.report(message, None, points, ("close",))
            self._cut_done = self._cut_requested
            self._cut_target = self.ledger.ordinal
            self._rearm()
            self._cond.notify_all()

    # ----------------------------------------------------------------- fork

    def after_fork_in_child(self, wake: Wake, start: Callable[[], None]) -> None:
        """The parent's buffers, batches, stream and spool stay the parent's."""
        FORK_GRAVEYARD.extend(o for o in (self._stream, self._spool.spool) if o is not None)
        if self._spool.spool is not None:
            FORK_GRAVEYARD.append(self._spool.spool.abandon())
        base = self.ledger.base_id
        self._wake = wake
        self._start = start
        self._init_state(f"{base[:96]}.p{os.getpid()}")
        self._needs_after_fork = True
