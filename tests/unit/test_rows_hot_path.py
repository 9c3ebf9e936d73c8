"""log_row's hot path (steplog._writer.intake.Buffers.row_appender) and the
typed encoding of rows whose cells are all of one plain type per column
(steplog._tables.RowsItem.kinds): every column type round-trips, a column
set or a cell type changing mid-stream falls back to the general encoding,
and the checks (cell types, names, byte costs, full items) hold."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest

from steplog import _tables
from steplog._decoders import table_columns
from steplog._writer.intake import Buffers
from steplog._writer.outcomes import Outcomes
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2

NOW = 1_700_000_000.0
I64_MAX = 2**63 - 1
I64_MIN = -(2**63)


def buffers() -> Buffers:
    b = Buffers(Outcomes(False), threading.Event(), lambda: None, lambda: None, 1 << 24, 1 << 24)
    b.check_at = b.mem_check_at = 1 << 62  # the fast path, as the lane sets it
    return b


def log_rows(b: Buffers, rows: list[dict[str, Any]], table: str = "t") -> None:
    """As Run.log_row does: the first row by log_row, later ones by the
    callable hot_rows holds."""
    b.log_row("r", table, (), rows[0], NOW)
    append = b.hot_rows("r", ())[table]
    for row in rows[1:]:
        append(row, NOW, "")


def items(b: Buffers, table: str = "t") -> list[_tables.RowsItem]:
    mbuf = b._messages[("r", table, (), "table")]
    out = mbuf.take_raw()
    assert all(isinstance(i, _tables.RowsItem) for i in out)
    return out  # type: ignore[return-value]


def decoded(item: _tables.RowsItem, max_bytes: int = 1 << 24) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in item.encode("t", (), max_bytes):
        for k, v in table_columns(s.table).items():
            out.setdefault(k, []).extend(v)
    return out


def wire_types(item: _tables.RowsItem) -> dict[str, list[int]]:
    (msg,) = item.encode("t", (), 1 << 24)
    out: dict[str, list[int]] = {}
    for c in msg.table.columns:
        out.setdefault(c.name, []).append(int(c.type))
    return out


def test_every_column_type_round_trips_through_the_typed_encoding() -> None:
    rows = [
        {
            "i": k * 7 - 3,
            "f": k / 3,
            "b": k % 2 == 0,
            "s": f"ü{k}é" if k % 3 else "train",
            "big": I64_MAX - k,
            "small": I64_MIN + k,
        }
        for k in range(100)
    ]
    b = buffers()
    log_rows(b, rows)
    (item,) = items(b)
    assert item.kinds() == {
        "i": data_pb2.COLUMN_TYPE_INT64,
        "f": data_pb2.COLUMN_TYPE_DOUBLE,
        "b": data_pb2.COLUMN_TYPE_BOOL,
        "s": data_pb2.COLUMN_TYPE_STRING,
        "big": data_pb2.COLUMN_TYPE_INT64,
        "small": data_pb2.COLUMN_TYPE_INT64,
    }
    got = decoded(item)
    assert got == {k: [r[k] for r in rows] for k in rows[0]}
    assert all(type(v) is bool for v in got["b"])
    # The same rows through the general encoding give the same message.
    general = _tables.table_series_messages(
        data_pb2.SeriesData(name="t"), item.columns(), item.times, None, 1 << 24
    )
    assert [m.table for m in general] == [m.table for m in item.encode("t", (), 1 << 24)]


def test_nan_and_infinities_are_kept_as_doubles() -> None:
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308]
    b = buffers()
    log_rows(b, [{"x": v} for v in values])
    (item,) = items(b)
    assert item.kinds() == {"x": data_pb2.COLUMN_TYPE_DOUBLE}
    got = decoded(item)["x"]
    assert math.isnan(got[0]) and got[1:] == values[1:]
    assert math.copysign(1.0, got[4]) == -1.0


def test_an_int_beyond_int64_becomes_a_double_as_before() -> None:
    b = buffers()
    log_rows(b, [{"n": 2**63}, {"n": 1}])
    (item,) = items(b)
    assert item.kinds() == {"n": data_pb2.COLUMN_TYPE_INT64}
    assert wire_types(item) == {"n": [data_pb2.COLUMN_TYPE_DOUBLE]}
    assert decoded(item) == {"n": [float(2**63), 1.0]}


def test_a_cell_type_changing_mid_stream_takes_the_general_encoding() -> None:
    b = buffers()
    log_rows(b, [{"a": 1, "s": "x"}, {"a": 2.5, "s": "y"}, {"a": None, "s": "z"}, {"a": 3, "s": 4}])
    (item,) = items(b)
    assert item.kinds() is None and item.sigs == [None]
    types = wire_types(item)
    assert types["a"] == [data_pb2.COLUMN_TYPE_DOUBLE]  # ints among floats
    assert sorted(types["s"]) == [data_pb2.COLUMN_TYPE_INT64, data_pb2.COLUMN_TYPE_STRING]
    assert decoded(item) == {"a": [1.0, 2.5, None, 3.0], "s": ["x", "y", "z", 4]}


def test_numpy_scalars_and_none_take_the_general_encoding() -> None:
    b = buffers()
    log_rows(b, [{"a": np.float32(0.5), "n": None, "k": np.int64(3)}] * 3)
    (item,) = items(b)
    assert item.sigs[0] is not None and item.kinds() is None
    assert decoded(item) == {"a": [0.5] * 3, "n": [None] * 3, "k": [3] * 3}


def test_a_column_set_changing_mid_stream() -> None:
    rows: list[dict[str, Any]] = [{"epoch": i, "loss": i / 2} for i in range(5)]
    rows += [{"epoch": 5, "loss": 2.5, "acc": 0.9}]  # a new column
    rows += [{"loss": 3.0, "epoch": 6}]  # the same columns in another order
    rows += [{"epoch": 7, "loss": 3.5}]
    b = buffers()
    log_rows(b, rows)
    (item,) = items(b)
    assert len(item.segments) == 4 and item.kinds() is None
    assert decoded(item) == {
        "epoch": list(range(8)),
        "loss": [i / 2 for i in range(8)],
        "acc": [None] * 5 + [0.9, None, None],
    }


def test_bad_cells_and_names_raise_on_the_hot_path_and_record_nothing() -> None:
    b = buffers()
    log_rows(b, [{"a": 1, "b": "x"}] * 3)
    append = b.hot_rows("r", ())["t"]
    with pytest.raises(InvalidArgumentError, match="column 'b' value must be"):
        append({"a": 1, "b": [1, 2]}, NOW, "")
    with pytest.raises(InvalidArgumentError, match="column name"):
        append({"a": 1, "": 2}, NOW, "")
    with pytest.raises(InvalidArgumentError, match="column name"):
        append({"a": 1, "x" * 256: 2}, NOW, "")
    assert b.buffered == 3
    (item,) = items(b)
    assert item.points == 3 and decoded(item) == {"a": [1] * 3, "b": ["x"] * 3}
    assert not b.lock.locked()  # released on the error paths


def test_the_byte_cost_counts_strings_and_non_ascii_at_four_bytes() -> None:
    b = buffers()
    log_rows(b, [{"a": 1.0, "s": ""}])
    base = b.buffered_bytes
    append = b.hot_rows("r", ())["t"]
    append({"a": 1.0, "s": "x" * 1000}, NOW, "")
    assert b.buffered_bytes - base == base + 1000
    before = b.buffered_bytes
    append({"a": 1.0, "s": "é" * 1000}, NOW, "")  # up to 4 bytes a character in memory
    assert b.buffered_bytes - before == base + 4000
    (item,) = items(b)
    assert item.cost == b.buffered_bytes
    assert decoded(item)["s"] == ["", "x" * 1000, "é" * 1000]


def test_a_rows_item_is_full_at_max_rows_or_cells_on_the_hot_path() -> None:
    b = buffers()
    log_rows(b, [{"i": i} for i in range(_tables.MAX_ROWS + 1)])
    first, second = items(b)
    assert first.points == _tables.MAX_ROWS and second.points == 1
    wide = {f"c{j}": j for j in range(1000)}
    b = buffers()
    n = _tables.MAX_CELLS // 1000 + 2
    log_rows(b, [wide] * n)
    first, second = items(b)
    assert first.cells >= _tables.MAX_CELLS > first.cells - 1000
    assert first.points + second.points == n
    # A narrower segment after a wide one: full by cells, counted over both.
    b = buffers()
    log_rows(b, [wide] * 125 + [{"x": 1}] * (_tables.MAX_CELLS - 125_000 + 5))
    first, second = items(b)
    assert first.cells == _tables.MAX_CELLS and second.points == 5


def test_a_large_typed_item_is_split_by_bytes() -> None:
    b = buffers()
    log_rows(b, [{"s": "z" * 100, "i": i, "ok": True} for i in range(1000)])
    (item,) = items(b)
    assert item.kinds() is not None
    parts = item.encode("t", (), 20_000)
    assert len(parts) > 1 and all(p.ByteSize() <= 20_000 for p in parts)
    rows: dict[str, list[Any]] = {}
    for p in parts:
        for k, v in table_columns(p.table).items():
            rows.setdefault(k, []).extend(v)
    assert rows["i"] == list(range(1000)) and rows["ok"] == [True] * 1000


@pytest.mark.parametrize("text", ["a" * 50, "é" * 50, "😀" * 50, "汉" * 50])
def test_typed_string_columns_never_exceed_the_byte_bound(text: str) -> None:
    """The size bound that spares the typed encoding its ByteSize holds for
    1- to 4-byte UTF-8 characters: every message is within max_bytes, by
    bytes, however the rows are split."""
    n = 400
    b = buffers()
    log_rows(b, [{"s": text, "i": i} for i in range(n)])
    (item,) = items(b)
    whole = item.encode("t", (), 1 << 24)[0].ByteSize()
    for max_bytes in (whole, whole - 1, whole // 3, 4096):
        parts = item.encode("t", (), max_bytes)
        assert all(p.ByteSize() <= max_bytes for p in parts), max_bytes
        assert (len(parts) == 1) == (max_bytes >= whole)
        got: list[Any] = []
        for p in parts:
            got += table_columns(p.table)["s"]
        assert got == [text] * n
