"""Tables and evaluation documents on the client: what `log_row`,
`log_table` and `log_confusion_matrix` & co. queue, and how it becomes
columnar `TableColumns` / evaluation `SeriesData`.

The caller's thread only checks and copies: `row_cost` checks a row's cell
types (the error names the column) and the writer extends the series'
`RowsItem` with the row's values under its lock (rows with the same columns
share one segment, one flat list); `table_item` copies log_table's columns;
`evaluation_item` turns a document into its JSON text (the check and the
copy of the caller's dict in one). No protobuf is built there. The writer's
one background thread encodes the items (`encode`, the contract is in
steplog._writer.items) when it cuts a batch:
every flush interval, when a batch's worth of points is buffered, on flush,
spill and close. Rows whose cells had the same plain types (the signature
log_row checked) are written column by column without a look at each cell
(`RowsItem.kinds`). Otherwise column types are decided then, per column: floats (and
ints among floats) -> double, ints -> int64, bools -> bool, strings ->
string, None -> a missing cell. A column holding values of several of
those kinds is sent as one part per kind; the service keeps the rows whose
cell has the column's type (fixed by its first value) and rejects the
others, naming the column, so nothing is converted behind the user's back.

Why one module of this length: the checks log_row makes on the caller's
thread and the encoding the writer does later must agree cell for cell
(types, byte costs), so they live side by side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2

Labels = tuple[tuple[str, str], ...]

# log_row's rows of a series go into one message of at most this many rows
# or cells (a later row starts the next).
MAX_ROWS = 8192
MAX_CELLS = 131_072

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
    kinds: Mapping[str, int] | None = None,
) -> data_pb2.TableColumns:
    """{column: [cells]} -> TableColumns, built in place (a message built
    elsewhere would be copied into its SeriesData). Sender thread only.
    `kinds`: {column: wire type} of columns known to hold only cells of that
    one plain Python type (RowsItem.kinds), written without a look at each."""
    table.row_count = len(times)
    table.times.extend(times)
    if steps is not None:
        table.steps.extend(steps)
    for name, values in columns.items():
        kind = kinds.get(name) if kinds is not None else None
        if kind is None:
            table.columns.extend(column_parts(name, values))
        elif kind == _INT64:
            table.columns.append(_column(name, kind, values, False))
        else:
            col = table.columns.add(name=name, type=kind)
            if kind == _DOUBLE:
                col.doubles.extend(values)
            elif kind == _BOOL:
                col.bools.extend(values)
            else:
                col.strings.extend(values)
    return table


def _may_exceed(
    table: data_pb2.TableColumns,
    max_bytes: int,
    columns: Mapping[str, Sequence[Any]],
    kinds: Mapping[str, int] | None,
) -> bool:
    """Whether the message could be larger than max_bytes, without measuring
    it (ByteSize encodes it): a number takes at most 11 bytes a cell; a
    string cell of a column known to hold only str (`kinds`) at most 4
    bytes a character and 11 of tag and length (len() of each is counted in
    C); any other string column: it could."""
    n = table.row_count
    bound = 64 + 20 * n
    for c in table.columns:
        bound += len(c.name) + 16 + 12 * n
        if c.type == _STRING:
            if kinds is None or kinds.get(c.name) != _STRING:
                return True
            bound += 4 * sum(map(len, columns[c.name]))
    return bound > max_bytes


def table_series_messages(
    series: data_pb2.SeriesData,
    columns: Mapping[str, Sequence[Any]],
    times: Sequence[float],
    steps: Sequence[int] | None,
    max_bytes: int,
    kinds: Mapping[str, int] | None = None,
) -> list[data_pb2.SeriesData]:
    """SeriesData (a copy of `series` with a table) of at most max_bytes each,
    split by rows (one row may exceed it). `kinds` as fill_table's."""
    out = data_pb2.SeriesData()
    out.CopyFrom(series)
    fill_table(out.table, columns, times, steps, kinds)
    n = len(times)
    if (
        n <= 1
        or not _may_exceed(out.table, max_bytes, columns, kinds)
        or out.ByteSize() <= max_bytes
    ):
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
            kinds,
        )
    return parts


# -- deferred items: what the caller's thread queues, encoded by the sender ----------------


class RowsItem:
    """The rows log_row buffered for one table series, not yet encoded. Rows
    with the same column names form a segment whose values sit in one flat
    list, row after row: `extend` per row creates no object the cyclic GC
    must track, and the columns come back out as slices. Each segment also
    keeps its rows' cell types (`sigs`: the one signature all its rows share,
    None once two differ), so a column whose cells are all of one plain type
    is encoded without looking at each cell again. Appended under the
    writer's lock; encoded on the sender thread (`encode`)."""

    __slots__ = (
        "_cells_before",
        "cost",
        "description",
        "flat",
        "full_at",
        "names",
        "points",
        "segments",
        "sig",
        "sigs",
        "times",
    )

    def __init__(self, description: str) -> None:
        self.description = description
        self.segments: list[tuple[tuple[str, ...], list[Any]]] = []
        self.sigs: list[tuple[type, ...] | None] = []  # per segment
        self.names: tuple[str, ...] | None = None
        self.sig: tuple[type, ...] | None = None  # the open segment's, or None (mixed)
        self.flat: list[Any] = []
        self.times: list[float] = []
        self.points = 0
        self.cost = 0
        self.full_at = MAX_ROWS  # the item is full once it holds this many rows
        self._cells_before = 0  # cells of the segments before the open one

    @property
    def cells(self) -> int:
        return self._cells_before + len(self.flat)

    def add(
        self,
        names: tuple[str, ...],
        values: Any,
        now: float,
        cost: int,
        sig: tuple[type, ...] | None = None,
    ) -> bool:
        """Append one row (names already checked); whether the item is full.
        `sig`: the row's cell types (row_signature), None if not known."""
        if names != self.names:
            self._cells_before += len(self.flat)
            self.names = names
            self.flat = []
            self.segments.append((names, self.flat))
            self.sigs.append(sig)
            self.sig = sig
            k = len(names)
            room = MAX_CELLS - self._cells_before
            rows = -(-room // k) if k else MAX_ROWS
            self.full_at = max(self.points + 1, min(MAX_ROWS, self.points + rows))
        elif sig is not self.sig and self.sig is not None:
            self.sig = self.sigs[-1] = None
        self.flat.extend(values)
        self.times.append(now)
        self.points += 1
        self.cost += cost
        return self.points >= self.full_at

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

    def kinds(self) -> dict[str, int] | None:
        """{column: its one wire type} when the item is one segment whose rows
        all had the same plain cell types (float, int, bool, str: no None, no
        numpy scalar), so no cell needs looking at again; else None."""
        if len(self.segments) != 1 or self.sigs[0] is None:
            return None
        names = self.segments[0][0]
        out: dict[str, int] = {}
        for name, t in zip(names, self.sigs[0], strict=True):
            kind = _PLAIN_KINDS.get(t)
            if kind is None:
                return None
            out[name] = kind
        return out

    def encode(self, name: str, labels: Labels, max_bytes: int) -> list[data_pb2.SeriesData]:
        head = data_pb2.SeriesData(name=name, labels=dict(labels), description=self.description)
        return table_series_messages(
            head, self.columns(), self.times, None, max_bytes, self.kinds()
        )


# The wire type of a cell of exactly this Python type (the fast path of
# RowsItem.kinds; bool before int does not matter: type() is exact).
_PLAIN_KINDS: dict[type, int] = {float: _DOUBLE, int: _INT64, bool: _BOOL, str: _STRING}


# What a buffered cell costs in memory (its list slot and a number object);
# a string cell also its characters.
CELL_BYTES = 32
ROW_BYTES = 64


def row_cost(table: str, row: Mapping[str, Any]) -> int:
    """Check a row's cells (the error names the column) and return the bytes
    it holds in memory while buffered. A row's cell types (its signature)
    are checked once; later rows alike only count their strings."""
    values = tuple(row.values())
    strings = row_signature(table, row, values)[1]
    cost = ROW_BYTES + CELL_BYTES * len(values)
    for i in strings:
        v = values[i]
        cost += len(v) if v.isascii() else 4 * len(v)
    return cost


def row_signature(
    table: str, row: Mapping[str, Any], values: tuple[Any, ...]
) -> tuple[tuple[type, ...], tuple[int, ...]]:
    """(the row's cell types, the positions of its strings), checked (the
    error names the column). The signature returned is the one kept in the
    cache, so rows alike get the same object (RowsItem compares them by
    identity)."""
    signature = tuple(map(type, values))
    known = _SIGNATURES.get(signature)
    if known is None:
        if not _CELL_TYPES.issuperset(signature):
            _check_cells(table, row)
        if len(_SIGNATURES) >= _SIGNATURES_KEPT:
            _SIGNATURES.clear()
        strings = tuple(i for i, t in enumerate(signature) if t is str)
        known = _SIGNATURES[signature] = (signature, strings)
    return known


# Row signatures (the cells' types) seen valid -> (the signature, the
# positions of its strings); a bounded cache.
_SIGNATURES: dict[tuple[type, ...], tuple[tuple[type, ...], tuple[int, ...]]] = {}
_SIGNATURES_KEPT = 4096


def check_row_names(table: str, names: Sequence[str]) -> None:
    _check_column_names(table, names)


class TableItem:
    """log_table's columns, checked and copied on the caller's thread."""

    __slots__ = ("columns", "cost", "description", "points", "steps", "times")

    def __init__(
        self,
        columns: dict[str, list[Any]],
        times: list[float],
        steps: list[int] | None,
        description: str,
        cost: int,
    ) -> None:
        self.columns = columns
        self.times = times
        self.steps = steps
        self.description = description
        self.points = len(times)
        self.cost = cost

    def encode(self, name: str, labels: Labels, max_bytes: int) -> list[data_pb2.SeriesData]:
        head = data_pb2.SeriesData(name=name, labels=dict(labels), description=self.description)
        return table_series_messages(head, self.columns, self.times, self.steps, max_bytes)


class EvaluationItem:
    """One evaluation document: its JSON text (made on the caller's thread,
    which checks it and copies the caller's dict), time and step."""

    __slots__ = ("cost", "description", "document", "points", "step", "time")

    def __init__(self, document: str, time: float, step: int | None, description: str) -> None:
        self.document = document
        self.time = time
        self.step = step
        self.description = description
        self.points = 1
        self.cost = len(document) + len(description) + ROW_BYTES  # JSON text is ASCII

    def encode(self, name: str, labels: Labels, max_bytes: int) -> list[data_pb2.SeriesData]:
        points = data_pb2.EvaluationPoints(times=[self.time], documents=[self.document])
        if self.step is not None:
            points.steps.append(self.step)
        return [
            data_pb2.SeriesData(
                name=name, labels=dict(labels), description=self.description, evaluations=points
            )
        ]


# -- log_table ----------------------------------------------------------------------------


def table_item(
    name: str,
    value: Mapping[str, Any],
    description: str,
    steps: Sequence[int] | None,
    now: float,
) -> TableItem:
    """log_table's value ({column: [cells]}, Azure's shape), checked and
    copied: the error names the column; the sender encodes it later."""
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
    cost = ROW_BYTES * n
    for key, cells in columns.items():
        cost += _column_cost(name, key, cells)
    int_steps = None
    if steps is not None:
        int_steps = [int(s) for s in steps]
        if len(int_steps) != n:
            raise InvalidArgumentError(
                f"table {name!r}: {len(int_steps)} steps for {n} rows", field="steps"
            )
    return TableItem(columns, [now] * n, int_steps, description, cost)


def _column_cost(table: str, column: str, cells: list[Any]) -> int:
    """Check a log_table column's cells (the error names the column) and
    return the bytes they hold while buffered, as row_cost counts a row's:
    one pass in C over the cells' types, a cell looked at alone only when
    it is not of a plain cell type, the strings measured joined."""
    cost = CELL_BYTES * len(cells)
    types = set(map(type, cells))
    if not _CELL_TYPES.issuperset(types):
        for cell in cells:
            if type(cell) not in _CELL_TYPES:
                _check_cells(table, {column: cell})
    if str not in types:
        return cost
    strings = cells if len(types) == 1 else [c for c in cells if type(c) is str]
    joined = "".join(strings)
    if joined.isascii():
        return cost + len(joined)
    return cost + sum(len(v) if v.isascii() else 4 * len(v) for v in strings)


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


def evaluation_item(
    schema: str,
    value: Mapping[str, Any] | str,
    description: str,
    step: int | None,
    now: float,
) -> EvaluationItem:
    """A checked evaluation document (its JSON text), encoded later by the sender."""
    return EvaluationItem(
        evaluation_document(schema, value), now, None if step is None else int(step), description
    )
