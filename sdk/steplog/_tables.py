"""Tables and evaluation documents on the client: rows buffered per series,
columnar `TableColumns`, evaluation `SeriesData`.

`run.log_row` is called in training loops, so a row must cost a couple of
microseconds, not a protobuf message: `RowBuffers.add` checks the cell types
and extends its series' buffer with the row's values (rows with the same
columns share one segment, one flat list), and hands the buffer to the writer
(`BatchWriter.log_series`) as one columnar message when it holds enough rows,
when its oldest row has waited a linger period, or when the writer flushes.
Column types are decided then, per column: floats (and ints among floats) ->
double, ints -> int64, bools -> bool, strings -> string, None -> a missing
cell. A column holding values of several
of those kinds is sent as one part per kind; the service keeps the rows whose
cell has the column's type (fixed by its first value) and rejects the others,
naming the column, so nothing is converted behind the user's back.

Buffering needs the writer to drain the buffers when it flushes
(`BatchWriter.add_flush_hook`); a writer without that hook gets every row as
its own message, which is slower but loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, str, Labels]

# A buffer is handed to the writer at this many rows or cells...
MAX_ROWS = 8192
MAX_CELLS = 131_072
# ...or once its oldest row has waited this long (seconds), unless the writer
# says otherwise (its flush_interval).
DEFAULT_LINGER = 0.2
# A message larger than this is split by rows (the writer's batches hold 4 MiB
# by default; half leaves room for the rest of a batch).
DEFAULT_MESSAGE_BYTES = 2 * 1024 * 1024

_FLOAT_TYPES = frozenset({float, np.float64, np.float32, np.float16})
_INT_TYPES = frozenset({int, np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32})
_BOOL_TYPES = frozenset({bool, np.bool_})
_CELL_TYPES = _FLOAT_TYPES | _INT_TYPES | _BOOL_TYPES | {str, type(None)}
_CELL_CLASSES = (str, float, int, np.floating, np.integer, np.bool_)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_DOUBLE = data_pb2.COLUMN_TYPE_DOUBLE
_INT64 = data_pb2.COLUMN_TYPE_INT64
_STRING = data_pb2.COLUMN_TYPE_STRING
_BOOL = data_pb2.COLUMN_TYPE_BOOL

SCHEMA_VERSIONS = {
    "confusion_matrix": "1.0.0",
    "accuracy_table": "1.0.1",
    "predictions": "1.0.0",
    "residuals": "1.0.0",
}


# -- cells and columns ------------------------------------------------------------------


def _check_column_names(table: str, names: Sequence[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name or len(name) > 255 or _CONTROL.search(name):
            raise InvalidArgumentError(
                f"table {table!r}: column name {name!r} must be 1..255 characters, "
                "no control characters",
                field="name",
            )


def _check_cells(table: str, row: Mapping[str, Any]) -> None:
    """The slow path of log_row: name the column whose value cannot be a cell."""
    for key, value in row.items():
        if value is not None and not isinstance(value, _CELL_CLASSES):
            raise InvalidArgumentError(
                f"table {table!r}: column {key!r} value must be a number, string, bool or "
                f"None, not {type(value).__name__}",
                field=key,
            )


def _kind(t: type) -> int:
    if t in _BOOL_TYPES or issubclass(t, (bool, np.bool_)):
        return _BOOL
    if t in _FLOAT_TYPES or issubclass(t, (float, np.floating)):
        return _DOUBLE
    if t in _INT_TYPES or issubclass(t, (int, np.integer)):
        return _INT64
    return _STRING


def column_parts(name: str, values: Sequence[Any]) -> list[data_pb2.Column]:
    """One column's cells -> one Column per kind of value (usually one).
    Ints among floats become doubles; None marks a missing cell."""
    types = set(map(type, values))
    missing = type(None) in types
    types.discard(type(None))
    kinds: dict[int, None] = {}
    for t in types:
        kinds[_kind(t)] = None
    if _DOUBLE in kinds and _INT64 in kinds:
        del kinds[_INT64]
    if not kinds:
        kinds[_DOUBLE] = None
    if len(kinds) == 1:
        (only,) = kinds
        return [_column(name, only, values, missing)]
    by_kind = [_kind(type(v)) if v is not None else 0 for v in values]
    parts = []
    for k in sorted(kinds):
        same = [kk == k or (k == _DOUBLE and kk == _INT64) for kk in by_kind]
        cells = [v if s else None for v, s in zip(values, same, strict=True)]
        parts.append(_column(name, k, cells, True))
    return parts


def _column(name: str, kind: int, values: Sequence[Any], missing: bool) -> data_pb2.Column:
    col = data_pb2.Column(name=name, type=kind)  # type: ignore[arg-type]
    if kind == _DOUBLE:
        col.doubles.extend([0.0 if v is None else v for v in values] if missing else values)
    elif kind == _INT64:
        cells = [0 if v is None else v for v in values] if missing else values
        try:
            col.ints.extend(cells)
        except (ValueError, OverflowError, TypeError):  # beyond int64: keep the magnitude
            col.type = _DOUBLE
            col.ClearField("ints")
            col.doubles.extend(float(v) for v in cells)
    elif kind == _BOOL:
        col.bools.extend([False if v is None else bool(v) for v in values])
    elif not missing and all(type(v) is str for v in values):
        col.strings.extend(values)
    else:
        col.strings.extend(["" if v is None else str(v) for v in values])
    if missing:
        col.present.extend([v is not None for v in values])
    return col


def fill_table(
    table: data_pb2.TableColumns,
    columns: Mapping[str, Sequence[Any]],
    times: Sequence[float],
    steps: Sequence[int] | None = None,
) -> data_pb2.TableColumns:
    """{column: [cells]} -> TableColumns, built in place (a message built
    elsewhere would be copied into its SeriesData)."""
    table.row_count = len(times)
    table.times.extend(times)
    if steps is not None:
        table.steps.extend(steps)
    for name, values in columns.items():
        table.columns.extend(column_parts(name, values))
    return table


def table_message(
    columns: Mapping[str, Sequence[Any]],
    times: Sequence[float],
    steps: Sequence[int] | None = None,
) -> data_pb2.TableColumns:
    """{column: [cells]} -> TableColumns (every column as long as times)."""
    return fill_table(data_pb2.TableColumns(), columns, times, steps)


def _may_exceed(table: data_pb2.TableColumns, max_bytes: int) -> bool:
    """Whether the message could be larger than max_bytes, without measuring
    it (ByteSize encodes it): a number takes at most 11 bytes a cell."""
    n = table.row_count
    if any(c.type == _STRING for c in table.columns):
        return True
    return 64 + 20 * n + sum(len(c.name) + 16 + 12 * n for c in table.columns) > max_bytes


def table_series_messages(
    series: data_pb2.SeriesData,
    columns: Mapping[str, Sequence[Any]],
    times: Sequence[float],
    steps: Sequence[int] | None,
    max_bytes: int,
) -> list[data_pb2.SeriesData]:
    """SeriesData (a copy of `series` with a table) of at most max_bytes each,
    split by rows (one row may exceed it)."""
    out = data_pb2.SeriesData()
    out.CopyFrom(series)
    fill_table(out.table, columns, times, steps)
    n = len(times)
    if n <= 1 or not _may_exceed(out.table, max_bytes) or out.ByteSize() <= max_bytes:
        return [out]
    half = n // 2
    parts = []
    for lo, hi in ((0, half), (half, n)):
        parts += table_series_messages(
            series,
            {k: v[lo:hi] for k, v in columns.items()},
            times[lo:hi],
            None if steps is None else steps[lo:hi],
            max_bytes,
        )
    return parts


def split_messages(
    columns: Mapping[str, Sequence[Any]],
    times: Sequence[float],
    steps: Sequence[int] | None,
    max_bytes: int,
) -> list[data_pb2.TableColumns]:
    """TableColumns messages of at most max_bytes each (one row may exceed it)."""
    return [
        s.table
        for s in table_series_messages(data_pb2.SeriesData(), columns, times, steps, max_bytes)
    ]


# -- log_row buffers ----------------------------------------------------------------------


class _Rows:
    """The buffered rows of one table series. Rows with the same column names
    form a segment whose values sit in one flat list, row after row: `extend`
    per row creates no object the cyclic GC must track, and the columns come
    back out as slices."""

    __slots__ = ("cells", "count", "description", "first", "flat", "names", "segments", "times")

    def __init__(self, description: str) -> None:
        self.description = description
        self.segments: list[tuple[tuple[str, ...], list[Any]]] = []
        self.names: tuple[str, ...] | None = None
        self.flat: list[Any] = []
        self.times: list[float] = []
        self.count = 0
        self.cells = 0
        self.first = 0.0

    def columns(self) -> dict[str, list[Any]]:
        """{column: cells}, None where a row lacked the column."""
        out: dict[str, list[Any]] = {}
        start = 0
        for names, flat in self.segments:
            k = len(names)
            n = len(flat) // k if k else 0
            for j, name in enumerate(names):
                col = out.get(name)
                if col is None:
                    col = out[name] = [None] * start
                elif len(col) < start:
                    col.extend([None] * (start - len(col)))
                col.extend(flat[j::k])
            start += n
        for col in out.values():
            if len(col) < start:
                col.extend([None] * (start - len(col)))
        return out


class RowBuffers:
    """The log_row buffers of one writer, drained into `log_series`."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        settings = getattr(writer, "settings", None)
        self.linger = float(getattr(settings, "flush_interval", DEFAULT_LINGER))
        max_batch = getattr(settings, "max_batch_bytes", 2 * DEFAULT_MESSAGE_BYTES)
        self.max_message_bytes = max(4096, int(max_batch) // 2)
        hook: Callable[[Callable[[], None]], None] | None = getattr(writer, "add_flush_hook", None)
        self.buffered = callable(hook)
        # Without the hook nothing may wait here: every row goes out at once.
        self.max_rows = MAX_ROWS if self.buffered else 1
        self._reset()
        if hook is not None and self.buffered:
            hook(self.drain)

    def _reset(self) -> None:
        """Fresh state (also in a forked child: the parent's rows stay its own)."""
        self._lock = threading.Lock()  # the buffers
        self._send_lock = threading.Lock()  # take-and-send, so a series' rows keep their order
        self._buffers: dict[SeriesKey, _Rows] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(
        self,
        run_id: str,
        name: str,
        labels: Labels,
        description: str,
        row: Mapping[str, Any],
        now: float,
    ) -> None:
        """Buffer one row; hand the series' rows over when due."""
        values = row.values()
        if not _CELL_TYPES.issuperset(map(type, values)):
            _check_cells(name, row)
        key = (run_id, name, labels)
        names = tuple(row)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = _Rows(description)
                buf.first = now
                if self.buffered:
                    self._start_timer()
            if names != buf.names:
                _check_column_names(name, names)
                buf.names = names
                buf.flat = []
                buf.segments.append((names, buf.flat))
            buf.flat.extend(values)
            buf.times.append(now)
            buf.count += 1
            buf.cells += len(names)
            due = (
                buf.count >= self.max_rows
                or buf.cells >= MAX_CELLS
                or now - buf.first >= self.linger
            )
        if due:
            self.drain(key)

    def drain(self, key: SeriesKey | None = None, older_than: float | None = None) -> None:
        """Hand over the buffered rows (of one series, or those waiting longer
        than `older_than` seconds), oldest series first."""
        now = time.time()
        with self._send_lock:
            with self._lock:
                if key is not None:
                    taken = [(key, self._buffers.pop(key))] if key in self._buffers else []
                else:
                    taken = [
                        (k, b)
                        for k, b in self._buffers.items()
                        if older_than is None or now - b.first >= older_than
                    ]
                    for k, _ in taken:
                        del self._buffers[k]
            for k, buf in sorted(taken, key=lambda kb: kb[1].first):
                self._send(k, buf)

    def _send(self, key: SeriesKey, buf: _Rows) -> None:
        run_id, name, labels = key
        head = data_pb2.SeriesData(name=name, labels=dict(labels), description=buf.description)
        for series in table_series_messages(
            head, buf.columns(), buf.times, None, self.max_message_bytes
        ):
            self._writer.log_series(run_id, series)

    def _start_timer(self) -> None:
        """(lock held) Make sure rows that stop arriving still go out after
        the linger period, not only at the next flush."""
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._timer, name="steplog-rows", daemon=True)
            self._thread.start()

    def _timer(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            wake.clear()
            while True:
                with self._lock:
                    if not self._buffers:
                        break
                    oldest = min(b.first for b in self._buffers.values())
                delay = oldest + self.linger - time.time()
                if delay > 0:
                    wake.wait(delay)
                    wake.clear()
                self.drain(older_than=self.linger)


_registry: weakref.WeakKeyDictionary[Any, RowBuffers] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def row_buffers(writer: Any) -> RowBuffers:
    """The RowBuffers of a writer (one per writer, created on first use)."""
    rows = _registry.get(writer)
    if rows is None:
        with _registry_lock:
            rows = _registry.get(writer)
            if rows is None:
                rows = _registry[writer] = RowBuffers(writer)
    return rows


def _after_fork_in_child() -> None:
    for rows in list(_registry.values()):
        rows._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- log_table ----------------------------------------------------------------------------


def table_series(
    name: str,
    labels: Labels,
    value: Mapping[str, Any],
    description: str,
    steps: Sequence[int] | None,
    max_message_bytes: int,
) -> list[data_pb2.SeriesData]:
    """log_table's value ({column: [cells]}, Azure's shape) -> SeriesData
    messages, split by rows to fit the writer's batches."""
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"table {name!r}: value must be a dict of column -> list of values, "
            f"not {type(value).__name__}",
            field="value",
        )
    columns: dict[str, list[Any]] = {}
    for key, cells in value.items():
        if isinstance(cells, np.ndarray):
            cells = cells.tolist()
        elif isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence):
            raise InvalidArgumentError(
                f"table {name!r}: column {key!r} must be a list of values", field="value"
            )
        columns[key] = list(cells)
    _check_column_names(name, list(columns))
    lengths = {len(c) for c in columns.values()}
    if len(lengths) > 1:
        raise InvalidArgumentError(
            f"table {name!r}: columns have different lengths {sorted(lengths)}", field="value"
        )
    n = lengths.pop() if lengths else 0
    for key, cells in columns.items():
        for cell in cells:
            if type(cell) not in _CELL_TYPES:
                _check_cells(name, {key: cell})
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) != n:
            raise InvalidArgumentError(
                f"table {name!r}: {len(steps)} steps for {n} rows", field="steps"
            )
    head = data_pb2.SeriesData(name=name, labels=dict(labels), description=description)
    return table_series_messages(head, columns, [time.time()] * n, steps, max_message_bytes)


# -- evaluation documents -------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def evaluation_document(schema: str, value: Mapping[str, Any] | str) -> str:
    """A dict or JSON string (as Azure's log_confusion_matrix & co. take) ->
    the JSON text to send. A missing schema_type or schema_version is filled
    in; the service validates the rest and names any rule that fails."""
    method = f"log_{schema}"
    if isinstance(value, str):
        try:
            doc = json.loads(value)
        except ValueError as exc:
            raise InvalidArgumentError(
                f"{method}: value is not valid JSON: {exc}", field="value"
            ) from None
    elif isinstance(value, Mapping):
        doc = dict(value)
    else:
        raise InvalidArgumentError(
            f"{method}: value must be a dict or a JSON string, not {type(value).__name__}",
            field="value",
        )
    if not isinstance(doc, dict):
        raise InvalidArgumentError(f"{method}: the document must be a JSON object", field="value")
    given = doc.setdefault("schema_type", schema)
    if given != schema:
        raise InvalidArgumentError(
            f"{method}: the document's schema_type is {given!r}, not {schema!r}",
            field="schema_type",
        )
    doc.setdefault("schema_version", SCHEMA_VERSIONS[schema])
    try:
        return json.dumps(doc, allow_nan=False, default=_json_default)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{method}: value is not JSON: {exc}", field="value") from None


def evaluation_series(
    schema: str,
    name: str,
    labels: Labels,
    value: Mapping[str, Any] | str,
    description: str,
    step: int | None,
) -> data_pb2.SeriesData:
    points = data_pb2.EvaluationPoints(
        times=[time.time()], documents=[evaluation_document(schema, value)]
    )
    if step is not None:
        points.steps.append(int(step))
    return data_pb2.SeriesData(
        name=name, labels=dict(labels), description=description, evaluations=points
    )
