"""The writer's buffers: what log calls append to, and what the sender cuts
batches from. One `Buffers` per stream, guarded by its `lock`.

Hot path. A log call writes into its series' columns (steplog._writer.series)
under the lock: no I/O, no protobuf, only copies of the values. `Run.log` of
a stepped numeric series calls the series' own `NumericBuffer.log` (found in
`hot_table`, one dict lookup by name), the same work without the key. It returns
None on the fast path; it returns the bytes it added when a counter crossed
a threshold the lane set (`check_at` points, `mem_check_at` bytes: a batch
is full, the memory bound, news to deliver), and the lane then takes the
slow path. Table rows (`log_row`) extend the series' open RowsItem in place,
tables, evaluations and images are queued as items (steplog._writer.items)
the sender encodes (`encode_pending`) before it cuts a batch (`take`).

Why one module of this length: every buffer kind shares the one lock and the
thresholds the lane sets, and the hot paths (log, log_row) read best beside
the slow paths they fall back to.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Mapping, Sequence
from time import monotonic
from time import time as wall_time
from typing import Any, Protocol, cast

import numpy as np

from steplog._tables import (
    _SIGNATURES,
    CELL_BYTES,
    ROW_BYTES,
    RowsItem,
    check_row_names,
    row_cost,
    row_signature,
    table_item,
)
from steplog._writer.items import Encodable
from steplog._writer.outcomes import Outcomes
from steplog._writer.series import (
    Buffer,
    MessageBuffer,
    NumericBuffer,
    Piece,
    TextBuffer,
)
from steplog._writer.transport import Labels, Rejection
from steplog._writer.wire import SERIES_OVERHEAD, series_points
from steplog.v1 import data_pb2


class Wake(Protocol):
    """What wakes the sender thread: its Event, or a lane's Poke
    (steplog._writer.sender), which also names the lane."""

    def set(self) -> None: ...


ScalarKey = tuple[str, str, Labels, bool, bool]
ScalarBuffer = NumericBuffer | TextBuffer
MessageKey = tuple[str, str, Labels, str | None]


class Buffers:
    """The buffered points of one stream, per series, oldest first.

    `wake` is the sender's Event (set on the first point after a quiet
    spell); `started` is called on a new series (it starts the sender);
    `news` after the sender recorded something for the user."""

    def __init__(
        self,
        outcomes: Outcomes,
        wake: Wake,
        started: Callable[[], None],
        news: Callable[[], None],
        max_batch_bytes: int,
        batch_bytes: int,
    ) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.wake = wake
        self._out = outcomes
        self._started = started
        self._news = news
        self.max_batch_bytes = max_batch_bytes  # the setting, for messages
        self.batch_bytes = batch_bytes  # what a batch may hold of series
        # Rows, tables, evaluations are encoded into messages of at most this
        # size (split by rows), so a batch holds more than one.
        self.message_bytes = max(4096, batch_bytes // 2)
        self._scalars: dict[ScalarKey, ScalarBuffer] = {}
        # (run, labels) -> {name: its stepped numeric series}: Run.log's table.
        self._hot: dict[tuple[str, Labels], dict[str, NumericBuffer]] = {}
        self._hot_rows: dict[tuple[str, Labels], dict[str, Any]] = {}  # Run.log_row's
        self._messages: dict[MessageKey, MessageBuffer] = {}
        self.dirty: dict[Buffer, None] = {}  # buffers with points, oldest first
        self.raw: dict[MessageBuffer, None] = {}  # holding items not yet encoded
        self.buffered = 0
        self.buffered_bytes = 0  # what the buffered points cost in memory
        self.oldest: float | None = None
        self.check_at = 0  # leave the fast path at this many points (the lane sets it)
        self.mem_check_at = 0  # ... or at this many bytes

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
    ) -> int | None:
        """Append one point; returns at once (see the module docstring for the
        only case in which it waits). A value of the wrong type raises here."""
        key = (run_id, name, labels, isinstance(value, str), step is not None)
        with self.lock:
            buf = self._scalars.get(key)
            if buf is None:
                buf = self._new_scalar_series(key, description, out_of_order)
            empty = not buf.pending()
            cost = buf.add(value, step, time)  # type: ignore[arg-type]
            if empty:
                self.first_point(buf)
            self.buffered += 1
            self.buffered_bytes += cost
            if self.buffered < self.check_at and self.buffered_bytes < self.mem_check_at:
                return None
        return cost

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
    ) -> int | None:
        """Append many points of one series at once (`log_list`, bulk logging).
        `times` None: all get the current time. Columns are converted before
        anything is appended, so a bad value leaves the series untouched."""
        n = len(values)
        if n == 0:
            return None
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
        with self.lock:
            sbuf = self._scalars.get(key)
            if sbuf is None:
                sbuf = self._new_scalar_series(key, description, out_of_order)
            if not sbuf.pending():
                self.first_point(sbuf)
            cost = sbuf.extend(col_values, col_times, col_steps)  # type: ignore[arg-type]
            self.buffered += n
            self.buffered_bytes += cost
            if self.buffered < self.check_at and self.buffered_bytes < self.mem_check_at:
                return None
        return cost

    def log_series(self, run_id: str, series: data_pb2.SeriesData) -> int | None:
        """Append a pre-built SeriesData (table rows, images, evaluations...):
        it is sent whole, in order with the other messages of its series, and
        shares the sequencing, ack, retry and spool machinery. Raises
        ValueError when it cannot fit in any batch."""
        points = series_points(series)
        size = series.ByteSize()
        if size + SERIES_OVERHEAD + len(run_id.encode()) > self.batch_bytes:
            raise ValueError(
                f"series {series.name!r}: {size} bytes do not fit in a batch "
                f"(max_batch_bytes={self.max_batch_bytes})"
            )
        labels = tuple(sorted(series.labels.items()))
        key = (run_id, series.name, labels, series.WhichOneof("points"))
        with self.lock:
            mbuf = self._messages.get(key)
            if mbuf is None:
                mbuf = self._messages[key] = MessageBuffer(run_id, series.name, labels)
                self._started()
            if not mbuf.points:
                self.first_point(mbuf)
            cost = mbuf.append(series, points, size)
            if mbuf.raw:
                self.raw[mbuf] = None
            self.buffered += points
            self.buffered_bytes += cost
            if self.buffered < self.check_at and self.buffered_bytes < self.mem_check_at:
                return None
        return cost

    def log_row(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        row: Mapping[str, Any],
        time: float,
        description: str = "",
    ) -> int | None:
        """Append one table row ({column: cell}, None a missing cell). Its
        cells are checked here (the error names the column) and its values
        appended to the series' open RowsItem; the sender encodes the rows.
        Later rows of the table can go straight to its `row_appender` (the
        callable `hot_rows` holds for it)."""
        row_cost(name, row)  # a bad cell raises before the series exists
        key = (run_id, name, labels, "table")
        with self.lock:
            mbuf = self._messages.get(key)
            if mbuf is None:
                mbuf = self._new_message_series(key)
            table = self._hot_rows.setdefault((run_id, labels), {})
            append = table.get(name)
            if append is None:
                append = table[name] = self.row_appender(mbuf)
        return append(row, time, description)

    def hot_rows(
        self, run_id: str, labels: Labels
    ) -> dict[str, Callable[[Mapping[str, Any], float, str], int | None]]:
        """{table name: the row_appender of its series} for Run.log_row's hot path
        (emptied by `forget_hot`, as hot_table is)."""
        with self.lock:
            return self._hot_rows.setdefault((run_id, labels), {})

    def row_appender(
        self, mbuf: MessageBuffer
    ) -> Callable[[Mapping[str, Any], float, str], int | None]:
        """`append(row, time, description)` for one table series: log_row's
        hot path (what `hot_rows` holds). A row with the same columns as the
        one before extends the open RowsItem's segment. A closure: the lock,
        the series and the cache are its own variables, no attribute looked
        up for them; the lock is taken with acquire/release (cheaper than
        `with`)."""
        buffers = self
        acquire = self.lock.acquire
        release = self.lock.release
        signatures = _SIGNATURES.get
        new_segment = self._new_row_segment

        def append(row: Mapping[str, Any], time: float, description: str) -> int | None:
            values = tuple(row.values())
            known = signatures(tuple(map(type, values)))  # row_signature's cache
            if known is None:
                known = row_signature(mbuf.name, row, values)  # a bad cell raises here
            sig, strings = known
            cost = ROW_BYTES + CELL_BYTES * len(values)
            for i in strings:
                v = values[i]
                cost += len(v) if v.isascii() else 4 * len(v)
            names = tuple(row)
            acquire()
            try:
                rows: RowsItem | None = mbuf.open
                if rows is None or names != rows.names:
                    new_segment(mbuf, rows, names, values, sig, time, cost, description)
                else:
                    if not mbuf.points:
                        buffers.first_point(mbuf)
                    rows.flat.extend(values)
                    rows.times.append(time)
                    if sig is not rows.sig and rows.sig is not None:
                        rows.sig = rows.sigs[-1] = None
                    rows.cost += cost
                    rows.points = n = rows.points + 1
                    if n >= rows.full_at:
                        mbuf.open = None  # full: the next row starts the next message
                mbuf.points += 1
                mbuf.cost += cost
                buffers.buffered = count = buffers.buffered + 1
                buffers.buffered_bytes = nbytes = buffers.buffered_bytes + cost
                if count < buffers.check_at and nbytes < buffers.mem_check_at:
                    return None
            finally:
                release()
            return cost

        return append

    def _new_row_segment(
        self,
        mbuf: MessageBuffer,
        rows: RowsItem | None,
        names: tuple[str, ...],
        values: tuple[Any, ...],
        sig: tuple[type, ...],
        time: float,
        cost: int,
        description: str,
    ) -> None:
        """row_appender's slow path (lock held): the first row of a RowsItem,
        or a row whose columns differ from the one before (names checked)."""
        check_row_names(mbuf.name, names)
        if not mbuf.points:
            self.first_point(mbuf)
        if rows is None:
            rows = RowsItem(description)
            mbuf.add_raw(rows)
            mbuf.open = rows
            self.raw[mbuf] = None
        if rows.add(names, values, time, cost, sig):
            mbuf.open = None  # full: the next row starts the next message

    def log_item(
        self, run_id: str, name: str, labels: Labels, kind: str, item: Encodable, bound: int = 0
    ) -> int | None:
        """Append values a log call copied (a table's columns, an evaluation
        document, an image: `kind` is the SeriesData points field); the
        sender encodes them. `bound`: an upper bound of the encoded size;
        ValueError when that cannot fit in any batch."""
        if bound and bound + SERIES_OVERHEAD + len(run_id.encode()) > self.batch_bytes:
            raise ValueError(
                f"series {name!r}: {bound} bytes do not fit in a batch "
                f"(max_batch_bytes={self.max_batch_bytes})"
            )
        key = (run_id, name, labels, kind)
        with self.lock:
            mbuf = self._messages.get(key)
            if mbuf is None:
                mbuf = self._new_message_series(key)
            if not mbuf.points:
                self.first_point(mbuf)
            mbuf.add_raw(item)
            self.raw[mbuf] = None
            cost = item.cost
            self.buffered += item.points
            self.buffered_bytes += cost
            if self.buffered < self.check_at and self.buffered_bytes < self.mem_check_at:
                return None
        return cost

    def log_table_rows(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        rows: Mapping[str, Sequence[Any]],
        steps: Sequence[int] | None = None,
        times: Sequence[float] | None = None,
        description: str = "",
    ) -> int | None:
        """Append table rows given as columns ({"col": [v1, v2, ...]});
        copied here, encoded (and split by rows to fit a batch) by the sender."""
        item = table_item(name, rows, description, steps, wall_time())
        if times is not None:
            if len(times) != item.points:
                raise ValueError(f"{len(times)} times for {item.points} rows")
            item.times = [float(t) for t in times]
        if not item.points:
            return None
        return self.log_item(run_id, name, labels, "table", item)

    def hot_table(self, run_id: str, labels: Labels) -> dict[str, NumericBuffer]:
        """{name: buffer} of the run's stepped numeric series with these
        labels, for Run.log's hot path (`NumericBuffer.log`). Emptied by
        `forget_hot` when this writer's buffers are left behind (a forked
        child), so a caller holding it falls back to log_scalar."""
        with self.lock:
            return self._hot.setdefault((run_id, labels), {})

    def forget_hot(self) -> None:
        for table in self._hot.values():
            table.clear()
        for rows in self._hot_rows.values():
            rows.clear()

    def first_point(self, buf: Buffer) -> None:
        """A buffer was empty and gets a point (lock held): it joins the
        dirty ones, and the first after a quiet spell wakes the sender."""
        if not self.dirty:
            self.oldest = monotonic()
            self.wake.set()
        self.dirty[buf] = None

    def _new_message_series(self, key: tuple[str, str, Labels, str | None]) -> MessageBuffer:
        """First message of a series in this writer (lock held)."""
        mbuf = self._messages[key] = MessageBuffer(key[0], key[1], key[2])
        self._started()
        return mbuf

    def _new_scalar_series(
        self, key: tuple[str, str, Labels, bool, bool], description: str, out_of_order: bool
    ) -> ScalarBuffer:
        """First point of a series in this writer (lock held)."""
        run_id, name, labels, text, stepped = key
        buf: ScalarBuffer
        if text:
            buf = TextBuffer(run_id, name, labels, stepped, description, out_of_order)
        else:
            buf = NumericBuffer(self, run_id, name, labels, stepped, description, out_of_order)
            if stepped:
                self._hot.setdefault((run_id, labels), {})[name] = buf
        self._scalars[key] = buf
        self._started()
        return buf

    def drop_points(self, n: int) -> int:
        """Drop up to n of the oldest buffered points (lock held)."""
        dropped = 0
        for buf in list(self.dirty):
            if dropped >= n:
                break
            before = buf.cost
            while dropped < n and buf.pending():
                dropped += buf.drop_front(n - dropped)
            self.buffered_bytes -= before - buf.cost
            if not buf.pending():
                del self.dirty[buf]
        return self._count_dropped(dropped)

    def drop_bytes(self, nbytes: int) -> int:
        """Drop the oldest buffered points until nbytes are freed, or all
        are gone (lock held). How many points were dropped."""
        dropped = freed = 0
        for buf in list(self.dirty):
            if freed >= nbytes:
                break
            while freed < nbytes and buf.pending():
                before = buf.cost
                each = max(1, before // buf.pending())
                dropped += buf.drop_front(max(1, (nbytes - freed) // each))
                freed += before - buf.cost
            if not buf.pending():
                del self.dirty[buf]
        self.buffered_bytes -= freed
        return self._count_dropped(dropped)

    def _count_dropped(self, dropped: int) -> int:
        self.buffered -= dropped
        self._out.dropped += dropped
        self._out.dropped_buffered += dropped
        if not self.dirty:
            self.oldest = None
        return dropped

    def encode_pending(self) -> None:
        """Encode what log calls queued unencoded (rows, tables, evaluations,
        images) into messages: taken under the lock, encoded outside it (log
        calls go on meanwhile), put back in order. Sender thread only, so a
        series' items keep their order. An item that cannot be encoded (a
        bug, or a value changed under us) is rejected on the client alone."""
        with self.lock:
            work = [(mbuf, mbuf.take_raw()) for mbuf in self.raw]
            self.raw.clear()
        limit = self.message_bytes
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
            with self.lock:
                self.buffered_bytes += mbuf.put_ready(done)
                if failed:
                    n = sum(k for _, k in failed)
                    self.buffered -= n
                    self._out.drained += n
                    self._out.resolved_points += n
                    self._out.record_rejections([r for r, _ in failed], n, {"INVALID_VALUE": n})
                    self._news()

    def take(self, max_points: int, max_bytes: int) -> tuple[list[Piece], int, int]:
        """(lock held) The next batch's pieces, oldest series first, within
        max_points and max_bytes; their points and memory cost. A point too
        large for any batch is rejected on the client (LIMIT_EXCEEDED)."""
        pieces: list[Piece] = []
        rejections: list[Rejection] = []
        points = size = cost = 0
        for buf in list(self.dirty):
            full = False
            before = buf.cost
            while buf.ready():
                piece, n, b = buf.take(max_points - points, max_bytes - size, not pieces)
                if piece is None:
                    if pieces:
                        full = True  # the next point does not fit: close this batch
                        break
                    ahead = buf.cost
                    rejection, k = buf.reject_front(max_bytes)
                    before -= ahead - buf.cost  # gone, not in the batch
                    self.buffered_bytes -= ahead - buf.cost
                    rejections.append(rejection)
                    self.buffered -= k
                    self._out.drained += k
                    self._out.resolved_points += k
                    continue
                pieces.append(piece)
                points += n
                size += b
                if points >= max_points:
                    full = True
                    break
            cost += before - buf.cost
            if not buf.pending():
                del self.dirty[buf]
            if full:
                break
        if rejections:
            n_rejected = len(rejections)
            self._out.record_rejections(rejections, n_rejected, {"LIMIT_EXCEEDED": n_rejected})
        if not self.dirty:
            self.oldest = None
        self.buffered -= points
        self.buffered_bytes -= cost
        self._out.drained += points
        return pieces, points, cost


def _float_column(values: Any) -> array[float]:
    if isinstance(values, np.ndarray):
        col: array[float] = array("d")
        # One copy: the array's buffer straight into the column.
        col.frombytes(np.ascontiguousarray(values, dtype=np.float64).data.cast("B"))
        return col
    return array("d", values)


def _int_column(values: Any) -> array[int]:
    if isinstance(values, np.ndarray):
        col: array[int] = array("q")
        col.frombytes(np.ascontiguousarray(values, dtype=np.int64).data.cast("B"))
        return col
    return array("q", values)
