"""The client's background writer: `run.log()` never blocks, never loses a point.

Hot path. `log_scalar` appends to the columns of its series (keyed by run,
name, labels, numeric/text, stepped/unstepped) under a short lock: no I/O, no
protobuf. It leaves the fast path only when a counter crosses a threshold
(a batch is full, the memory bound, news from the sender), see `_after_log`.

Sender. One daemon thread, woken by an Event (a full batch, the first point
after a quiet spell, an acknowledgement, a flush) or by its own timer (the
flush interval, a reconnect). It cuts the buffers into `Batch`es (one RunSeries
per series, columnar, within max_batch_points and max_batch_bytes) and gives
each the writer id and the next sequence number when the batch is formed. It
forms batches only when it can send them (a stream is up and the in-flight
window, half the memory bound, has room) or is told to (flush, spill): points
that are not yet in a batch are the only ones the drop policy may drop. A
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
point 16-24 bytes (its columns), a text value its characters + 56, a table,
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

Offline (`offline=True`): batches go only to the spool (steplog._spool, one
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
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import socket
import sys
import threading
import warnings
import weakref
from array import array
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from time import monotonic
from time import time as wall_time
from typing import Any, Literal, cast, get_args

import grpc
import numpy as np

from steplog._buffers import (
    SERIES_OVERHEAD,
    Buffer,
    Encodable,
    MessageBuffer,
    Piece,
    ScalarBuffer,
    series_points,
    text_chars,
)
from steplog._retry import STREAM_WIDE_CODES
from steplog._spool import ReplayReport, SpoolRef, SpoolWriter, replay_spool
from steplog._tables import RowsItem, check_row_names, row_cost, table_item
from steplog._transport import (
    Backoff,
    GrpcTransport,
    IngestStream,
    Labels,
    Rejection,
    Transport,
    TransportError,
    reason_name,
)
from steplog.errors import SteplogError
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

__all__ = [
    "BatchWriter",
    "DeliveryError",
    "DeliveryWarning",
    "DroppedPointsWarning",
    "GrpcTransport",
    "IngestStream",
    "PointsRejectedError",
    "RejectedPointsWarning",
    "Rejection",
    "ReplayReport",
    "SteplogWarning",
    "Transport",
    "TransportError",
    "WriterSettings",
    "WriterStats",
    "default_spool_dir",
    "replay_spool",
]

OnFull = Literal["wait", "spool", "drop_oldest"]

# At most this many batches in flight, whatever their size.
MAX_INFLIGHT_BATCHES = 32
# Writer id, sequence, sent_time, workspace and framing of one IngestRequest.
_BATCH_HEADER_BYTES = 200
_REJECTIONS_KEPT = 10_000
# A stepped numeric point in memory (time, step, value columns).
_POINT_BYTES = 24
# close() may overrun its deadline by this much to spool undelivered data.
_STOP_GRACE = 1.0
_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ID_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.:-]")
_BYTE_SUFFIXES = (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("B", 1))
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SteplogWarning(UserWarning):
    """Base of the writer's warnings."""


class RejectedPointsWarning(SteplogWarning):
    """The service rejected points (warned once per series and reason)."""


class DroppedPointsWarning(SteplogWarning):
    """Points were dropped on the client: the memory bound, or logged after close."""


class DeliveryWarning(SteplogWarning):
    """Batches could not be delivered (a non-retryable error, or a close timeout)."""


class PointsRejectedError(SteplogError):
    """Strict mode: the service rejected points logged earlier."""

    def __init__(self, rejections: Sequence[Rejection], count: int) -> None:
        self.rejections = tuple(rejections)
        self.count = count
        first = rejections[0] if rejections else None
        detail = f"; first: {_describe(first)}" if first else ""
        super().__init__(f"the service rejected {count} points{detail}")


class DeliveryError(SteplogError):
    """Strict mode: batches were refused with a non-retryable status, or were
    still undelivered when close() timed out."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, points: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.points = points


def _describe(r: Rejection) -> str:
    labels = ",".join(f"{k}={v}" for k, v in r.labels)
    at = "" if r.step is None else f" at step {r.step}"
    series = f"{r.name}{{{labels}}}" if labels else r.name
    return f"{series} of run {r.run_id}{at}: {r.reason} ({r.message})"


def default_spool_dir() -> Path:
    """Where spools go when no directory is given: $XDG_CACHE_HOME/steplog/spool."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "steplog" / "spool"


@dataclass(frozen=True)
class WriterSettings:
    """How the background writer buffers, batches and retries.

    `flush_interval`: seconds a point may wait before its batch is sent.
    `spool_dir` (default_spool_dir() when None): the spool of on_full="spool"
    and offline, and where refused batches and what close() could not
    deliver go.
    `exit_timeout`: the close() timeout used at interpreter exit."""

    # The memory bound: bytes of buffered and unacknowledged data in memory
    # (a numeric point 16-24 bytes, a text value its length + 56, a table,
    # image or evaluation its encoded size + 200).
    max_buffered_bytes: int = 256 * 1024 * 1024
    on_full: OnFull = "wait"
    spool_dir: Path | None = None
    offline: bool = False
    max_batch_points: int = 50_000
    # Above the service's default image limit (16 MiB), below its message limit (64 MiB).
    max_batch_bytes: int = 20 * 1024 * 1024
    flush_interval: float = 0.2
    # The longest a log call waits for room (on_full wait or spool) before the
    # buffered data is spilled to the spool and the call returns.
    max_block_s: float = 0.5
    strict: bool = False
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    exit_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch_points < 1:
            raise ValueError("max_batch_points must be at least 1")
        if self.max_buffered_bytes < 1024:
            raise ValueError("max_buffered_bytes must be at least 1024")
        if self.max_batch_bytes < 4 * 1024:
            raise ValueError("max_batch_bytes must be at least 4096")
        if self.on_full not in get_args(OnFull):
            raise ValueError(f"on_full must be one of {get_args(OnFull)}, not {self.on_full!r}")
        for name in (
            "flush_interval",
            "max_block_s",
            "backoff_initial",
            "backoff_max",
            "exit_timeout",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if self.spool_dir is not None and not isinstance(self.spool_dir, Path):
            object.__setattr__(self, "spool_dir", Path(self.spool_dir))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WriterSettings:
        """Arguments first, then STEPLOG_<FIELD> variables (STEPLOG_ON_FULL,
        STEPLOG_SPOOL_DIR, ...), then defaults. A bad value names its variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
                continue
            var = f"STEPLOG_{f.name.upper()}"
            raw = env.get(var)
            if raw is None:
                continue
            try:
                values[f.name] = _parse_setting(f.name, raw.strip())
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: {exc}") from None
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown writer settings: {sorted(unknown)}")
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"steplog writer settings: {exc}") from None

    def resolved_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else default_spool_dir()


def _parse_setting(name: str, raw: str) -> Any:
    default = WriterSettings.__dataclass_fields__[name].default
    if name == "spool_dir":
        return Path(raw).expanduser() if raw else None
    if name == "on_full":
        if raw not in get_args(OnFull):
            raise ValueError(f"expected one of {', '.join(get_args(OnFull))}")
        return raw
    if isinstance(default, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        text = raw.replace("_", "")
        for suffix, factor in _BYTE_SUFFIXES:
            if name.endswith("_bytes") and text.endswith(suffix):
                return int(float(text.removesuffix(suffix)) * factor)
        return int(text)
    return float(raw)


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of the writer's counters (points unless named batches)."""

    points_logged: int = 0
    points_acked: int = 0
    duplicates: int = 0
    rejected: int = 0
    dropped: int = 0
    dropped_unspooled: int = 0
    blocked_calls: int = 0
    refused: int = 0
    spooled: int = 0
    batches_sent: int = 0
    batches_acked: int = 0
    reconnects: int = 0
    points_buffered: int = 0
    bytes_in_memory: int = 0  # buffered + sequenced batches held in memory
    points_unacked: int = 0
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    last_error: str | None = None
    writer_id: str = ""


@dataclass(slots=True, eq=False)
class _Entry:
    """One sequenced batch: in memory (`request`), on disk (`ref`), or both."""

    ordinal: int
    points: int
    nbytes: int  # what it holds in memory while `request` is set
    request: pb.IngestRequest | None
    ref: SpoolRef | None = None


class _Notes:
    """What the sender has to tell the user, delivered on the user's thread by
    the next log/flush/close (so warnings point at user code, and strict mode
    raises there)."""

    __slots__ = ("error", "warnings")

    def __init__(self) -> None:
        self.warnings: list[tuple[type[Warning], str]] = []
        self.error: SteplogError | None = None

    def __bool__(self) -> bool:
        return bool(self.warnings) or self.error is not None


_ACK = 0
_END = 1
_LIVE: weakref.WeakSet[BatchWriter] = weakref.WeakSet()
# In a forked child, the parent's stream and call objects are kept referenced
# forever: their finalizers must not run (they would act on the parent's socket).
_FORK_GRAVEYARD: list[object] = []


def _new_writer_id() -> str:
    host = _ID_UNSAFE_RE.sub("-", socket.gethostname())[:48] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


class BatchWriter:
    """Buffers points per series and delivers them from one background thread.

    `transport` is None only in offline mode. The caller owns the transport
    (and its channel): close() ends the writer's stream, not the channel."""

    def __init__(
        self,
        transport: Transport | None,
        workspace: str,
        settings: WriterSettings,
        writer_id: str | None = None,
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
        s = settings
        # Smaller batches for a small bound, so the window and the spill
        # watermark (half the bound each) hold whole batches of scalars.
        bound = s.max_buffered_bytes
        self._batch_points = max(1, min(s.max_batch_points, bound // (4 * _POINT_BYTES)))
        self._batch_bytes = s.max_batch_bytes - _BATCH_HEADER_BYTES - len(workspace.encode())
        self._window_bytes = bound // 2  # in flight (at least one batch)
        self._spill = s.on_full == "spool" and not s.offline
        self._spill_at = max(1, bound // 2)
        # Rows, tables, evaluations are encoded into messages of at most this
        # size (split by rows), so a batch holds more than one.
        self._message_bytes = max(4096, self._batch_bytes // 2)
        # Images travel on a stream of their own (a second writer, created on
        # the first image), so a slow or failing object store never holds
        # scalars, tables and evaluations behind them.
        self._image_writer: BatchWriter | None = None
        self._image_stream = False
        self._init_state(writer_id or _new_writer_id())
        _LIVE.add(self)

    # ------------------------------------------------------------------ state

    def _init_state(self, writer_id: str) -> None:
        """Everything a forked child must not share with its parent."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._base_id = writer_id
        self._writer_id = writer_id
        self._id_generation = 0
        # Buffers (lock). _dirty: buffers with points, oldest first.
        self._scalars: dict[tuple[str, str, Labels, bool, bool], ScalarBuffer] = {}
        self._messages: dict[tuple[str, str, Labels, str | None], MessageBuffer] = {}
        self._dirty: dict[Buffer, None] = {}
        # Message buffers holding items not yet encoded (the sender encodes them).
        self._raw: dict[MessageBuffer, None] = {}
        self._buffered = 0
        self._buffered_bytes = 0  # what the buffered points cost in memory (lock)
        self._mem_check_at = 0
        self._oldest: float | None = None
        self._check_at = self._batch_points
        self._wake_pending = False
        self._spill_pending = False
        # A log call waited max_block_s: later calls do not wait until the
        # sender has spilled (lock).
        self._overflow = False
        self._spilling_after_overflow = False
        # Sequenced batches. Ordinals count batches for the writer's lifetime;
        # the wire sequence is ordinal - _epoch_base (a new id starts a new epoch).
        self._ordinal = 0
        self._epoch_base = 0
        self._seq_mem = 0  # bytes of in-memory sequenced batches (lock)
        self._outbox: deque[_Entry] = deque()  # formed, not yet sent (sender)
        self._outbox_mem = 0  # bytes of in-memory batches in the outbox (lock)
        self._unacked: dict[int, _Entry] = {}  # sent, by ordinal (sender)
        self._inflight_bytes = 0  # of the batches in flight (sender)
        self._done_through = 0  # every ordinal <= this is acked or resolved (lock)
        self._done_above: set[int] = set()
        self._lost: deque[int] = deque(maxlen=100_000)  # ordinals resolved without ack
        # Flush handshake (lock).
        self._cut_requested = 0
        self._cut_done = 0
        self._cut_target = 0
        self._stop = False
        self._closed = False
        self._close_result: bool | None = None
        self._sender_failed: BaseException | None = None
        # Stream (sender).
        self._events: deque[tuple[int, int, Any]] = deque()
        self._stream: IngestStream | None = None
        self._stream_gen = 0
        self._reconnect_at = 0.0
        self._ever_connected = False
        self._stream_proven = False  # an ack arrived on the current stream
        self._sent_on_stream = 0
        self._to_resend: deque[_Entry] = deque()  # unacked, not yet resent on this stream
        # Consecutive stream failures per code since the last ack (steplog._retry).
        self._failures: dict[grpc.StatusCode, int] = {}
        self._needs_after_fork = False
        self._backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        self._spool: SpoolWriter | None = None
        self._spool_retry_at = 0.0
        # Outcomes (lock).
        self._notes = _Notes()
        self._rejections: deque[Rejection] = deque(maxlen=_REJECTIONS_KEPT)
        self._pending_rejections: list[Rejection] = []
        self._pending_rejected = 0
        self._warned: set[tuple[Any, ...]] = set()
        self._drained = 0  # points moved from buffers into batches
        self._resolved_points = 0  # of those: acked, spooled offline, lost, rejected
        self._dropped_buffered = 0  # dropped before they were in a batch
        self._points_acked = 0
        self._duplicates = 0
        self._rejected = 0
        self._rejected_by_reason: dict[str, int] = {}
        self._dropped = 0
        self._dropped_unspooled = 0  # of those: over the bound, the spool unwritable
        self._blocked = 0  # log calls that waited the whole max_block_s
        self._refused = 0  # points in batches the service refused whole
        self._losses_reported = 0  # refused + dropped when flush/close last said so
        self._spooled = 0
        self._batches_sent = 0
        self._batches_acked = 0
        self._reconnects = 0
        self._last_error: str | None = None

    @property
    def writer_id(self) -> str:
        return self._writer_id

    @property
    def settings(self) -> WriterSettings:
        return self._settings

    @property
    def stats(self) -> WriterStats:
        """Counters of this writer and its image stream, summed (see image_stats)."""
        child = self._image_writer
        mine = self._own_stats()
        return mine if child is None else _merge_stats(mine, child.stats)

    def _own_stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(
                points_logged=self._buffered + self._drained + self._dropped_buffered,
                points_acked=self._points_acked,
                duplicates=self._duplicates,
                rejected=self._rejected,
                dropped=self._dropped,
                dropped_unspooled=self._dropped_unspooled,
                blocked_calls=self._blocked,
                refused=self._refused,
                spooled=self._spooled,
                batches_sent=self._batches_sent,
                batches_acked=self._batches_acked,
                reconnects=self._reconnects,
                points_buffered=self._buffered,
                bytes_in_memory=self._buffered_bytes + self._seq_mem,
                points_unacked=self._drained - self._resolved_points,
                rejected_by_reason=dict(self._rejected_by_reason),
                last_error=self._last_error,
                writer_id=self._writer_id,
            )

    @property
    def image_stats(self) -> WriterStats | None:
        """The counters of the image stream alone (None before the first image)."""
        child = self._image_writer
        return None if child is None else child.stats

    def rejections(self) -> list[Rejection]:
        """Every rejected point the service described (the last 10,000 of
        each stream)."""
        with self._lock:
            mine = list(self._rejections)
        child = self._image_writer
        return mine if child is None else mine + child.rejections()

    # --------------------------------------------------------------- hot path

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
        """Append one point; returns at once (see the module docstring for the
        only case in which it waits). A value of the wrong type raises here."""
        key = (run_id, name, labels, isinstance(value, str), step is not None)
        with self._lock:
            buf = self._scalars.get(key)
            if buf is None:
                buf = self._new_scalar_series(key, description, out_of_order)
            values = buf.values
            if not values:
                if not self._dirty:
                    self._oldest = monotonic()
                    self._wake.set()
                self._dirty[buf] = None
            try:
                values.append(value)
                buf.times.append(time)
                if step is not None:
                    buf.steps.append(step)
            except BaseException:
                buf.repair()
                raise
            cost = buf.point_cost
            if buf.text:
                chars = text_chars(cast(str, value))
                buf.text_cost += chars
                cost += chars
            self._buffered += 1
            self._buffered_bytes += cost
            if self._buffered < self._check_at and self._buffered_bytes < self._mem_check_at:
                return
        self._after_log(cost)

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
        n = len(values)
        if n == 0:
            return
        if steps is not None and len(steps) != n:
            raise ValueError(f"{len(steps)} steps for {n} values")
        if times is not None and len(times) != n:
            raise ValueError(f"{len(times)} times for {n} values")
        text = isinstance(values[0], str)
        col_values: list[str] | array[float]
        if text:
            col_values = list(cast(Sequence[str], values))
            if not all(isinstance(v, str) for v in col_values):
                raise TypeError(f"series {name!r}: values mix text and numbers")
        else:
            col_values = _float_column(values)
        col_times = _float_column(times) if times is not None else array("d", [wall_time()]) * n
        col_steps = _int_column(steps) if steps is not None else None
        key = (run_id, name, labels, text, steps is not None)
        with self._lock:
            sbuf = self._scalars.get(key)
            if sbuf is None:
                sbuf = self._new_scalar_series(key, description, out_of_order)
            if not sbuf.values:
                if not self._dirty:
                    self._oldest = monotonic()
                    self._wake.set()
                self._dirty[sbuf] = None
            sbuf.values.extend(col_values)
            sbuf.times.extend(col_times)
            if col_steps is not None:
                sbuf.steps.extend(col_steps)
            cost = n * sbuf.point_cost
            if text:
                chars = sum(text_chars(v) for v in cast(list[str], col_values))
                sbuf.text_cost += chars
                cost += chars
            self._buffered += n
            self._buffered_bytes += cost
            if self._buffered < self._check_at and self._buffered_bytes < self._mem_check_at:
                return
        self._after_log(cost)

    def log_series(self, run_id: str, series: data_pb2.SeriesData) -> None:
        """Append a pre-built SeriesData (table rows, images, evaluations...):
        it is sent whole, in order with the other messages of its series, and
        shares the sequencing, ack, retry and spool machinery. Raises
        ValueError when it cannot fit in any batch."""
        if not self._image_stream and series.WhichOneof("points") == "images":
            self._images().log_series(run_id, series)
            return
        points = series_points(series)
        size = series.ByteSize()
        if size + SERIES_OVERHEAD + len(run_id.encode()) > self._batch_bytes:
            raise ValueError(
                f"series {series.name!r}: {size} bytes do not fit in a batch "
                f"(max_batch_bytes={self._settings.max_batch_bytes})"
            )
        labels = tuple(sorted(series.labels.items()))
        key = (run_id, series.name, labels, series.WhichOneof("points"))
        with self._lock:
            mbuf = self._messages.get(key)
            if mbuf is None:
                mbuf = self._messages[key] = MessageBuffer(run_id, series.name, labels)
                self._ensure_started()
            if not mbuf.points:
                if not self._dirty:
                    self._oldest = monotonic()
                    self._wake.set()
                self._dirty[mbuf] = None
            cost = mbuf.append(series, points, size)
            if mbuf.raw:
                self._raw[mbuf] = None
            self._buffered += points
            self._buffered_bytes += cost
            if self._buffered < self._check_at and self._buffered_bytes < self._mem_check_at:
                return
        self._after_log(cost)

    def _images(self) -> BatchWriter:
        """The image stream: its own writer id (`<id>.img`), stream, sequence
        and spool file, and half the memory bound."""
        child = self._image_writer
        if child is None:
            with self._lock:
                if self._image_writer is None:
                    s = self._settings
                    half = max(1024, s.max_buffered_bytes // 2)
                    child = BatchWriter(
                        self._transport,
                        self._workspace,
                        replace(s, max_buffered_bytes=half),
                        writer_id=f"{self._base_id[:120]}.img",
                    )
                    child._image_stream = True
                    self._image_writer = child
                child = self._image_writer
        return child

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
        cost = row_cost(name, row)
        names = tuple(row)
        key = (run_id, name, labels, "table")
        with self._lock:
            mbuf = self._messages.get(key)
            if mbuf is None:
                mbuf = self._new_message_series(key)
            rows: RowsItem | None = mbuf.open
            if rows is None or names != rows.names:
                check_row_names(name, names)
            if not mbuf.points:
                if not self._dirty:
                    self._oldest = monotonic()
                    self._wake.set()
                self._dirty[mbuf] = None
            if rows is None:
                rows = RowsItem(description)
                mbuf.add_raw(rows)
                mbuf.open = rows
                self._raw[mbuf] = None
            if rows.add(names, row.values(), time, cost):
                mbuf.open = None  # full: the next row starts the next message
            mbuf.points += 1
            mbuf.cost += cost
            self._buffered += 1
            self._buffered_bytes += cost
            if self._buffered < self._check_at and self._buffered_bytes < self._mem_check_at:
                return
        self._after_log(cost)

    def log_item(
        self, run_id: str, name: str, labels: Labels, kind: str, item: Encodable, bound: int = 0
    ) -> None:
        """Append values a log call copied (a table's columns, an evaluation
        document, an image: `kind` is the SeriesData points field); the
        sender encodes them. `bound`: an upper bound of the encoded size;
        ValueError when that cannot fit in any batch."""
        if kind == "images" and not self._image_stream:
            self._images().log_item(run_id, name, labels, kind, item, bound)
            return
        if bound and bound + SERIES_OVERHEAD + len(run_id.encode()) > self._batch_bytes:
            raise ValueError(
                f"series {name!r}: {bound} bytes do not fit in a batch "
                f"(max_batch_bytes={self._settings.max_batch_bytes})"
            )
        key = (run_id, name, labels, kind)
        with self._lock:
            mbuf = self._messages.get(key)
            if mbuf is None:
                mbuf = self._new_message_series(key)
            if not mbuf.points:
                if not self._dirty:
                    self._oldest = monotonic()
                    self._wake.set()
                self._dirty[mbuf] = None
            mbuf.add_raw(item)
            self._raw[mbuf] = None
            cost = item.cost
            self._buffered += item.points
            self._buffered_bytes += cost
            if self._buffered < self._check_at and self._buffered_bytes < self._mem_check_at:
                return
        self._after_log(cost)

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
        item = table_item(name, rows, description, steps, wall_time())
        if times is not None:
            if len(times) != item.points:
                raise ValueError(f"{len(times)} times for {item.points} rows")
            item.times = [float(t) for t in times]
        if item.points:
            self.log_item(run_id, name, labels, "table", item)

    def _new_message_series(self, key: tuple[str, str, Labels, str | None]) -> MessageBuffer:
        """First message of a series in this writer (lock held)."""
        mbuf = self._messages[key] = MessageBuffer(key[0], key[1], key[2])
        self._ensure_started()
        return mbuf

    def _new_scalar_series(
        self, key: tuple[str, str, Labels, bool, bool], description: str, out_of_order: bool
    ) -> ScalarBuffer:
        """First point of a series in this writer (lock held)."""
        run_id, name, labels, text, stepped = key
        buf = ScalarBuffer(run_id, name, labels, text, stepped, description, out_of_order)
        self._scalars[key] = buf
        self._ensure_started()
        return buf

    def _after_log(self, added: int) -> None:
        """The slow path of logging: wake the sender, apply the memory bound,
        deliver the sender's news (warnings, strict errors). `added`: the
        bytes the call added."""
        with self._cond:
            if self._closed:
                dropped = self._drop_buffered(self._buffered)
                self._note_once(
                    ("closed",),
                    DroppedPointsWarning,
                    f"steplog writer is closed: {dropped} points logged after close were dropped",
                )
            else:
                self._ensure_started()
                if self._buffered >= self._batch_points and not self._wake_pending:
                    self._wake_pending = True
                    self._wake.set()
                if (
                    self._spill
                    and not self._spill_pending
                    and self._buffered_bytes + self._outbox_mem >= self._spill_at
                ):
                    self._spill_pending = True
                    self._wake.set()
                self._apply_bound(added)
            self._rearm()
            notes = self._take_notes()
        self._deliver(notes, stacklevel=4)

    def _apply_bound(self, added: int) -> None:
        s = self._settings
        over = self._buffered_bytes + self._seq_mem - s.max_buffered_bytes
        if over <= 0:
            return
        if s.on_full == "drop_oldest" or self._sender_failed is not None:
            # In chunks of 1% of the bound, so the next calls stay on the fast path.
            dropped = self._drop_buffered_bytes(max(over, s.max_buffered_bytes // 100))
            if dropped:
                self._note_once(
                    ("drop_oldest",),
                    DroppedPointsWarning,
                    f"steplog: {s.max_buffered_bytes} bytes are buffered; dropping the "
                    f"oldest points (on_full='drop_oldest'); see stats.dropped",
                )
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
            self._buffered_bytes + self._seq_mem > allowance
            and not self._closed
            and self._sender_failed is None
        ):
            remaining = deadline - monotonic()
            if remaining <= 0:
                self._blocked += 1
                if not self._overflow:
                    self._overflow = True
                    self._spill_pending = True
                    self._wake.set()
                    return
                dropped = self._drop_buffered_bytes(
                    self._buffered_bytes + self._seq_mem - allowance
                )
                self._dropped_unspooled += dropped
                self._note_once(
                    ("spill-behind",),
                    DroppedPointsWarning,
                    f"steplog: memory is at twice the bound and the spool has not freed room "
                    f"in {s.max_block_s} s: dropped the {dropped} oldest buffered points; later "
                    "drops are counted in stats.dropped_unspooled",
                )
                return
            self._cond.wait(remaining)

    def _drop_buffered(self, n: int) -> int:
        """Drop up to n of the oldest buffered points (lock held)."""
        dropped = 0
        for buf in list(self._dirty):
            if dropped >= n:
                break
            before = buf.cost
            while dropped < n and buf.pending():
                dropped += buf.drop_front(n - dropped)
            self._buffered_bytes -= before - buf.cost
            if not buf.pending():
                del self._dirty[buf]
        return self._count_dropped(dropped)

    def _drop_buffered_bytes(self, nbytes: int) -> int:
        """Drop the oldest buffered points until nbytes are freed, or all
        are gone (lock held). How many points were dropped."""
        dropped = freed = 0
        for buf in list(self._dirty):
            if freed >= nbytes:
                break
            while freed < nbytes and buf.pending():
                before = buf.cost
                each = max(1, before // buf.pending())
                dropped += buf.drop_front(max(1, (nbytes - freed) // each))
                freed += before - buf.cost
            if not buf.pending():
                del self._dirty[buf]
        self._buffered_bytes -= freed
        return self._count_dropped(dropped)

    def _count_dropped(self, dropped: int) -> int:
        self._buffered -= dropped
        self._dropped += dropped
        self._dropped_buffered += dropped
        if not self._dirty:
            self._oldest = None
        return dropped

    def _rearm(self) -> None:
        """Where the hot path must next leave the fast path (lock held)."""
        if self._notes or self._closed:
            self._check_at = self._mem_check_at = 0
            return
        mem_at = self._settings.max_buffered_bytes - self._seq_mem + 1
        if self._spill and not self._spill_pending:
            mem_at = min(mem_at, self._spill_at - self._outbox_mem)
        self._mem_check_at = mem_at
        self._check_at = sys.maxsize if self._wake_pending else self._batch_points

    def _note_once(self, key: tuple[Any, ...], category: type[Warning], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._notes.warnings.append((category, message))

    def _take_notes(self) -> _Notes | None:
        if not self._notes:
            return None
        notes, self._notes = self._notes, _Notes()
        self._pending_rejections = []
        self._pending_rejected = 0
        self._rearm()
        return notes

    @staticmethod
    def _deliver(notes: _Notes | None, stacklevel: int) -> None:
        if notes is None:
            return
        for category, message in notes.warnings:
            warnings.warn(message, category, stacklevel=stacklevel)
        if notes.error is not None:
            raise notes.error

    def _ensure_started(self) -> None:
        """Start the sender thread (lock held). Lazily: after fork, too."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="steplog-writer", daemon=True)
            self._thread.start()

    # ----------------------------------------------------------- flush/close

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point logged before this call is acknowledged by
        the service (offline: written to the spool and fsynced). False on
        timeout, if some of those points could not be delivered, or if any
        point was refused or dropped since the last flush()/close() (so a
        loss is never followed by True without a False in between). In strict
        mode, raises what the sender recorded (rejections, delivery errors)."""
        deadline = None if timeout is None else monotonic() + timeout
        ok = self._flush_until(deadline)
        child = self._image_writer
        if child is not None:
            ok = child.flush(_remaining(deadline)) and ok
        with self._lock:
            ok = self._take_losses() and ok
            notes = self._take_notes()
        self._deliver(notes, stacklevel=3)
        return ok

    def _take_losses(self) -> bool:
        """(lock held) True unless points were refused or dropped since the
        last flush()/close() that said so: every loss makes the next one
        return False, even when the batch was given up before it began."""
        losses = self._refused + self._dropped
        clean = losses == self._losses_reported
        self._losses_reported = losses
        return clean

    def _flush_until(self, deadline: float | None) -> bool:
        with self._cond:
            if self._buffered == 0 and self._done_through == self._ordinal:
                return True
            if self._stop or self._sender_failed is not None:
                return False  # the sender is gone: nothing more will be delivered
            self._ensure_started()
            done_before = self._done_through
            self._cut_requested += 1
            request = self._cut_requested
            self._wake.set()
            while self._cut_done < request:
                if not self._wait(deadline):
                    return False
            target = self._cut_target
            while self._done_through < target:
                if not self._wait(deadline):
                    return False
            return not any(done_before < o <= target for o in self._lost)

    def _wait(self, deadline: float | None) -> bool:
        """One wait on the condition (lock held); False once the deadline has
        passed or the sender is gone."""
        if self._sender_failed is not None:
            return False
        if deadline is None:
            self._cond.wait()
            return True
        remaining = deadline - monotonic()
        if remaining <= 0:
            return False
        self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; flush and stop share one deadline.
        Safe to call twice (the second call returns the first's result).
        Undelivered data at the deadline goes to the spool when one is
        configured. Returns whether everything was delivered."""
        deadline = None if timeout is None else monotonic() + timeout
        with self._lock:
            if self._close_result is not None:
                return self._close_result
        ok = self._flush_until(deadline)
        child = self._image_writer
        if child is not None:
            ok = child.close(_remaining(deadline)) and ok
        with self._cond:
            self._stop = True
            self._closed = True
            self._rearm()
            self._wake.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            remaining = None if deadline is None else max(0.0, deadline - monotonic())
            thread.join(None if remaining is None else remaining + _STOP_GRACE)
        with self._lock:
            ok = self._take_losses() and ok
            ok = ok and self._buffered == 0 and not self._outbox and not self._unacked
            self._close_result = ok
            notes = self._take_notes()
        _LIVE.discard(self)
        self._deliver(notes, stacklevel=3)
        return ok

    def record_operation(self, kind: str, payload: bytes, timeout: float | None = None) -> bool:
        """Offline: store a run operation (steplog._spool.RUN_OPERATIONS, the
        serialized RunService request) in the spool, after every point logged
        before this call, so `steplog sync` applies it in that order. False
        if those points could not all be written first (the operation is
        stored all the same). Raises OSError when the spool cannot be written."""
        if not self._settings.offline:
            raise RuntimeError("record_operation is for offline writers")
        ok = self.flush(timeout)
        self._spool_writer().append_operation(kind, payload)
        self._spool_writer().sync()
        return ok

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self._settings.exit_timeout)

    # ----------------------------------------------------------------- sender

    def _run(self) -> None:
        try:
            while True:
                timeout = self._next_timeout()
                self._wake.wait(timeout)
                self._wake.clear()
                if not self._tick():
                    return
        except BaseException as exc:  # a bug: never leave a logger or flush waiting
            with self._cond:
                self._sender_failed = exc
                self._last_error = f"writer thread failed: {exc!r}"
                self._note_once(
                    ("sender-failed",),
                    DeliveryWarning,
                    f"steplog writer thread failed ({exc!r}); points are no longer sent",
                )
                self._rearm()
                self._cond.notify_all()
            raise

    def _next_timeout(self) -> float | None:
        now = monotonic()
        wakes: list[float] = []
        with self._lock:
            oldest = self._oldest if self._buffered else None
        if self._settings.offline:
            if oldest is not None:
                wakes.append(oldest + self._settings.flush_interval)
            if self._outbox:
                wakes.append(self._spool_retry_at)
        elif self._stream is None:
            if self._unacked or self._outbox or oldest is not None:
                wakes.append(self._reconnect_at)
            if self._spill and oldest is not None:
                wakes.append(max(oldest + self._settings.flush_interval, self._spool_retry_at))
        else:
            if oldest is not None and (self._spill or self._window_room(1)):
                wakes.append(oldest + self._settings.flush_interval)
            if self._outbox and self._outbox[0].request is None:
                wakes.append(self._spool_retry_at)
        if not wakes:
            return None
        return max(0.0, min(wakes) - now)

    def _tick(self) -> bool:
        """One round of the sender; False when it should exit."""
        self._handle_events()
        now = monotonic()
        with self._lock:
            stop = self._stop
            cut = self._cut_requested > self._cut_done
            cut_request = self._cut_requested
            due = self._buffered >= self._batch_points or (
                self._oldest is not None
                and self._buffered > 0
                and now >= self._oldest + self._settings.flush_interval
            )
        if stop:
            self._shutdown()
            return False
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
            if self._spool is not None:
                self._try_spool(self._spool.sync)
            with self._cond:
                self._cut_done = cut_request
                self._cut_target = self._ordinal
                self._cond.notify_all()
        with self._cond:
            if self._buffered < self._batch_points:
                self._wake_pending = False
            if (
                self._spilling_after_overflow
                and not self._outbox
                and self._buffered_bytes < self._spill_at
                and all(e.ref is None for e in self._unacked.values())
            ):
                self._spill = self._spilling_after_overflow = False  # drained
            self._rearm()
            self._cond.notify_all()
        return True

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
            work = bool(self._unacked or self._outbox or self._buffered)
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
                self._reconnects += 1
        self._ever_connected = True
        # Resend everything unacknowledged, in order: the first batch now, the
        # rest once the stream has proven itself with an ack (see _send_ready).
        self._to_resend = deque(self._unacked.values())
        self._send_ready(False)

    def _window_room(self, nbytes: int) -> bool:
        """Room for another batch in flight. Until a new stream has delivered an
        ack, only one: a stream may fail only after it was opened, and batches
        sent into a dead stream are sequenced, so no longer droppable."""
        if not self._unacked:
            return True
        if not self._stream_proven:
            return False
        return (
            len(self._unacked) < MAX_INFLIGHT_BATCHES
            and self._inflight_bytes + nbytes <= self._window_bytes
        )

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

    def _start_flight(self, entry: _Entry) -> None:
        if self._spill and entry.ref is None:
            self._spool_entry(entry)  # on disk before it is on the wire
        self._unacked[entry.ordinal] = entry
        self._inflight_bytes += entry.nbytes
        self._send(entry)

    def _send(self, entry: _Entry) -> bool:
        stream = self._stream
        if stream is None or entry.request is None:
            return False
        batch = entry.request.batch
        batch.writer_id = self._writer_id
        batch.sequence = entry.ordinal - self._epoch_base
        if entry.ref is not None and self._spool is not None:
            # The copy on disk says what is on the wire (a new writer id).
            try:
                self._spool.restamp(entry.ref, batch.writer_id, batch.sequence)
            except OSError as exc:
                self._spool_failed(exc)
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
            self._batches_sent += 1
        return True

    def _load(self, entry: _Entry) -> bool:
        """Read a spooled batch back into memory to send it."""
        assert entry.ref is not None and self._spool is not None
        try:
            entry.request = pb.IngestRequest.FromString(self._spool.read(entry.ref))
        except OSError as exc:
            self._spool_failed(exc)
            return False
        with self._lock:
            self._seq_mem += entry.nbytes
        return True

    def _encode(self) -> None:
        """Encode what log calls queued unencoded (rows, tables, evaluations,
        images) into messages: taken under the lock, encoded outside it (log
        calls go on meanwhile), put back in order. Sender thread only, so a
        series' items keep their order. An item that cannot be encoded (a
        bug, or a value changed under us) is rejected on the client alone."""
        with self._lock:
            work = [(mbuf, mbuf.take_raw()) for mbuf in self._raw]
            self._raw.clear()
        limit = self._message_bytes
        for mbuf, items in work:
            done: list[tuple[Encodable, list[tuple[data_pb2.SeriesData, int, int]]]] = []
            failed: list[tuple[Rejection, int]] = []
            for item in items:
                try:
                    messages = [
                        (m, series_points(m), m.ByteSize())
                        for m in item.encode(mbuf.name, mbuf.labels, limit)
                    ]
                except Exception as exc:
                    messages = []
                    why = f"could not be encoded on the client: {exc!r}"
                    rejection = Rejection(mbuf.run_id, mbuf.name, mbuf.labels, "INVALID_VALUE", why)
                    failed.append((rejection, item.points))
                done.append((item, messages))
            with self._lock:
                self._buffered_bytes += mbuf.put_ready(done)
                if failed:
                    n = sum(k for _, k in failed)
                    self._buffered -= n
                    self._drained += n
                    self._resolved_points += n
                    self._record_rejections([r for r, _ in failed], n, {"INVALID_VALUE": n})
                    self._rearm()

    def _form_batch(self) -> _Entry | None:
        """Cut the next batch from the buffers and give it a sequence number.
        The columns are taken under the lock; the protobuf is built outside."""
        if self._raw:
            self._encode()
        pieces: list[Piece] = []
        rejections: list[Rejection] = []
        points = size = cost = 0
        with self._lock:
            for buf in list(self._dirty):
                full = False
                before = buf.cost
                while buf.ready():
                    piece, n, b = buf.take(
                        self._batch_points - points, self._batch_bytes - size, not pieces
                    )
                    if piece is None:
                        if pieces:
                            full = True  # the next point does not fit: close this batch
                            break
                        ahead = buf.cost
                        rejection, k = buf.reject_front(self._batch_bytes)
                        before -= ahead - buf.cost  # gone, not in the batch
                        self._buffered_bytes -= ahead - buf.cost
                        rejections.append(rejection)
                        self._buffered -= k
                        self._drained += k
                        self._resolved_points += k
                        continue
                    pieces.append(piece)
                    points += n
                    size += b
                    if points >= self._batch_points:
                        full = True
                        break
                cost += before - buf.cost
                if not buf.pending():
                    del self._dirty[buf]
                if full:
                    break
            if rejections:
                n_rejected = len(rejections)
                self._record_rejections(rejections, n_rejected, {"LIMIT_EXCEEDED": n_rejected})
            if not self._dirty:
                self._oldest = None
            if not pieces:
                return None
            self._buffered -= points
            self._buffered_bytes -= cost
            self._drained += points
            self._ordinal += 1
            ordinal = self._ordinal
            self._seq_mem += cost
            self._outbox_mem += cost
            self._rearm()
        request = pb.IngestRequest(workspace=self._workspace)
        batch = request.batch
        batch.writer_id = self._writer_id
        batch.sequence = ordinal - self._epoch_base
        batch.sent_time = wall_time()
        for piece in pieces:
            piece.add_to(batch)
        return _Entry(ordinal, points, cost, request)

    def _form_all(self) -> None:
        while (entry := self._form_batch()) is not None:
            self._outbox.append(entry)
            if self._spill and monotonic() >= self._spool_retry_at:
                self._spool_entry(entry)

    # ------------------------------------------------------------ outcomes

    def _resolve(self, ordinal: int, lost: bool = False) -> None:
        """An ordinal is finished (acked, spooled offline, or lost); lock held."""
        if lost:
            self._lost.append(ordinal)
        if ordinal == self._done_through + 1:
            self._done_through = ordinal
            while self._done_through + 1 in self._done_above:
                self._done_above.discard(self._done_through + 1)
                self._done_through += 1
        elif ordinal > self._done_through:
            self._done_above.add(ordinal)

    def _on_ack(self, response: pb.IngestResponse) -> None:
        ordinal = int(response.sequence) + self._epoch_base
        entry = self._unacked.pop(ordinal, None)
        if entry is None:
            return  # an ack we no longer wait for (e.g. a late duplicate)
        self._inflight_bytes -= entry.nbytes
        self._stream_proven = True
        self._backoff.reset()
        self._failures.clear()
        if entry.ref is not None and self._spool is not None:
            self._spool.release(entry.ref)
        # A duplicate_batch ack carries the original commit's result: counted
        # here like any other, once (the entry is gone for any later ack).
        result = response.result
        with self._cond:
            if entry.request is not None:
                self._seq_mem -= entry.nbytes
            self._points_acked += entry.points
            self._resolved_points += entry.points
            self._batches_acked += 1
            self._duplicates += result.duplicates
            if result.rejected:
                counts = {reason_name(c.reason): int(c.count) for c in result.reject_counts}
                self._record_rejections(
                    [Rejection.from_proto(p) for p in result.rejected_points],
                    int(result.rejected),
                    counts,
                    _sole_series(entry.request),
                )
            self._resolve(ordinal)
            self._rearm()
            self._cond.notify_all()

    def _record_rejections(
        self,
        rejections: list[Rejection],
        count: int,
        counts: Mapping[str, int],
        sole: tuple[str, str, Labels] | None = None,
    ) -> None:
        """Count, keep and announce rejections (lock held). `sole`: the one
        series the batch held, when it held one."""
        self._rejected += count
        for reason, n in counts.items():
            self._rejected_by_reason[reason] = self._rejected_by_reason.get(reason, 0) + n
        self._rejections.extend(rejections)
        self._check_at = 0  # the next log call delivers the news
        if self._settings.strict:
            self._pending_rejections.extend(rejections)
            self._pending_rejected += count
            self._notes.error = PointsRejectedError(
                self._pending_rejections, self._pending_rejected
            )
            return
        # One warning per (series, reason), the first time, with that
        # series' count in this batch. The service itemises at most 20
        # rejected points a batch: when it listed fewer than it rejected for
        # a reason, the unlisted ones belong to the series only if the batch
        # held one series (`sole`); otherwise the count is a lower bound.
        listed: dict[str, int] = {}
        per_series: dict[tuple[tuple[str, str, Labels], str], list[Rejection]] = {}
        for r in rejections:
            listed[r.reason] = listed.get(r.reason, 0) + 1
            per_series.setdefault((r.series, r.reason), []).append(r)
        for (series, reason), rs in per_series.items():
            key = ("rejected", series, reason)
            if key in self._warned:
                continue
            n = len(rs)
            unlisted = counts.get(reason, n) - listed[reason]
            if unlisted > 0 and sole == series:
                n += unlisted
                unlisted = 0
            how = f"{n} point(s)" if unlisted <= 0 else f"at least {n} point(s)"
            more = (
                ""
                if unlisted <= 0
                else f" ({counts[reason]} {reason} in that batch, {listed[reason]} itemised)"
            )
            self._note_once(
                key,
                RejectedPointsWarning,
                f"steplog: {how} of this series rejected{more}: {_describe(rs[0])}; "
                "later rejections of this series for this reason are counted in "
                "stats.rejected and listed by rejections()",
            )
        if not rejections and count:
            for reason in counts:
                self._note_once(
                    ("rejected", None, reason),
                    RejectedPointsWarning,
                    f"steplog: {counts[reason]} point(s) rejected: {reason}",
                )

    def _on_stream_end(self, error: TransportError | None) -> None:
        stream, self._stream = self._stream, None
        self._to_resend.clear()
        self._stream_gen += 1  # ignore anything more from that stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        if error is None and not self._unacked:
            self._reconnect_at = 0.0  # an idle stream ended: reopen on demand
            return
        if error is None:
            error = TransportError(grpc.StatusCode.UNAVAILABLE, "the service ended the stream")
        with self._lock:
            self._last_error = str(error)
        # Counted under the table's code: a stream a proxy reset (INTERNAL
        # "Stream removed ... RST_STREAM") is transport loss, as UNAVAILABLE.
        key = error.retry_code
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if error.code == grpc.StatusCode.ABORTED:
            if self._unacked and not error.retry_again(failures):
                # The service keeps seeing a gap we cannot fill: resend
                # what is unacknowledged under a fresh sequence space.
                self._failures.pop(key, None)
                self._new_id(next(iter(self._unacked)) - 1)
        elif error.retry_again(failures):
            pass  # reconnect after the backoff; resend the window
        elif self._unacked:
            self._failures.pop(key, None)
            if error.code in STREAM_WIDE_CODES:
                self._fail_unacked(error)
            else:
                self._refuse_oldest(error)
        else:
            with self._cond:
                self._note_once(
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
        ordinal, entry = next(iter(self._unacked.items()))
        del self._unacked[ordinal]
        self._inflight_bytes -= entry.nbytes
        saved = self._save([entry])  # the spool directory, or its default
        with self._cond:
            self._new_id(ordinal)
            if entry.request is not None:
                self._seq_mem -= entry.nbytes
            self._resolved_points += entry.points
            self._resolve(ordinal, lost=True)
            self._refused += entry.points
            if saved:
                where = (
                    f"saved to {self._settings.resolved_spool_dir()} "
                    "(`steplog sync` sends it once the cause is fixed)"
                )
            else:
                self._dropped += entry.points
                where = f"dropped: the spool cannot be written ({self._last_error})"
            message = (
                f"steplog: the service refused a batch of {entry.points} points "
                f"({error.code.name}: {error.message}); it was {where}; the batches behind it "
                f"are sent under writer id {self._writer_id}"
            )
            if self._settings.strict:
                self._notes.error = DeliveryError(message, error.code, entry.points)
            else:
                self._note_once(("delivery", error.code), DeliveryWarning, message)
            self._rearm()
            self._cond.notify_all()

    def _fail_unacked(self, error: TransportError) -> None:
        """The credentials were refused (steplog._retry.STREAM_WIDE_CODES): no
        batch in flight will be accepted as sent. Spool them if we can, else
        drop them; go on under a new id."""
        entries = list(self._unacked.values())
        self._unacked.clear()
        self._inflight_bytes = 0
        points = sum(e.points for e in entries)
        saved = self._save(entries)  # the spool directory, or its default
        first_outbox = self._outbox[0].ordinal if self._outbox else None
        with self._cond:
            self._new_id((first_outbox or self._ordinal + 1) - 1)
            for e in entries:
                if e.request is not None:
                    self._seq_mem -= e.nbytes
                self._resolved_points += e.points
                self._resolve(e.ordinal, lost=True)
            self._refused += points
            spooled = sum(e.points for e in saved)
            lost = points - spooled
            self._dropped += lost
            where = (
                f"saved {spooled} points to {self._settings.resolved_spool_dir()} "
                "(`steplog sync` sends them once the cause is fixed)"
                if spooled
                else f"dropped {lost} points (the spool cannot be written: {self._last_error})"
            )
            message = (
                f"steplog: the service refused batches ({error.code.name}: {error.message}); "
                f"{where}; later data is sent under writer id {self._writer_id}"
            )
            if self._settings.strict:
                self._notes.error = DeliveryError(message, error.code, points)
            else:
                self._note_once(("delivery", error.code), DeliveryWarning, message)
            self._rearm()
            self._cond.notify_all()

    def _new_id(self, epoch_base: int) -> None:
        """Continue under a new writer id whose sequence 1 is ordinal epoch_base+1."""
        self._id_generation += 1
        self._writer_id = f"{self._base_id[:96]}.r{self._id_generation}"
        self._epoch_base = epoch_base

    # ---------------------------------------------------------------- spool

    def _spool_writer(self) -> SpoolWriter:
        if self._spool is None:
            directory = self._settings.resolved_spool_dir()
            self._spool = SpoolWriter(directory, self._base_id, keep=self._settings.offline)
        return self._spool

    def _try_spool(self, action: Callable[[], Any]) -> bool:
        try:
            action()
        except OSError as exc:
            self._spool_failed(exc)
            return False
        return True

    def _spool_failed(self, exc: OSError) -> None:
        self._spool_retry_at = monotonic() + self._backoff.next_delay()
        with self._cond:
            self._last_error = f"spool: {exc}"
            self._note_once(
                ("spool", exc.errno),
                DeliveryWarning,
                f"steplog: cannot write the spool ({exc}); data stays in memory and is retried",
            )
            self._rearm()

    def _spool_entry(self, entry: _Entry) -> bool:
        """Write one in-memory batch to the spool (stamped as it will be sent)."""
        if entry.ref is not None:
            return True
        assert entry.request is not None
        batch = entry.request.batch
        batch.writer_id = self._writer_id
        batch.sequence = entry.ordinal - self._epoch_base
        try:
            entry.ref = self._spool_writer().append(
                entry.request.SerializeToString(), batch.writer_id, batch.sequence, entry.points
            )
        except OSError as exc:
            self._spool_failed(exc)
            return False
        with self._lock:
            self._spooled += entry.points
        return True

    def _save(self, entries: Sequence[_Entry]) -> list[_Entry]:
        """Spool batches that cannot be delivered now; fsync. Those saved."""
        saved: list[_Entry] = []
        for e in entries:
            if e.ref is None and e.request is None:
                continue
            if not self._spool_entry(e):
                break
            saved.append(e)
        if saved and self._spool is not None:
            self._try_spool(self._spool.sync)
        return saved

    def _write_offline(self, form: bool) -> None:
        """Offline: formed batches go to the spool and are done once written."""
        if self._outbox and monotonic() < self._spool_retry_at:
            return
        while True:
            if not self._outbox:
                formed = self._form_batch() if form else None
                if formed is None:
                    return
                self._outbox.append(formed)
            entry = self._outbox[0]
            if not self._spool_entry(entry):
                return
            self._outbox.popleft()
            with self._cond:
                self._seq_mem -= entry.nbytes
                self._outbox_mem -= entry.nbytes
                self._resolved_points += entry.points
                entry.request = None
                self._resolve(entry.ordinal)
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
        with self._lock:
            over = self._spill_pending or (
                self._spill and self._buffered_bytes + self._outbox_mem >= self._spill_at
            )
        if not (over or (due and self._spill)):
            return
        healthy = monotonic() >= self._spool_retry_at
        for entry in self._outbox:
            if not healthy:
                break
            if entry.request is None:
                continue
            healthy = self._spool_entry(entry)
            if healthy and over:
                self._forget_request(entry)
        while healthy and (formed := self._form_batch()) is not None:
            self._outbox.append(formed)
            healthy = self._spool_entry(formed)
            if healthy and over:
                self._forget_request(formed)
        with self._cond:
            if over and not healthy:
                excess = self._buffered_bytes + self._seq_mem - self._settings.max_buffered_bytes
                if excess > 0:
                    dropped = self._drop_buffered_bytes(excess)
                    self._dropped_unspooled += dropped
                    self._note_once(
                        ("spool-full",),
                        DroppedPointsWarning,
                        f"steplog: the memory bound is reached and the spool cannot be written "
                        f"({self._last_error}): dropped the {dropped} oldest buffered points; "
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

    def _forget_request(self, entry: _Entry) -> None:
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
        pending = list(self._unacked.values()) + list(self._outbox)
        if self._spool is not None:
            for e in self._outbox:  # never sent: stamp them as they would be
                if e.ref is not None:
                    with contextlib.suppress(OSError):
                        self._spool.restamp(e.ref, self._writer_id, e.ordinal - self._epoch_base)
        self._unacked.clear()
        points = sum(e.points for e in pending)
        saved = self._save(pending) if pending else []  # the spool directory, or its default
        spooled = sum(e.points for e in saved)
        if self._spool is not None:
            with contextlib.suppress(OSError):
                self._spool.close()
        with self._cond:
            self._outbox.clear()
            self._outbox_mem = 0
            self._seq_mem = 0
            self._inflight_bytes = 0
            for e in pending:
                self._resolved_points += e.points
                self._resolve(e.ordinal, lost=True)
            lost = points - spooled
            self._dropped += lost
            if points:
                where = (
                    f"{spooled} were saved to {self._settings.resolved_spool_dir()} "
                    "(send them with `steplog sync`)"
                    if spooled
                    else f"they were dropped (the spool cannot be written: {self._last_error})"
                )
                if lost and spooled:
                    where += f"; {lost} could not be saved"
                message = f"steplog: {points} points were not acknowledged before close; {where}"
                if self._settings.strict:
                    self._notes.error = DeliveryError(message, None, points)
                else:
                    self._note_once(("close",), DeliveryWarning, message)
            self._cut_done = self._cut_requested
            self._cut_target = self._ordinal
            self._rearm()
            self._cond.notify_all()

    # ----------------------------------------------------------------- fork

    def _after_fork_in_child(self) -> None:
        """The parent's buffers, batches, stream and spool stay the parent's."""
        _FORK_GRAVEYARD.extend(o for o in (self._stream, self._spool) if o is not None)
        if self._spool is not None:
            _FORK_GRAVEYARD.append(self._spool.abandon())
        base = self._base_id
        self._init_state(f"{base[:96]}.p{os.getpid()}")
        self._needs_after_fork = True


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - monotonic())


def _merge_stats(a: WriterStats, b: WriterStats) -> WriterStats:
    """a's identity, both streams' counts."""
    merged: dict[str, Any] = {}
    for f in fields(WriterStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "rejected_by_reason":
            merged[f.name] = {k: x.get(k, 0) + y.get(k, 0) for k in {*x, *y}}
        elif isinstance(x, int):
            merged[f.name] = x + y
        else:
            merged[f.name] = x if x else y
    return WriterStats(**merged)


def _sole_series(request: pb.IngestRequest | None) -> tuple[str, str, Labels] | None:
    """The (run, name, labels) of a batch's only series, if it held one."""
    if request is None:
        return None
    series = request.batch.series
    if len(series) != 1:
        return None
    rs = series[0]
    return (rs.run_id, rs.series.name, tuple(sorted(rs.series.labels.items())))


def _float_column(values: Any) -> array[float]:
    if isinstance(values, np.ndarray):
        col: array[float] = array("d")
        col.frombytes(np.ascontiguousarray(values, dtype=np.float64).tobytes())
        return col
    return array("d", values)


def _int_column(values: Any) -> array[int]:
    if isinstance(values, np.ndarray):
        col: array[int] = array("q")
        col.frombytes(np.ascontiguousarray(values, dtype=np.int64).tobytes())
        return col
    return array("q", values)


def _close_all_at_exit() -> None:
    for writer in list(_LIVE):
        try:
            writer.close(writer.settings.exit_timeout)
        except Exception as exc:  # strict-mode errors at exit: say so, do not traceback
            print(f"steplog: {exc}", file=sys.stderr)


def _reset_all_after_fork() -> None:
    for writer in list(_LIVE):
        writer._after_fork_in_child()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_reset_all_after_fork)
