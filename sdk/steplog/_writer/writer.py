"""The client's background writer: `run.log()` never blocks, never loses a point.

Hot path. `log_scalar` appends to the columns of its series (keyed by run,
name, labels, numeric/text, stepped/unstepped) under a short lock: no I/O, no
protobuf. Rows, tables, evaluations and images are checked and copied, never
encoded, on the caller's thread (steplog._writer.items says how a kind hands
its item over). A call leaves the fast path only when a counter crosses a
threshold (a batch is full, the memory bound, news from the sender), see
`Lane.after_log`.

Streams and the one thread. A writer has two streams ("lanes",
steplog._writer.lane): the main one (scalars, rows, tables, evaluations) and
the image stream (`<writer id>.img`, its own sequence, window, spool file and
half the memory bound, created on the first image), so a slow or failing
object store never holds the other kinds behind images. ONE daemon thread,
`steplog-writer` (steplog._writer.sender), drives both: woken by one Event
(a full batch, the first point after a quiet spell, an acknowledgement, a
flush) or by the earliest timer of either stream (the flush interval, a
reconnect). Nothing it does waits on the network. The writers of a
process's `Run.new_stream` streams have no thread of their own: one shared
thread, `steplog-writer-streams` (sender.shared_sender), drives the lanes
of all of them, each visited once per round; closing one stops its lanes. For each stream it cuts
the buffers into `Batch`es (one RunSeries per series, columnar, within
max_batch_points and max_batch_bytes) and gives
each the writer id and the next sequence number when the batch is formed. It
forms batches only when it can send them (a stream is up and the in-flight
window, half the memory bound, has room) or is told to (flush, spill): points
that are not yet in a batch are the only ones the drop policy may drop.
Linger (`max_linger`, Nagle-like): while a batch of a stream is
unacknowledged, a batch due only by the flush interval waits for that ack
(cut the moment it arrives) up to `max_linger`, so a service that is behind
gets fewer, larger batches from many quiet streams; a stream with nothing
in flight sends every flush interval, and flush/close cut at once
(Lane._lingers says when it applies). A
sequenced batch is never dropped silently: the service requires contiguous
sequence numbers per writer.

Delivery. Each sent batch is kept until the IngestResponse with its sequence
arrives (at least once on the wire; the service stores exactly once). When the
stream fails with a retryable code (steplog._retry.RETRYABLE_CODES) the sender
reconnects after a jittered exponential backoff (at least the server's
RetryInfo) and resends every unacknowledged batch in order: the oldest first,
alone, as a probe, and the rest once it is acknowledged (an outage then costs
one batch per attempt, not the whole window). Acknowledgements
carry partial success: rejected points are counted, kept (`rejections()`),
warned about once per (series, reason), and raised as PointsRejectedError by
the next log/flush/close in strict mode. A `duplicate_batch` ack (the batch
was committed before, its ack lost) counts as acknowledged, and its result is
what that commit decided (the service keeps it for a writer's last batches):
each batch's result is counted once, from the first ack of it that arrives.

Errors follow the one retry table (steplog._retry): UNAVAILABLE and
DEADLINE_EXCEEDED are retried until close, and so is a stream that was lost
under the call (INTERNAL "Stream removed ... RST_STREAM", as a load balancer
reports a dead replica: steplog._retry.is_transport_loss); RESOURCE_EXHAUSTED
only with RetryInfo, never sooner than its delay; ABORTED (a gap) five times,
then the window goes on under a new writer id; an INTERNAL or UNKNOWN the
service sent three times. After that, or at once for any other code, the
service has refused the oldest batch in flight (the stream ends at the batch
it refuses): that batch alone is set aside, written to the spool (the spool
directory, or its default; fix the cause, then `steplog sync` it; dropped
only when the spool cannot be written), counted in `stats.refused` (and in
`stats.dropped` if it could not be saved), stored as `stats.last_error`,
warned about once per code (a DeliveryError at the next flush/close in
strict mode), and the next flush()/close() returns False; the batches behind
it were not committed and go on under a new writer id, so it holds nothing
back. UNAUTHENTICATED and PERMISSION_DENIED refuse every batch alike: the
whole window is set aside at once. A permanently broken token therefore
costs one warning and a stream of spooled batches, never a hang.

Memory bound, in bytes. `max_buffered_bytes` (STEPLOG_MAX_BUFFERED_BYTES,
256 MiB) counts what buffered points and in-memory batches hold: a numeric
point 16-24 bytes (its columns; a numeric series' preallocated open chunk
is not counted: 1.5 KiB, up to 96 KiB right after a burst, halved at each
quiet flush), a text value its characters + 56, a table,
image or evaluation message its encoded size + 200. At the bound: "wait"
waits for the sender to free room, at most `max_block_s` (0.5 s), then the
buffers spill to the spool and the call returns; "spool" keeps every batch
on disk from the moment it is formed until it is acknowledged (written
before it is sent; due points are cut into batches every flush interval
even while nothing can be sent), so `kill -9` loses at most the points of
the last flush interval; past half the bound the in-memory copies are
dropped and batches are read back from disk in order; it waits like "wait"
if the disk falls behind. "drop_oldest" drops the oldest buffered points,
counts them in `stats.dropped` and warns once. After a spill, memory may
reach twice the bound while the sender writes; past that, and whenever the
spool cannot be written, the oldest buffered points are dropped and counted
(`stats.dropped_unspooled`) so memory stays within twice the bound.

Offline (`offline=True`): batches go only to the spool (steplog._writer.spool, one
SQLite file per writer process), synced on flush and close; `replay_spool`
(`steplog sync`) sends them later in the order they were logged, any number
of times.

flush/close share one deadline; both are safe to call twice. close runs at
interpreter exit (`exit_timeout`). If close times out with data undelivered,
that data goes to the spool (the spool directory, or its default; a warning
names it), or is counted as dropped when the spool cannot be written; close
may overrun its timeout by up to one second to finish that. flush() and
close() return False after any point was refused or dropped since the last
one that returned. In a forked child the parent's data stays the
parent's: the child starts empty, with a new writer id, fresh locks and a
lazily started thread, and asks the transport to reconnect.

Layout: settings (WriterSettings), intake (the buffers and the hot path),
series (per-series columns), items (the hand-off of non-scalar kinds), wire
(the protobuf encoding, field numbers from the descriptors), ledger (pure
acknowledgement bookkeeping), outcomes (counters, warnings, errors), lane
(one stream's state machine), spooling + spool (the disk), replay (`steplog
sync`), transport (gRPC), sender (the one thread), writer (this facade).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from time import monotonic
from typing import Any

import numpy as np

from steplog import _lifecycle
from steplog._writer.items import Encodable
from steplog._writer.lane import Lane
from steplog._writer.outcomes import Notes, WriterStats, deliver, merge_stats
from steplog._writer.sender import Sender
from steplog._writer.series import NumericBuffer
from steplog._writer.settings import WriterSettings
from steplog._writer.transport import Labels, Rejection, Transport
from steplog.errors import SteplogError
from steplog.v1 import data_pb2

# close() may overrun its deadline by this much to spool undelivered data.
_STOP_GRACE = 1.0
_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ID_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.:-]")
IMAGES = "images"


def new_writer_id() -> str:
    host = _ID_UNSAFE_RE.sub("-", socket.gethostname())[:48] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


class BatchWriter:
    """Buffers points per series and delivers them from one background thread.

    `transport` is None only in offline mode. The caller owns the transport
    (and its channel): close() ends the writer's streams, not the channel.
    `sender`: a Sender shared with other writers (steplog._writer.sender.
    shared_sender, the streams of `Run.new_stream`) that drives this
    writer's lanes beside theirs; None: a thread of its own. Either way the
    writer's lanes, ids, sequences, buffers, bound, windows and spools are
    its own, and close() stops only them."""

    def __init__(
        self,
        transport: Transport | None,
        workspace: str,
        settings: WriterSettings,
        writer_id: str | None = None,
        sender: Sender | None = None,
    ) -> None:
        if transport is None and not settings.offline:
            raise ValueError("a transport is required unless settings.offline is true")
        if writer_id is not None and not _WRITER_ID_RE.match(writer_id):
            raise ValueError(
                f"writer_id must be 1..128 characters of [A-Za-z0-9_.:-]: {writer_id!r}"
            )
        self._transport = transport
        self._workspace = workspace
        self._settings = settings
        self._shared = sender is not None
        self._sender = sender or Sender()
        self._init_state(writer_id or new_writer_id())
        _lifecycle.register(self)

    def _init_state(self, writer_id: str) -> None:
        self._lock = threading.Lock()
        self._main = Lane(
            self._transport,
            self._workspace,
            self._settings,
            writer_id,
            self._sender.poker(),
            self._sender.start,
        )
        self._sender.add(self._main)
        self._image_lane: Lane | None = None
        self._close_result: bool | None = None

    def _images(self) -> Lane:
        """The image stream: its own writer id (`<id>.img`), stream, sequence
        and spool file, and half the memory bound; driven by the same thread."""
        lane = self._image_lane
        if lane is None:
            with self._lock:
                if self._image_lane is None:
                    s = self._settings
                    half = max(1024, s.max_buffered_bytes // 2)
                    lane = Lane(
                        self._transport,
                        self._workspace,
                        replace(s, max_buffered_bytes=half),
                        f"{self._main.ledger.base_id[:120]}.img",
                        self._sender.poker(),
                        self._sender.start,
                    )
                    if self._main.closed:
                        lane.request_stop()
                    self._sender.add(lane)
                    self._image_lane = lane
                lane = self._image_lane
        return lane

    def _lanes(self) -> list[Lane]:
        lane = self._image_lane
        return [self._main] if lane is None else [self._main, lane]

    # ------------------------------------------------------------ properties

    @property
    def writer_id(self) -> str:
        return self._main.writer_id

    @property
    def settings(self) -> WriterSettings:
        return self._settings

    @property
    def thread(self) -> threading.Thread | None:
        """The background thread that drives this writer (None until
        something is logged; on a shared sender, the thread of every writer
        on it, None again once the last of them is closed)."""
        return self._sender.thread

    @property
    def stats(self) -> WriterStats:
        """Counters of both streams, summed (image_stats: the image stream's)."""
        lane = self._image_lane
        mine = self._main.stats()
        return mine if lane is None else merge_stats(mine, lane.stats())

    @property
    def image_stats(self) -> WriterStats | None:
        """The counters of the image stream alone (None before the first image)."""
        lane = self._image_lane
        return None if lane is None else lane.stats()

    def rejections(self) -> list[Rejection]:
        """Every rejected point the service described (the last 10,000 of
        each stream)."""
        return [r for lane in self._lanes() for r in lane.rejections()]

    # --------------------------------------------------------------- logging

    def log_scalar(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        value: float | str,
        step: int | None,
        time: float,
        description: str = "",
        out_of_order: bool = False,
    ) -> None:
        """Append one point; returns at once (the module docstring says the
        only case in which it waits). A value of the wrong type raises here."""
        lane = self._main
        cost = lane.buffers.log_scalar(
            run_id, name, labels, value, step, time, description, out_of_order
        )
        if cost is not None:
            self._slow_path(lane, cost)

    def hot_table(self, run_id: str, labels: Labels) -> dict[str, NumericBuffer]:
        """The main stream's {name: series} of this run's stepped numeric
        series with these labels: `Run.log` writes a point with the series'
        `log` and calls `after_hot` with what it returns, the same as
        log_scalar without the key (steplog._writer.intake)."""
        return self._main.buffers.hot_table(run_id, labels)

    def hot_rows(
        self, run_id: str, labels: Labels
    ) -> dict[str, Callable[[Mapping[str, Any], float, str], int | None]]:
        """The main stream's {table: append(row, time, description)} of this
        run's tables with these labels: `Run.log_row`'s hot path, the same as
        log_row without the key; `after_hot` with what it returns."""
        return self._main.buffers.hot_rows(run_id, labels)

    def after_hot(self, cost: int) -> None:
        """A hot-path point crossed a threshold: the slow path, as log_scalar's."""
        self._slow_path(self._main, cost)

    def log_scalars(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        values: Sequence[float] | Sequence[str] | np.ndarray[Any, Any],
        steps: Sequence[int] | np.ndarray[Any, Any] | None = None,
        times: Sequence[float] | np.ndarray[Any, Any] | None = None,
        description: str = "",
        out_of_order: bool = False,
    ) -> None:
        """Append many points of one series at once (`log_list`, bulk logging).
        `times` None: all get the current time. Columns are converted before
        anything is appended, so a bad value leaves the series untouched."""
        lane = self._main
        cost = lane.buffers.log_scalars(
            run_id, name, labels, values, steps, times, description, out_of_order
        )
        if cost is not None:
            self._slow_path(lane, cost)

    def log_series(self, run_id: str, series: data_pb2.SeriesData) -> None:
        """Append a pre-built SeriesData: sent whole, in order with the other
        messages of its series. ValueError when it cannot fit in any batch."""
        lane = self._images() if series.WhichOneof("points") == IMAGES else self._main
        cost = lane.buffers.log_series(run_id, series)
        if cost is not None:
            self._slow_path(lane, cost)

    def log_row(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        row: Mapping[str, Any],
        time: float,
        description: str = "",
    ) -> None:
        """Append one table row ({column: cell}, None a missing cell). Its
        cells are checked here (the error names the column) and its values
        appended to the series' open RowsItem; the sender encodes the rows."""
        lane = self._main
        cost = lane.buffers.log_row(run_id, name, labels, row, time, description)
        if cost is not None:
            self._slow_path(lane, cost)

    def log_item(
        self, run_id: str, name: str, labels: Labels, kind: str, item: Encodable, bound: int = 0
    ) -> None:
        """Append an item a log call built by checking and copying values (a
        table's columns, an evaluation document, an image, ...): `kind` is
        the SeriesData points field; the sender encodes it. `bound`: an upper
        bound of the encoded size; ValueError when that cannot fit in any
        batch. The contract is in steplog._writer.items."""
        lane = self._images() if kind == IMAGES else self._main
        cost = lane.buffers.log_item(run_id, name, labels, kind, item, bound)
        if cost is not None:
            self._slow_path(lane, cost)

    def log_table_rows(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        rows: Mapping[str, Sequence[Any]],
        steps: Sequence[int] | None = None,
        times: Sequence[float] | None = None,
        description: str = "",
    ) -> None:
        """Append table rows given as columns ({"col": [v1, v2, ...]});
        copied here, encoded (and split by rows to fit a batch) by the sender."""
        lane = self._main
        cost = lane.buffers.log_table_rows(run_id, name, labels, rows, steps, times, description)
        if cost is not None:
            self._slow_path(lane, cost)

    @staticmethod
    def _slow_path(lane: Lane, added: int) -> None:
        """A log call crossed a threshold: the lane applies the memory bound
        and hands back the sender's news, delivered here (at the user's line)."""
        deliver(lane.after_log(added), stacklevel=4)

    # ----------------------------------------------------------- flush/close

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point logged before this call is acknowledged by
        the service (offline: written to the spool and fsynced), on both
        streams within one deadline. False on timeout, if some of those
        points could not be delivered, or if any point was refused or dropped
        since the last flush()/close() (so a loss is never followed by True
        without a False in between). In strict mode, raises what the sender
        recorded (rejections, delivery errors)."""
        deadline = None if timeout is None else monotonic() + timeout
        ok = True
        for lane in self._lanes():
            ok = lane.flush_until(deadline) and ok
        ok, notes = self._take_news(ok)
        self._deliver(notes)
        return ok

    def _take_news(self, ok: bool) -> tuple[bool, list[Notes]]:
        """Every lane's losses (folded into `ok`) and pending news."""
        taken: list[Notes] = []
        for lane in self._lanes():
            clean, notes = lane.take_news()
            ok = clean and ok
            if notes is not None:
                taken.append(notes)
        return ok, taken

    @staticmethod
    def _deliver(taken: list[Notes]) -> None:
        """Warn about everything; raise the first strict-mode error."""
        error: SteplogError | None = None
        for notes in taken:
            error = error or notes.error
            notes.error = None
            deliver(notes, stacklevel=4)
        if error is not None:
            raise error

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; flush and stop share one deadline.
        Safe to call twice (the second call returns the first's result).
        Undelivered data at the deadline goes to the spool when one is
        configured. Returns whether everything was delivered."""
        deadline = None if timeout is None else monotonic() + timeout
        with self._lock:
            if self._close_result is not None:
                return self._close_result
        ok = True
        for lane in self._lanes():
            ok = lane.flush_until(deadline) and ok
        with self._lock:
            lanes = self._lanes()
            for lane in lanes:
                lane.request_stop()
        remaining = None if deadline is None else max(0.0, deadline - monotonic())
        wait = None if remaining is None else remaining + _STOP_GRACE
        if self._shared:  # the thread goes on with the other writers' lanes
            self._sender.start()  # runs their last round even if nothing was logged
            end = None if wait is None else monotonic() + wait
            for lane in lanes:
                lane.wait_finished(None if end is None else max(0.0, end - monotonic()))
        else:
            self._sender.join(wait)
        ok, notes = self._take_news(ok)
        ok = ok and all(lane.delivered_all() for lane in lanes)
        with self._lock:
            self._close_result = ok
        _lifecycle.unregister(self)
        self._deliver(notes)
        return ok

    def record_operation(self, kind: str, payload: bytes, timeout: float | None = None) -> bool:
        """Offline: store a run operation (steplog._writer.spool.RUN_OPERATIONS,
        the serialized RunService request) in the spool, after every point
        logged before this call, so `steplog sync` applies it in that order.
        False if those points could not all be written first (the operation
        is stored all the same). Raises OSError when the spool cannot be written."""
        if not self._settings.offline:
            raise RuntimeError("record_operation is for offline writers")
        ok = self.flush(timeout)
        self._main.record_operation(kind, payload)
        return ok

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self._settings.exit_timeout)

    # -------------------------------------------------------------- lifecycle

    def close_at_exit(self, timeout: float) -> None:
        """steplog._lifecycle: close within what is left of the exit deadline."""
        self.close(min(timeout, self._settings.exit_timeout))

    def after_fork_in_child(self) -> None:
        """The parent's buffers, batches, streams and spools stay the
        parent's: the child starts empty, with a new writer id, fresh locks
        and a lazily started thread."""
        self._lock = threading.Lock()
        self._sender.after_fork_in_child()
        for lane in self._lanes():
            lane.buffers.forget_hot()  # a Run holding the parent's table falls back
            lane.after_fork_in_child(self._sender.poker(), self._sender.start)
            self._sender.add(lane)
