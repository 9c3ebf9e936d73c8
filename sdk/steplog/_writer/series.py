"""Per-series column buffers (the hot path's data) and how they become `RunSeries`.

`log()` writes a point into three `array` columns of its series (values, times,
steps) under the writer's lock: no protobuf, no per-point Python objects kept
(8 bytes a column), and a bad value fails at the caller's line, not later in the
sender thread. A numeric series (`NumericBuffer`) writes into preallocated
chunks by index, reused in place once the sender has taken them, so the hot
path neither reallocates nor touches fresh memory; `Run.log` calls its `log`
directly (the writer's per-run table of stepped series, `Buffers.hot_table`).
The sender takes prefixes of those columns under the same lock (sealed chunks
are handed over without copying) and builds the protobuf outside it, writing
the packed fields as raw bytes: upb parses a packed double array about 40x
faster than it `extend()`s one from Python numbers. Text series
(`TextBuffer`) keep their values in a list.

Non-scalar series (tables, images, evaluations) queue per series in a
`MessageBuffer`: the caller's thread appends `Encodable` items (rows, a
table's columns, an evaluation's JSON text, an image's bytes: values copied,
nothing encoded); the sender thread encodes them into `SeriesData` messages
(`take_raw`, `encode` outside the lock, `put_ready`) before it cuts a batch,
and sends the messages whole, in order. Pre-built messages (`log_series`) go
straight to the encoded queue. They share the sequencing, acknowledgement,
retry and spool machinery of the writer unchanged.
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Any, Protocol

from steplog._writer.items import MESSAGE_OVERHEAD_BYTES, Encodable, Encoded
from steplog._writer.transport import Labels, Rejection
from steplog._writer.wire import (
    DOUBLE_BYTES,
    SERIES_OVERHEAD,
    VARINT_MAX_BYTES,
    labels_overhead,
    scalar_columns,
)
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

# Compact a column when this many consumed points sit in front of it (and they
# are at least half of it), so draining a long backlog costs amortised O(1).
_COMPACT_AT = 4096
# What a buffered point costs in memory, for the writer's bound in bytes: 8
# bytes a column (time, step, numeric value); a text value also its list slot
# and str header, plus its characters (text_chars).
_COLUMN_BYTES = 8
_TEXT_VALUE_BYTES = 56
# A numeric series' open chunk: _CHUNK_MIN slots at first, doubling each
# time one fills, up to _CHUNK_MAX, and halving each time the sender empties
# it while under a quarter of it was written. Its unwritten slots are not
# counted by the memory bound: at most 96 KiB a series (3 columns x 8 bytes
# x 4096) right after a burst, back to 1.5 KiB after six quiet flushes (the
# sender empties it every flush interval, 0.2 s by default).
_CHUNK_MIN = 64
_CHUNK_MAX = 4096
_ZERO_D: array[float] = array("d", bytes(8 * _CHUNK_MAX))
_ZERO_Q: array[int] = array("q", bytes(8 * _CHUNK_MAX))


def text_chars(value: str) -> int:
    """The bytes a str's characters take (1 each if ASCII, up to 4 if not)."""
    return len(value) if value.isascii() else 4 * len(value)


class Piece(Protocol):
    """Points taken from one buffer, ready to become RunSeries in a batch."""

    def add_to(self, batch: pb.Batch) -> None: ...


class Buffer(Protocol):
    """What the writer's drain needs from a per-series buffer (lock held).
    `cost`: the bytes its pending points hold (the memory bound counts it)."""

    @property
    def cost(self) -> int: ...

    def pending(self) -> int: ...

    def ready(self) -> int:
        """Of the pending points, those `take` can hand out now (encoded)."""
        ...

    def take(self, max_points: int, max_bytes: int, fresh: bool) -> tuple[Piece | None, int, int]:
        """A prefix of at most max_points points and max_bytes encoded bytes,
        with its point count and byte bound; (None, 0, 0) if nothing fits.
        `fresh`: the batch is empty (a whole message may exceed max_points)."""
        ...

    def drop_front(self, n: int) -> int:
        """Drop up to n oldest points (at least one); how many were dropped."""
        ...

    def reject_front(self, max_bytes: int) -> tuple[Rejection, int]:
        """Drop the oldest point, too large for any batch; what to report."""
        ...


class NumericBuffer:
    """The columns of one numeric series, stepped or not, in chunks.

    The open chunk is three preallocated arrays of `cap` slots (values,
    times, steps; no steps when unstepped) of which `n` are written and the
    first `cstart` already taken by the sender. A point is written at index
    `n` (`log`, `add`): no append, so no realloc and no page touched for the
    first time on the hot path, and no object the cyclic GC must track. When
    the sender has taken everything written, the chunk is reused in place,
    so a steady stream of points keeps writing the same memory. A full chunk
    is sealed whole (no copy) into `segs` and a new one opens, twice as large
    up to _CHUNK_MAX, so a rarely logged series holds little. `segs` hold the
    older points (bulk columns go there too), `head` of segs[0] taken.
    Invariant: cstart > 0 only when segs is empty (the sender takes the
    oldest first)."""

    __slots__ = (
        "cap",
        "cs",
        "cstart",
        "ct",
        "cv",
        "description",
        "head",
        "labels",
        "n",
        "name",
        "overhead",
        "owner",
        "point_bytes",
        "point_cost",
        "policy",
        "run_id",
        "seg_points",
        "segs",
        "stepped",
    )

    text = False

    def __init__(
        self,
        owner: Any,
        run_id: str,
        name: str,
        labels: Labels,
        stepped: bool,
        description: str = "",
        out_of_order: bool = False,
    ) -> None:
        self.owner = owner  # the Buffers (steplog._writer.intake): lock, counters
        self.run_id = run_id
        self.name = name
        self.labels = labels
        self.stepped = stepped
        self.description = description
        self.policy = (
            data_pb2.STEP_POLICY_OUT_OF_ORDER if out_of_order else data_pb2.STEP_POLICY_UNSPECIFIED
        )
        self.overhead = _series_overhead(run_id, name, description, labels)
        self.point_bytes = DOUBLE_BYTES * 2 + (VARINT_MAX_BYTES if stepped else 0)
        self.point_cost = _COLUMN_BYTES * (3 if stepped else 2)
        self.segs: deque[tuple[array[float], array[float], array[int]]] = deque()
        self.seg_points = 0  # in segs, including the `head` taken
        self.head = 0
        self._open(_CHUNK_MIN)

    def _open(self, cap: int) -> None:
        self.cap = cap
        self.cv: array[float] = _ZERO_D[:cap]
        self.ct: array[float] = _ZERO_D[:cap]
        self.cs: array[int] = _ZERO_Q[:cap] if self.stepped else array("q")
        self.n = self.cstart = 0

    def log(self, value: float, step: int, time: float) -> int | None:
        """Run.log's hot path for a stepped series: one point, under the
        writer's lock; None, or the bytes added when the call must take the
        writer's slow path (steplog._writer.intake.Buffers.log_scalar says
        when). A value or step of the wrong type raises before anything is
        recorded (TypeError, OverflowError)."""
        owner = self.owner
        lock = owner.lock
        lock.acquire()  # acquire/release in try/finally: cheaper than `with`
        try:
            n = self.n
            self.cv[n] = value
            self.ct[n] = time
            self.cs[n] = step
            if n == self.cstart and not self.segs:
                owner.first_point(self)
            n += 1
            self.n = n
            if n == self.cap:
                self._seal()
            cost = self.point_cost
            owner.buffered += 1
            owner.buffered_bytes += cost
            if owner.buffered < owner.check_at and owner.buffered_bytes < owner.mem_check_at:
                return None
        finally:
            lock.release()
        return cost

    def add(self, value: float, step: int | None, time: float) -> int:
        """One point (lock held); its memory cost. Raises before anything is
        recorded when the value or step has the wrong type."""
        n = self.n
        self.cv[n] = value
        self.ct[n] = time
        if self.stepped:
            self.cs[n] = step  # type: ignore[assignment]
        self.n = n = n + 1
        if n == self.cap:
            self._seal()
        return self.point_cost

    def extend(self, values: array[float], times: array[float], steps: array[int] | None) -> int:
        """Many points, columns already converted (lock held); their cost.
        What fits goes into the open chunk; more seals it and the columns
        become a segment of their own (no copy)."""
        k = len(values)
        n = self.n
        if n + k < self.cap:
            self.cv[n : n + k] = values
            self.ct[n : n + k] = times
            if self.stepped and steps is not None:
                self.cs[n : n + k] = steps
            self.n = n + k
        else:
            self._seal_part()
            self.segs.append((values, times, steps if steps is not None else array("q")))
            self.seg_points += k
        return k * self.point_cost

    def _seal(self) -> None:
        """The open chunk is full: it joins the segments whole, a larger one opens."""
        if not self.segs:
            self.head = self.cstart
        self.segs.append((self.cv, self.ct, self.cs))
        self.seg_points += self.cap
        self._open(min(2 * self.cap, _CHUNK_MAX))

    def _seal_part(self) -> None:
        """Move the open chunk's untaken points into the segments (a copy)
        and empty it in place."""
        s, e = self.cstart, self.n
        if e > s:
            if not self.segs:
                self.head = 0
            steps = self.cs[s:e] if self.stepped else array("q")
            self.segs.append((self.cv[s:e], self.ct[s:e], steps))
            self.seg_points += e - s
        self.n = self.cstart = 0

    @property
    def cost(self) -> int:
        return self.pending() * self.point_cost

    def pending(self) -> int:
        return self.seg_points - self.head + self.n - self.cstart

    def ready(self) -> int:
        return self.seg_points - self.head + self.n - self.cstart

    def _front(
        self, k: int, take: bool
    ) -> tuple[list[array[float]], list[array[float]], list[array[int]]]:
        """Consume the k oldest points; with `take`, their columns' parts
        (whole sealed chunks handed over, the rest copied)."""
        vs: list[array[float]] = []
        ts: list[array[float]] = []
        ss: list[array[int]] = []
        segs = self.segs
        while k > 0 and segs:
            v, t, s = segs[0]
            h = self.head
            avail = len(v) - h
            m = min(k, avail)
            if take:
                if h == 0 and m == avail:
                    vs.append(v)
                    ts.append(t)
                    ss.append(s)
                else:
                    vs.append(v[h : h + m])
                    ts.append(t[h : h + m])
                    ss.append(s[h : h + m] if self.stepped else s)
            k -= m
            if m == avail:
                segs.popleft()
                self.seg_points -= len(v)
                self.head = 0
            else:
                self.head = h + m
        if k > 0:
            c = self.cstart
            if take:
                vs.append(self.cv[c : c + k])
                ts.append(self.ct[c : c + k])
                ss.append(self.cs[c : c + k] if self.stepped else array("q"))
            c += k
            if c >= self.n:
                # All taken: the chunk is written again from its start, or a
                # chunk mostly unused since it was last emptied shrinks.
                used, self.n, c = self.n, 0, 0
                if used < self.cap // 4 and self.cap > _CHUNK_MIN:
                    self._open(max(_CHUNK_MIN, self.cap // 2))
            self.cstart = c
        return vs, ts, ss

    def take(self, max_points: int, max_bytes: int, fresh: bool) -> tuple[Piece | None, int, int]:
        n = min(self.pending(), max_points)
        room = max_bytes - self.overhead
        if n <= 0 or room <= 0:
            return None, 0, 0
        k = min(n, room // self.point_bytes)
        if k <= 0:
            return None, 0, 0
        vs, ts, ss = self._front(k, True)
        return NumericPiece(self, vs, ts, ss), k, k * self.point_bytes + self.overhead

    def drop_front(self, n: int) -> int:
        k = max(1, min(n, self.pending()))
        self._front(k, False)
        return k

    def reject_front(self, max_bytes: int) -> tuple[Rejection, int]:
        step = None
        if self.stepped:
            step = self.segs[0][2][self.head] if self.segs else self.cs[self.cstart]
        size = self.overhead + self.point_bytes
        self._front(1, False)
        message = f"a point of ~{size} bytes cannot fit in a batch of {max_bytes} bytes"
        return Rejection(self.run_id, self.name, self.labels, "LIMIT_EXCEEDED", message, step), 1


def _joined(parts: list[Any], code: str) -> Any:
    if len(parts) == 1:
        return parts[0]
    out = array(code)
    for p in parts:
        out.extend(p)
    return out


class NumericPiece:
    """A prefix of a numeric series' columns, in parts, owned by the sender."""

    __slots__ = ("buffer", "steps", "times", "values")

    def __init__(
        self,
        buffer: NumericBuffer,
        values: list[array[float]],
        times: list[array[float]],
        steps: list[array[int]],
    ) -> None:
        self.buffer = buffer
        self.values = values
        self.times = times
        self.steps = steps

    def add_to(self, batch: pb.Batch) -> None:
        buf = self.buffer
        series = _series_of(batch, buf.run_id, buf.name, buf.labels, buf.description, buf.policy)
        steps = _joined(self.steps, "q") if buf.stepped else array("q")
        columns = scalar_columns(steps, _joined(self.times, "d"), _joined(self.values, "d"))
        series.scalars.MergeFromString(columns)


def _series_of(
    batch: pb.Batch, run_id: str, name: str, labels: Labels, description: str, policy: int
) -> data_pb2.SeriesData:
    rs = batch.series.add()
    rs.run_id = run_id
    series = rs.series
    series.name = name
    if labels:
        series.labels.update(labels)
    if description:
        series.description = description
    if policy:
        series.step_policy = policy  # type: ignore[assignment]
    return series


def _series_overhead(run_id: str, name: str, description: str, labels: Labels) -> int:
    return (
        SERIES_OVERHEAD
        + len(run_id.encode())
        + len(name.encode())
        + len(description.encode())
        + labels_overhead(labels)
    )


class TextBuffer:
    """The columns of one text series: values in a list, times (and steps,
    stepped or not) in arrays. Points before `start` are consumed."""

    __slots__ = (
        "description",
        "labels",
        "name",
        "overhead",
        "point_bytes",
        "point_cost",
        "policy",
        "run_id",
        "start",
        "stepped",
        "steps",
        "text_cost",
        "times",
        "values",
    )

    text = True

    def __init__(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        stepped: bool,
        description: str = "",
        out_of_order: bool = False,
    ) -> None:
        self.run_id = run_id
        self.name = name
        self.labels = labels
        self.stepped = stepped
        self.description = description
        self.policy = (
            data_pb2.STEP_POLICY_OUT_OF_ORDER if out_of_order else data_pb2.STEP_POLICY_UNSPECIFIED
        )
        self.values: list[str] = []
        self.times: array[float] = array("d")
        self.steps: array[int] = array("q")
        self.start = 0
        self.overhead = _series_overhead(run_id, name, description, labels)
        # Per point: time + (step); the values are sized one by one.
        self.point_bytes = DOUBLE_BYTES + (VARINT_MAX_BYTES if stepped else 0)
        # Memory: the columns' bytes per point and a value's list slot and
        # str header; text_chars per value, summed in text_cost.
        self.point_cost = _COLUMN_BYTES * (2 if stepped else 1) + _TEXT_VALUE_BYTES
        self.text_cost = 0

    def add(self, value: str, step: int | None, time: float) -> int:
        """One point (lock held); its memory cost. A value that is not a str
        or a step of the wrong type raises, and nothing is recorded."""
        if not isinstance(value, str):
            raise TypeError(f"series {self.name!r}: a text series takes str values")
        self.times.append(time)
        if self.stepped:
            try:
                self.steps.append(step)  # type: ignore[arg-type]
            except BaseException:
                del self.times[-1]
                raise
        self.values.append(value)
        chars = text_chars(value)
        self.text_cost += chars
        return self.point_cost + chars

    def extend(self, values: list[str], times: array[float], steps: array[int] | None) -> int:
        """Many points, columns already converted (lock held); their cost."""
        self.values.extend(values)
        self.times.extend(times)
        if steps is not None:
            self.steps.extend(steps)
        chars = sum(text_chars(v) for v in values)
        self.text_cost += chars
        return len(values) * self.point_cost + chars

    @property
    def cost(self) -> int:
        return self.pending() * self.point_cost + self.text_cost

    def pending(self) -> int:
        return len(self.values) - self.start

    def ready(self) -> int:
        return len(self.values) - self.start

    def _reset(self) -> None:
        self.values = []
        self.times = array("d")
        self.steps = array("q")
        self.start = 0
        self.text_cost = 0

    def _text_chars(self, k: int) -> int:
        """text_chars of the next k pending values."""
        s = self.start
        return sum(text_chars(v) for v in self.values[s : s + k])

    def _advance(self, k: int) -> None:
        self.start += k
        if self.start >= len(self.values):
            self._reset()
        elif self.start >= _COMPACT_AT and self.start * 2 >= len(self.values):
            s = self.start
            del self.values[:s]
            del self.times[:s]
            if self.stepped:
                del self.steps[:s]
            self.start = 0

    def _text_bytes(self, i: int) -> int:
        s: str = self.values[i]
        return len(s) + 6 if s.isascii() else 4 * len(s) + 6

    def take(self, max_points: int, max_bytes: int, fresh: bool) -> tuple[Piece | None, int, int]:
        n = min(self.pending(), max_points)
        room = max_bytes - self.overhead
        if n <= 0 or room <= 0:
            return None, 0, 0
        size = k = chars = 0
        while k < n:
            value = self.values[self.start + k]
            c = text_chars(value)
            cost = self.point_bytes + c + 6
            if size + cost > room:
                break
            size += cost
            chars += c
            k += 1
        if k <= 0:
            return None, 0, 0
        self.text_cost -= chars
        s, e = self.start, self.start + k
        if s == 0 and e == len(self.values):  # the whole buffer: hand the columns over
            piece = TextPiece(self, self.values, self.times, self.steps)
            self._reset()
        else:
            steps = self.steps[s:e] if self.stepped else array("q")
            piece = TextPiece(self, self.values[s:e], self.times[s:e], steps)
            self._advance(k)
        return piece, k, size + self.overhead

    def drop_front(self, n: int) -> int:
        k = max(1, min(n, self.pending()))
        self.text_cost -= self._text_chars(k)
        self._advance(k)
        return k

    def reject_front(self, max_bytes: int) -> tuple[Rejection, int]:
        step = self.steps[self.start] if self.stepped else None
        size = self.overhead + self.point_bytes + self._text_bytes(self.start)
        self.text_cost -= self._text_chars(1)
        self._advance(1)
        message = f"a point of ~{size} bytes cannot fit in a batch of {max_bytes} bytes"
        return Rejection(self.run_id, self.name, self.labels, "LIMIT_EXCEEDED", message, step), 1


class TextPiece:
    """A prefix of a text series' columns, owned by the sender."""

    __slots__ = ("buffer", "steps", "times", "values")

    def __init__(
        self, buffer: TextBuffer, values: list[str], times: array[float], steps: array[int]
    ) -> None:
        self.buffer = buffer
        self.values = values
        self.times = times
        self.steps = steps

    def add_to(self, batch: pb.Batch) -> None:
        buf = self.buffer
        series = _series_of(batch, buf.run_id, buf.name, buf.labels, buf.description, buf.policy)
        series.scalars.MergeFromString(scalar_columns(self.steps, self.times, None))
        series.scalars.text_values.extend(self.values)


class MessageBuffer:
    """The messages of one series, sent whole and in order: `items` encoded
    (SeriesData, points, size), `raw` appended by log calls and not yet
    encoded (the sender moves them over with take_raw / put_ready). `open`:
    the RowsItem log_row is extending (the last raw item), if any."""

    __slots__ = (
        "cost",
        "encoding",
        "items",
        "labels",
        "name",
        "open",
        "overhead",
        "points",
        "raw",
        "ready_points",
        "run_id",
    )

    def __init__(self, run_id: str, name: str, labels: Labels) -> None:
        self.run_id = run_id
        self.name = name
        self.labels = labels
        self.overhead = SERIES_OVERHEAD + len(run_id.encode())
        self.items: deque[tuple[data_pb2.SeriesData, int, int]] = deque()
        self.raw: list[Encodable] = []
        self.open: Any = None  # a steplog._tables.RowsItem
        self.encoding = 0  # points taken by take_raw, not yet put back
        self.points = 0  # pending: encoded + raw + encoding
        self.ready_points = 0  # encoded
        self.cost = 0  # memory: encoded sizes plus MESSAGE_OVERHEAD_BYTES each, raw costs

    def append(self, series: data_pb2.SeriesData, points: int, size: int) -> int:
        """Queue an encoded message of `size` bytes; the memory it costs. A
        pre-built message goes behind the raw items queued before it."""
        if self.raw or self.encoding:
            item = Encoded(series, points, size)
            self.add_raw(item)
            return item.cost
        self.items.append((series, points, size + self.overhead))
        self.points += points
        self.ready_points += points
        cost = size + MESSAGE_OVERHEAD_BYTES
        self.cost += cost
        return cost

    def add_raw(self, item: Encodable) -> None:
        self.raw.append(item)
        self.open = None
        self.points += item.points
        self.cost += item.cost

    def take_raw(self) -> list[Encodable]:
        """(lock held) The raw items, in order, for the sender to encode."""
        items, self.raw, self.open = self.raw, [], None
        self.encoding += sum(i.points for i in items)
        return items

    def put_ready(
        self, encoded: list[tuple[Encodable, list[tuple[data_pb2.SeriesData, int, int]]]]
    ) -> int:
        """(lock held) The messages (series, points, size) of items take_raw
        gave out, in order; an item with none failed to encode and is gone.
        Returns the change in memory cost."""
        delta = 0
        for item, messages in encoded:
            self.encoding -= item.points
            delta -= item.cost
            if not messages:
                self.points -= item.points
            for series, points, size in messages:
                self.items.append((series, points, size + self.overhead))
                self.ready_points += points
                delta += size + MESSAGE_OVERHEAD_BYTES
        self.cost += delta
        return delta

    def _popleft(self) -> tuple[data_pb2.SeriesData, int, int]:
        item = self.items.popleft()
        self.cost -= item[2] - self.overhead + MESSAGE_OVERHEAD_BYTES
        self.ready_points -= item[1]
        return item

    def pending(self) -> int:
        return self.points

    def ready(self) -> int:
        return self.ready_points

    def take(self, max_points: int, max_bytes: int, fresh: bool) -> tuple[Piece | None, int, int]:
        taken: list[data_pb2.SeriesData] = []
        points = size = 0
        while self.items:
            series, n, b = self.items[0]
            if size + b > max_bytes:
                break
            if points + n > max_points and not (fresh and not taken):
                break
            self._popleft()
            taken.append(series)
            points += n
            size += b
        self.points -= points
        if not taken:
            return None, 0, 0
        return MessagePiece(self.run_id, taken), points, size

    def drop_front(self, n: int) -> int:
        """Drop the oldest messages, then the oldest raw items (whole)."""
        dropped = 0
        while self.items and dropped < n:
            dropped += self._popleft()[1]
        while self.raw and dropped < n:
            item = self.raw.pop(0)
            if item is self.open:
                self.open = None
            dropped += item.points
            self.cost -= item.cost
        self.points -= dropped
        return dropped

    def reject_front(self, max_bytes: int) -> tuple[Rejection, int]:
        _, n, b = self._popleft()
        self.points -= n
        message = f"a message of {b} bytes cannot fit in a batch of {max_bytes} bytes"
        return Rejection(self.run_id, self.name, self.labels, "LIMIT_EXCEEDED", message), n


class MessagePiece:
    __slots__ = ("items", "run_id")

    def __init__(self, run_id: str, items: list[data_pb2.SeriesData]) -> None:
        self.run_id = run_id
        self.items = items

    def add_to(self, batch: pb.Batch) -> None:
        for series in self.items:
            rs = batch.series.add()
            rs.run_id = self.run_id
            rs.series.CopyFrom(series)
