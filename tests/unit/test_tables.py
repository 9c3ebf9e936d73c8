"""Tables without I/O: validation and column types (service), the binary COPY
encoding against a straightforward reference, and the client's row buffers
and columnar messages."""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from ingest.core import batch as b
from ingest.core.decode import decode_batch
from ingest.core.tables import BOOL, DOUBLE, INT64, STRING, TableBlock, resolve_types
from ingest.core.validate import Limits
from ingest.store import tables as tables_store
from ingest.store.copy import PG_EPOCH
from steplog import _tables
from steplog._decoders import table_columns
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

NOW = time.time()
DBL, I64, STR, BLN = (
    data_pb2.COLUMN_TYPE_DOUBLE,
    data_pb2.COLUMN_TYPE_INT64,
    data_pb2.COLUMN_TYPE_STRING,
    data_pb2.COLUMN_TYPE_BOOL,
)


def table_batch(table: data_pb2.TableColumns, limits: Limits | None = None) -> b.DecodedBatch:
    rs = pb.RunSeries(run_id="run-1", series=data_pb2.SeriesData(name="t", table=table))
    return decode_batch(
        "default", pb.Batch(writer_id="w", sequence=1, series=[rs]), 1.7e9, limits or Limits()
    )


def rejected(batch: b.DecodedBatch) -> dict[int, int]:
    return dict(batch.outcome.by_reason)


def messages(batch: b.DecodedBatch) -> list[str]:
    return [e[6] for e in batch.outcome.examples]


# -- validation (service, pure) -----------------------------------------------------


def test_valid_table_becomes_a_block() -> None:
    batch = table_batch(
        data_pb2.TableColumns(
            row_count=2,
            columns=[
                data_pb2.Column(name="x", type=I64, ints=[1, 2]),
                data_pb2.Column(name="y", type=DBL, doubles=[0.5, 0.0], present=[True, False]),
                data_pb2.Column(name="s", type=STR, strings=["a", "b"]),
                data_pb2.Column(name="ok", type=BLN, bools=[True, False]),
            ],
        )
    )
    chunk = batch.chunks[0]
    assert batch.outcome.rejected == 0 and chunk.kind == b.KIND_TABLE and len(chunk) == 2
    block = chunk.payload[0] if chunk.payload else None
    assert isinstance(block, TableBlock)
    assert [(p.name, p.type) for p in block.parts] == [
        ("x", INT64),
        ("y", DOUBLE),
        ("s", STRING),
        ("ok", BOOL),
    ]
    assert block.parts[1].present.tolist() == [True, False]
    assert block.parts[0].values.dtype == np.int64


@pytest.mark.parametrize(
    "column,needle",
    [
        (data_pb2.Column(name="x", type=I64, ints=[1]), "exactly row_count (2)"),
        (data_pb2.Column(name="x", type=I64, ints=[1, 2], doubles=[1.0, 2.0]), "nothing else"),
        (data_pb2.Column(name="x", ints=[1, 2]), "has no type"),
        (data_pb2.Column(name="", type=I64, ints=[1, 2]), "column name is empty"),
        (data_pb2.Column(name="a\nb", type=I64, ints=[1, 2]), "control character"),
        (data_pb2.Column(name="x", type=I64, ints=[1, 2], present=[True]), "presence flags"),
    ],
)
def test_malformed_column_rejects_the_whole_chunk(column: data_pb2.Column, needle: str) -> None:
    batch = table_batch(data_pb2.TableColumns(row_count=2, columns=[column]))
    assert rejected(batch) == {b.INVALID_TABLE: 2}
    assert needle in messages(batch)[0]


def test_row_and_column_limits() -> None:
    limits = Limits(max_table_rows=3, max_table_columns=2)
    many_rows = data_pb2.TableColumns(
        row_count=4, columns=[data_pb2.Column(name="x", type=I64, ints=[1, 2, 3, 4])]
    )
    batch = table_batch(many_rows, limits)
    assert rejected(batch) == {b.LIMIT_EXCEEDED: 4}
    assert "limit is 3" in messages(batch)[0]
    wide = data_pb2.TableColumns(
        row_count=1, columns=[data_pb2.Column(name=c, type=I64, ints=[1]) for c in "abc"]
    )
    batch = table_batch(wide, limits)
    assert rejected(batch) == {b.LIMIT_EXCEEDED: 1}
    assert "3 columns" in messages(batch)[0]


def test_default_limits_are_far_above_azure() -> None:
    limits = Limits()
    assert limits.max_table_columns >= 1000 and limits.max_table_rows >= 100_000


def test_bad_cells_reject_only_their_rows() -> None:
    batch = table_batch(
        data_pb2.TableColumns(
            row_count=3,
            columns=[
                data_pb2.Column(name="s", type=STR, strings=["ok", "x" * 5000, "nul\x00"]),
                data_pb2.Column(name="n", type=I64, ints=[1, 2, 3]),
            ],
        )
    )
    # NUL cannot be stored (INVALID_VALUE); an oversize string is over a limit.
    assert rejected(batch) == {b.LIMIT_EXCEEDED: 1, b.INVALID_VALUE: 1}
    assert batch.chunks[0].alive.tolist() == [True, False, False]
    assert all("column 's'" in m for m in messages(batch))
    assert any("NUL" in m for m in messages(batch))


def test_a_60_byte_message_claiming_two_billion_rows_allocates_nothing() -> None:
    """The issue's reproduction: row_count trusted before it was checked made
    the service allocate gigabytes for a 60-byte message."""
    table = data_pb2.TableColumns(row_count=2**31 - 1)
    rs = pb.RunSeries(run_id="run-1", series=data_pb2.SeriesData(name="t", table=table))
    message = pb.Batch(writer_id="w", sequence=1, series=[rs])
    assert message.ByteSize() < 60
    tracemalloc.start()
    try:
        batch = decode_batch("default", message, 1.7e9, Limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert rejected(batch) == {b.LIMIT_EXCEEDED: 2**31 - 1} and batch.chunks == []


@pytest.mark.parametrize(
    "table,reason,needle",
    [
        # Within the row limit, but no column, step or time backs the rows.
        (data_pb2.TableColumns(row_count=90_000), b.INVALID_TABLE, "carries a row"),
        # A column that does not back row_count: refused before any copy.
        (
            data_pb2.TableColumns(
                row_count=90_000, columns=[data_pb2.Column(name="x", type=BLN, bools=[True])]
            ),
            b.INVALID_TABLE,
            "exactly row_count (90000)",
        ),
        (data_pb2.TableColumns(row_count=90_000, times=[1.7e9]), b.INVALID_VALUE, "1 times"),
        (data_pb2.TableColumns(row_count=-5, times=[1.7e9]), None, "row_count must be >= 0"),
    ],
)
def test_row_count_must_be_backed_by_the_data(
    table: data_pb2.TableColumns, reason: int | None, needle: str
) -> None:
    tracemalloc.start()
    try:
        batch = table_batch(table)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and batch.chunks == []
    expected = {} if reason is None else {reason: max(table.row_count, 0)}
    assert rejected(batch) == expected
    assert needle in messages(batch)[0]


def test_too_many_column_parts_are_refused_before_they_are_read() -> None:
    limits = Limits(max_table_columns=2)
    table = data_pb2.TableColumns(
        row_count=1, columns=[data_pb2.Column(name="x", type=I64, ints=[1]) for _ in range(9)]
    )
    batch = table_batch(table, limits)
    assert rejected(batch) == {b.LIMIT_EXCEEDED: 1}
    assert "9 column parts" in messages(batch)[0]


def test_a_cell_given_twice_rejects_its_row() -> None:
    batch = table_batch(
        data_pb2.TableColumns(
            row_count=2,
            columns=[
                data_pb2.Column(name="x", type=I64, ints=[1, 2]),
                data_pb2.Column(name="x", type=STR, strings=["a", "b"], present=[False, True]),
            ],
        )
    )
    assert rejected(batch) == {b.INVALID_TABLE: 1}
    assert batch.chunks[0].alive.tolist() == [True, False]
    assert "two values in one row" in messages(batch)[0]


def block_of(*columns: data_pb2.Column, n: int) -> TableBlock:
    batch = table_batch(data_pb2.TableColumns(row_count=n, columns=list(columns)))
    block = batch.chunks[0].payload[0] if batch.chunks[0].payload else None
    assert isinstance(block, TableBlock)
    return block


def test_new_column_type_is_fixed_by_its_first_value() -> None:
    # One column sent as two typed parts (mixed types): the first row's wins.
    block = block_of(
        data_pb2.Column(name="x", type=STR, strings=["a", "", "c"], present=[True, False, True]),
        data_pb2.Column(name="x", type=I64, ints=[0, 2, 0], present=[False, True, False]),
        n=3,
    )
    rejections, new = resolve_types(block, np.ones(3, dtype=np.bool_), {}, 10)
    assert new == {"x": STRING}
    assert len(rejections) == 1 and rejections[0].rows.tolist() == [False, True, False]
    assert "column 'x' holds string values; this row's is int64" in rejections[0].message


def test_type_change_against_the_stored_schema_names_the_column() -> None:
    block = block_of(data_pb2.Column(name="acc", type=STR, strings=["high", "low"]), n=2)
    rejections, new = resolve_types(block, np.ones(2, dtype=np.bool_), {"acc": DOUBLE}, 10)
    assert new == {}
    assert rejections[0].reason == b.INVALID_TABLE
    assert rejections[0].rows.tolist() == [True, True]
    assert "column 'acc' holds double values; this row's is string" in rejections[0].message


def test_int_cells_widen_into_a_double_column_but_not_back() -> None:
    block = block_of(data_pb2.Column(name="loss", type=I64, ints=[0, 1]), n=2)
    rejections, _ = resolve_types(block, np.ones(2, dtype=np.bool_), {"loss": DOUBLE}, 10)
    assert rejections == []
    assert block.parts[0].type == DOUBLE and block.parts[0].values.tolist() == [0.0, 1.0]
    # Again (a retried transaction): idempotent.
    assert resolve_types(block, np.ones(2, dtype=np.bool_), {"loss": DOUBLE}, 10)[0] == []
    block = block_of(data_pb2.Column(name="epoch", type=DBL, doubles=[1.5]), n=1)
    rejections, _ = resolve_types(block, np.ones(1, dtype=np.bool_), {"epoch": INT64}, 10)
    assert "holds int64 values; this row's is double" in rejections[0].message


def test_rejected_row_does_not_fix_a_new_column_type() -> None:
    block = block_of(
        data_pb2.Column(name="known", type=STR, strings=["bad", ""], present=[True, False]),
        data_pb2.Column(name="new", type=STR, strings=["s", ""], present=[True, False]),
        data_pb2.Column(name="new", type=I64, ints=[0, 7], present=[False, True]),
        n=2,
    )
    rejections, new = resolve_types(block, np.ones(2, dtype=np.bool_), {"known": INT64}, 10)
    assert new == {"new": INT64}
    assert [r.rows.tolist() for r in rejections] == [[True, False]]


def test_column_limit_across_the_series() -> None:
    block = block_of(
        data_pb2.Column(name="a", type=I64, ints=[1, 2]),
        data_pb2.Column(name="b", type=I64, ints=[0, 2], present=[False, True]),
        n=2,
    )
    rejections, new = resolve_types(block, np.ones(2, dtype=np.bool_), {"z": INT64}, 2)
    assert new == {"a": INT64}
    assert rejections[0].reason == b.LIMIT_EXCEEDED and rejections[0].rows.tolist() == [
        False,
        True,
    ]
    assert "column 'b' would be column 3" in rejections[0].message


# -- binary COPY encoding against a reference -------------------------------------------


def _ref_array(oid: int, fmt: str, cells: Sequence[Any]) -> bytes:
    body = struct.pack(">iiiii", 1, int(any(c is None for c in cells)), oid, len(cells), 1)
    for c in cells:
        if c is None:
            body += struct.pack(">i", -1)
        elif fmt == "text":
            data = c.encode()
            body += struct.pack(">i", len(data)) + data
        else:
            data = struct.pack(">" + fmt, c)
            body += struct.pack(">i", len(data)) + data
    return struct.pack(">i", len(body)) + body


def reference_rows(
    times: Sequence[float], sid: int, steps: Sequence[int], cells: dict[int, tuple[Any, Any]]
) -> bytes:
    """One row at a time with struct, the way the COPY format is documented."""
    out = b""
    for i, t in enumerate(times):
        row = struct.pack(">h", 8)
        row += struct.pack(">iq", 8, round((t - PG_EPOCH) * 1e6))
        row += struct.pack(">iq", 8, sid) + struct.pack(">iq", 8, steps[i])
        for ctype, oid, fmt in ((DOUBLE, 701, "d"), (INT64, 20, "q"), (BOOL, 16, "?")):
            if ctype not in cells:
                row += struct.pack(">i", -1)
                continue
            values, present = cells[ctype]
            row_cells = [
                (bool(v) if fmt == "?" else v) if p else None
                for v, p in zip(values[i], present[i], strict=True)
            ]
            row += _ref_array(oid, fmt, row_cells)
        row += struct.pack(">ib", 1, 0)
        if STRING in cells:
            columns, present = cells[STRING]
            row_cells = [col[i] if present[i][j] else None for j, col in enumerate(columns)]
            row += _ref_array(25, "text", row_cells)
        else:
            row += struct.pack(">i", -1)
        out += row
    return out


@pytest.mark.parametrize("kinds", [(DOUBLE,), (DOUBLE, INT64, BOOL), (STRING,), (DOUBLE, STRING)])
@pytest.mark.parametrize("missing", [False, True])
def test_copy_encoding_matches_reference(kinds: tuple[int, ...], missing: bool) -> None:
    rng = np.random.default_rng(7)
    m = 37
    times = 1.7e9 + rng.random(m) * 1000
    steps = np.arange(m, dtype=np.int64) * 3
    cells: dict[int, tables_store.Cells] = {}
    ref: dict[int, tuple[Any, Any]] = {}
    for ctype in kinds:
        k = 3
        present = rng.random((m, k)) > 0.3 if missing else np.ones((m, k), dtype=np.bool_)
        if ctype == STRING:
            words = ["", "a", "héllo wörld", "x" * 50, "日本"]
            columns = [[words[int(x)] for x in rng.integers(0, 5, m)] for _ in range(k)]
            cells[ctype] = tables_store.Cells(columns, present)
            ref[ctype] = (columns, present.tolist())
            continue
        values: Any = {
            DOUBLE: rng.normal(size=(m, k)),
            INT64: rng.integers(-(2**62), 2**62, size=(m, k)),
            BOOL: rng.random((m, k)) > 0.5,
        }[ctype]
        cells[ctype] = tables_store.Cells(values, present)
        ref[ctype] = (values.tolist(), present.tolist())
    got = tables_store.encode_table_rows(times, 42, steps, cells)
    assert got == reference_rows(times.tolist(), 42, steps.tolist(), ref)


def test_copy_encoding_slices_rows_with_long_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables_store, "_STRING_BUDGET", 1000)
    m = 20
    columns = [[("y" * (i * 7)) for i in range(m)]]
    present = np.ones((m, 1), dtype=np.bool_)
    times = np.full(m, 1.7e9)
    steps = np.arange(m, dtype=np.int64)
    got = tables_store.encode_table_rows(
        times, 1, steps, {STRING: tables_store.Cells(columns, present)}
    )
    assert got == reference_rows(
        times.tolist(), 1, steps.tolist(), {STRING: (columns, present.tolist())}
    )


def test_layout_places_cells_at_slots_and_adds_columns() -> None:
    block = block_of(
        data_pb2.Column(name="b", type=DBL, doubles=[1.0, 2.0]),
        data_pb2.Column(name="new", type=DBL, doubles=[0.0, 3.0], present=[False, True]),
        n=2,
    )
    columns = {
        "a": tables_store.Column("a", DOUBLE, 0, 0),
        "b": tables_store.Column("b", DOUBLE, 1, 1),
    }
    new: list[tables_store.Column] = []
    cells = tables_store.layout(block, np.array([0, 1]), columns, new)
    assert [(c.name, c.slot, c.position) for c in new] == [("new", 2, 2)]
    assert cells[DOUBLE].present.tolist() == [[False, True, False], [False, True, True]]
    assert cells[DOUBLE].values[:, 1].tolist() == [1.0, 2.0]


# -- the client: columns and messages ----------------------------------------------------


def table_series(
    name: str, value: Any, description: str, steps: Any, max_bytes: int
) -> list[data_pb2.SeriesData]:
    """What the writer's thread makes of a log_table call (check, copy, encode)."""
    return _tables.table_item(name, value, description, steps, 1.7e9).encode(name, (), max_bytes)


def decoded(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    (series,) = table_series("t", columns, "", None, 1 << 20)
    return table_columns(series.table)


def test_column_kinds() -> None:
    parts = _tables.column_parts("x", [1, 2.5, None])
    assert [(p.type, list(p.doubles), list(p.present)) for p in parts] == [
        (DBL, [1.0, 2.5, 0.0], [True, True, False])
    ]
    assert _tables.column_parts("n", [1, 2])[0].type == I64
    assert _tables.column_parts("b", [True, np.bool_(False)])[0].type == BLN
    assert _tables.column_parts("f", [np.float32(1.5), np.int64(2)])[0].type == DBL
    assert _tables.column_parts("s", ["a", None])[0].type == STR
    assert _tables.column_parts("huge", [2**70])[0].type == DBL


def test_mixed_types_are_sent_faithfully_as_parts() -> None:
    parts = _tables.column_parts("x", [1, "a", True, 2.0])
    assert sorted((p.type, list(p.present)) for p in parts) == [
        (DBL, [True, False, False, True]),
        (STR, [False, True, False, False]),
        (BLN, [False, False, True, False]),
    ]
    assert decoded({"x": [1, "a", True, 2.0]}) == {"x": [1.0, "a", True, 2.0]}


def test_roundtrip_of_azure_shape() -> None:
    cols: dict[str, list[Any]] = {
        "x": [1, 2, 3],
        "y": [0.5, None, 1.5],
        "name": ["a", "b", "c"],
        "ok": [True] * 3,
    }
    assert decoded(cols) == cols


def test_large_tables_are_split_by_rows() -> None:
    columns = {"s": ["z" * 100] * 1000}
    messages = table_series("t", columns, "", list(range(1000)), 20_000)
    parts = [m.table for m in messages]
    assert len(parts) > 1 and all(m.ByteSize() <= 20_000 for m in messages)
    assert sum(p.row_count for p in parts) == 1000
    assert [s for p in parts for s in p.steps] == list(range(1000))


def test_log_table_checks_its_value() -> None:
    with pytest.raises(InvalidArgumentError, match="different lengths"):
        table_series("t", {"a": [1], "b": [1, 2]}, "", None, 1 << 20)
    with pytest.raises(InvalidArgumentError, match="column 'a' value must be"):
        table_series("t", {"a": [[1]]}, "", None, 1 << 20)
    with pytest.raises(InvalidArgumentError, match="2 steps for 1 rows"):
        table_series("t", {"a": [1]}, "", [1, 2], 1 << 20)
    (series,) = table_series("t", {"a": np.arange(3)}, "d", [5, 6, 7], 1 << 20)
    assert list(series.table.steps) == [5, 6, 7] and series.description == "d"


# -- the client: log_row items (encoded by the writer's thread) ---------------------------


def rows_of(messages: Sequence[data_pb2.SeriesData]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in messages:
        for k, v in table_columns(s.table).items():
            out.setdefault(k, []).extend(v)
    return out


def add_row(item: _tables.RowsItem, row: dict[str, Any]) -> bool:
    names = tuple(row)
    if names != item.names:
        _tables.check_row_names("t", names)
    return item.add(names, row.values(), NOW, _tables.row_cost("t", row))


def test_rows_are_appended_as_values_and_encoded_later() -> None:
    item = _tables.RowsItem("desc")
    for i in range(10):
        add_row(item, {"epoch": i, "loss": 1.0 / (i + 1)})
    assert item.points == 10 and item.flat[:2] == [0, 1.0]  # values, no message yet
    (msg,) = item.encode("t", (("rank", "0"),), 1 << 20)
    assert msg.name == "t" and dict(msg.labels) == {"rank": "0"} and msg.description == "desc"
    assert rows_of([msg]) == {"epoch": list(range(10)), "loss": [1.0 / (i + 1) for i in range(10)]}


def test_growing_column_set_reads_missing_before() -> None:
    item = _tables.RowsItem("")
    add_row(item, {"a": 1})
    add_row(item, {"a": 2, "b": "x"})
    add_row(item, {"b": "y"})
    assert rows_of(item.encode("t", (), 1 << 20)) == {"a": [1, 2, None], "b": [None, "x", "y"]}


def test_a_rows_item_is_full_at_max_rows_or_cells() -> None:
    item = _tables.RowsItem("")
    full = [add_row(item, {"i": i}) for i in range(_tables.MAX_ROWS)]
    assert full[-1] and not any(full[:-1])
    wide = _tables.RowsItem("")
    row = {f"c{j}": j for j in range(1000)}
    n = 0
    while not add_row(wide, row):
        n += 1
    assert (n + 1) * 1000 >= _tables.MAX_CELLS > n * 1000


def test_a_large_rows_item_is_split_by_bytes() -> None:
    item = _tables.RowsItem("")
    for i in range(1000):
        add_row(item, {"s": "z" * 100, "i": i})
    parts = item.encode("t", (), 20_000)
    assert len(parts) > 1 and all(p.ByteSize() <= 20_000 for p in parts)
    assert rows_of(parts)["i"] == list(range(1000))


def test_row_cost_counts_string_bytes_and_checks_cells() -> None:
    small = _tables.row_cost("t", {"a": 1.0, "b": 2})
    assert _tables.row_cost("t", {"a": 1.0, "b": "x" * 4000}) >= small + 4000
    assert _tables.row_cost("t", {"a": 1.0, "b": "é" * 1000}) >= small + 4000
    with pytest.raises(InvalidArgumentError, match="column 'x' value must be"):
        _tables.row_cost("t", {"x": [1, 2]})
    with pytest.raises(InvalidArgumentError, match="column name"):
        _tables.check_row_names("t", ("",))


def test_a_table_items_cost_counts_its_strings_bytes_and_a_bad_cell_names_its_column() -> None:
    def cost(value: dict[str, list[Any]]) -> int:
        return _tables.table_item("t", value, "", None, NOW).cost

    base = cost({"n": [1.0, 2, None]})
    assert base == 3 * (_tables.ROW_BYTES + _tables.CELL_BYTES)
    assert cost({"n": [1.0, 2, None], "s": ["ab", "cde", "f"]}) == base + 3 * _tables.CELL_BYTES + 6
    # a non-ASCII string counts 4 bytes a character, an ASCII one 1, as log_row counts them
    assert cost({"s": ["ab", "é"]}) == 2 * (_tables.ROW_BYTES + _tables.CELL_BYTES) + 2 + 4
    # strings among other cells count alone; a str subclass passes unmeasured, as in log_row
    mixed = cost({"s": ["xyz", 1, None, True]})
    assert mixed == 4 * (_tables.ROW_BYTES + _tables.CELL_BYTES) + 3

    class Name(str):
        pass

    assert cost({"s": [Name("abcdef")]}) == _tables.ROW_BYTES + _tables.CELL_BYTES
    cells: list[Any] = [float(i) for i in range(10_000)]
    cells[7777] = {"not": "a cell"}
    with pytest.raises(InvalidArgumentError, match="column 'loss' value must be") as err:
        cost({"step": list(range(10_000)), "loss": cells})
    assert err.value.field == "loss"


def test_table_and_evaluation_items_copy_and_check_on_the_callers_thread() -> None:
    value = {"a": [1, 2], "s": ["x", "y"]}
    item = _tables.table_item("t", value, "d", [5, 6], NOW)
    value["a"].append(3)  # the caller's list changes later: the item does not
    (msg,) = item.encode("t", (), 1 << 20)
    assert rows_of([msg]) == {"a": [1, 2], "s": ["x", "y"]} and list(msg.table.steps) == [5, 6]
    assert item.cost >= 4 * _tables.CELL_BYTES + 2
    doc: dict[str, Any] = {"data": {"class_labels": ["a"], "matrix": [[1]]}}
    ev = _tables.evaluation_item("confusion_matrix", doc, "", 3, NOW)
    doc["data"]["matrix"] = [[2]]
    (em,) = ev.encode("cm", (), 1 << 20)
    assert '"matrix": [[1]]' in em.evaluations.documents[0] and list(em.evaluations.steps) == [3]
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        _tables.evaluation_item("confusion_matrix", {"x": object()}, "", None, NOW)
