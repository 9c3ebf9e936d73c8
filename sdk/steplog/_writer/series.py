"""Per-series column buffers (the hot path's data) and how they become `RunSeries`.

`log()` appends a point to three `array` columns of its series (values, times,
steps) under the writer's lock: no protobuf, no per-point Python objects kept
(8 bytes a column), and a bad value fails at the caller's line, not later in the
sender thread. The sender takes prefixes of those columns under the same lock
(whole columns are handed over without copying when they fit) and builds the
protobuf outside it, writing the packed fields as raw bytes: upb parses a packed
double array about 40x faster than it `extend()`s one from Python numbers.

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
from collections.abc import MutableSequence
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


class ScalarBuffer:
    """The columns of one scalar series: numeric (array 'd') or text (list),
    stepped (steps array 'q') or not. Points before `start` are consumed."""

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
        "text",
        "text_cost",
        "times",
        "values",
    )

    def __init__(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        text: bool,
        stepped: bool,
        description: str = "",
        out_of_order: bool = False,
    ) -> None:
        self.run_id = run_id
        self.name = name
        self.labels = labels
        self.text = text
        self.stepped = stepped
        self.description = description
        self.policy = (
            data_pb2.STEP_POLICY_OUT_OF_ORDER if out_of_order else data_pb2.STEP_POLICY_UNSPECIFIED
        )
        self.values: MutableSequence[Any] = [] if text else array("d")
        self.times: array[float] = array("d")
        self.steps: array[int] = array("q")
        self.start = 0
        self.overhead = (
            SERIES_OVERHEAD
            + len(run_id.encode())
            + len(name.encode())
            + len(description.encode())
            + labels_overhead(labels)
        )
        # Per point: time + (step) + value; text values are sized one by one.
        self.point_bytes = DOUBLE_BYTES + (VARINT_MAX_BYTES if stepped else 0)
        if not text:
            self.point_bytes += DOUBLE_BYTES
        # Memory: the columns' bytes per point; text adds text_chars per value,
        # summed in text_cost over the pending values (the writer adds them).
        self.point_cost = _COLUMN_BYTES * (2 if stepped else 1)
        self.point_cost += _TEXT_VALUE_BYTES if text else _COLUMN_BYTES
        self.text_cost = 0

    @property
    def cost(self) -> int:
        return self.pending() * self.point_cost + self.text_cost

    def pending(self) -> int:
        return len(self.values) - self.start

    def ready(self) -> int:
        return len(self.values) - self.start

    def repair(self) -> None:
        """After an append failed half-way (a value of the wrong type), cut
        every column back to the points that are complete."""
        n = min(len(self.values), len(self.times))
        if self.stepped:
            n = min(n, len(self.steps))
        del self.values[n:]
        del self.times[n:]
        if self.stepped:
            del self.steps[n:]
        if n <= self.start:
            self._reset()

    def _reset(self) -> None:
        self.values = [] if self.text else array("d")
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
        if self.text:
            size = k = chars = 0
            while k < n:
                value: str = self.values[self.start + k]
                c = text_chars(value)
                cost = self.point_bytes + c + 6
                if size + cost > room:
                    break
                size += cost
                chars += c
                k += 1
            self.text_cost -= chars if k > 0 else 0
        else:
            k = min(n, room // self.point_bytes)
            size = k * self.point_bytes
        if k <= 0:
            return None, 0, 0
        s, e = self.start, self.start + k
        if s == 0 and e == len(self.values):  # the whole buffer: hand the columns over
            piece = ScalarPiece(self, self.values, self.times, self.steps)
            self._reset()
        else:
            steps = self.steps[s:e] if self.stepped else array("q")
            piece = ScalarPiece(self, self.values[s:e], self.times[s:e], steps)
            self._advance(k)
        return piece, k, size + self.overhead

    def drop_front(self, n: int) -> int:
        k = max(1, min(n, self.pending()))
        if self.text:
            self.text_cost -= self._text_chars(k)
        self._advance(k)
        return k

    def reject_front(self, max_bytes: int) -> tuple[Rejection, int]:
        step = self.steps[self.start] if self.stepped else None
        size = self.overhead + self.point_bytes + (self._text_bytes(self.start) if self.text else 0)
        if self.text:
            self.text_cost -= self._text_chars(1)
        self._advance(1)
        message = f"a point of ~{size} bytes cannot fit in a batch of {max_bytes} bytes"
        return Rejection(self.run_id, self.name, self.labels, "LIMIT_EXCEEDED", message, step), 1


class ScalarPiece:
    """A prefix of a scalar series' columns, owned by the sender."""

    __slots__ = ("buffer", "steps", "times", "values")

    def __init__(
        self,
        buffer: ScalarBuffer,
        values: MutableSequence[Any],
        times: array[float],
        steps: array[int],
    ) -> None:
        self.buffer = buffer
        self.values = values
        self.times = times
        self.steps = steps

    def add_to(self, batch: pb.Batch) -> None:
        buf = self.buffer
        rs = batch.series.add()
        rs.run_id = buf.run_id
        series = rs.series
        series.name = buf.name
        if buf.labels:
            series.labels.update(buf.labels)
        if buf.description:
            series.description = buf.description
        if buf.policy:
            series.step_policy = buf.policy
        numeric = self.values if isinstance(self.values, array) else None
        series.scalars.MergeFromString(scalar_columns(self.steps, self.times, numeric))
        if numeric is None:
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
