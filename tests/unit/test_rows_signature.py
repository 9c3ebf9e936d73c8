"""log_row's hot path (Buffers.row_appender) and its cell-type signatures:
the checks, byte costs and typed encoding hold when the types change back
and forth, when a bad cell follows good ones, when a new column set has a
known signature, and when two threads log rows of different types to the
same table."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from steplog import _tables
from steplog._writer.intake import Buffers
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from tests.unit.test_rows_hot_path import buffers, decoded, items

NOW = 1_700_000_000.0


def appender(b: Buffers, first: dict[str, Any]) -> Any:
    b.log_row("r", "t", (), first, NOW)
    return b.hot_rows("r", ())["t"]


def test_types_changing_back_and_forth_keep_values_costs_and_kinds() -> None:
    b = buffers()
    rows: list[dict[str, Any]] = [{"a": 1, "s": "x"}]
    append = appender(b, rows[0])
    more: list[dict[str, Any]] = [
        {"a": 2, "s": "yy"},
        {"a": 2.5, "s": "é"},  # a float: another signature
        {"a": 3, "s": "zzz"},  # back to the first
        {"a": None, "s": ""},
        {"a": 4, "s": "w" * 10},
    ]
    for row in more:
        append(row, NOW, "")
    rows += more
    (item,) = items(b)
    assert item.sigs == [None] and item.kinds() is None  # mixed: the general encoding
    got = decoded(item)
    assert got["s"] == [r["s"] for r in rows]
    assert got["a"] == [1.0, 2.0, 2.5, 3.0, None, 4.0]
    strings = 1 + 2 + 4 * 1 + 3 + 0 + 10
    assert (
        item.cost == b.buffered_bytes == 6 * (_tables.ROW_BYTES + 2 * _tables.CELL_BYTES) + strings
    )


def test_one_signature_throughout_stays_typed() -> None:
    b = buffers()
    append = appender(b, {"i": 0, "f": 0.5, "s": "a", "ok": True})
    for k in range(1, 50):
        append({"i": k, "f": k / 2, "s": "ab" * k, "ok": k % 2 == 0}, NOW, "")
    (item,) = items(b)
    assert item.kinds() == {
        "i": data_pb2.COLUMN_TYPE_INT64,
        "f": data_pb2.COLUMN_TYPE_DOUBLE,
        "s": data_pb2.COLUMN_TYPE_STRING,
        "ok": data_pb2.COLUMN_TYPE_BOOL,
    }
    got = decoded(item)
    assert got["s"] == ["a"] + ["ab" * k for k in range(1, 50)]
    assert got["ok"] == [True] + [k % 2 == 0 for k in range(1, 50)]
    strings = 1 + sum(2 * k for k in range(1, 50))
    assert b.buffered_bytes == 50 * (_tables.ROW_BYTES + 4 * _tables.CELL_BYTES) + strings


def test_a_bad_cell_after_good_rows_raises_and_records_nothing() -> None:
    b = buffers()
    append = appender(b, {"a": 1.0, "s": "x"})
    append({"a": 2.0, "s": "y"}, NOW, "")
    before = (b.buffered, b.buffered_bytes)
    with pytest.raises(InvalidArgumentError, match="column 's' value must be"):
        append({"a": 3.0, "s": {"not": "a cell"}}, NOW, "")
    with pytest.raises(InvalidArgumentError, match="column 'a' value must be"):
        append({"a": [1.0], "s": "z"}, NOW, "")
    assert (b.buffered, b.buffered_bytes) == before
    append({"a": 4.0, "s": "w"}, NOW, "")  # the cached signature still holds
    (item,) = items(b)
    assert decoded(item) == {"a": [1.0, 2.0, 4.0], "s": ["x", "y", "w"]}
    assert item.kinds() is not None


def test_a_new_column_set_with_a_known_signature_starts_a_segment() -> None:
    b = buffers()
    append = appender(b, {"a": 1, "b": "x"})
    append({"c": 2, "d": "y"}, NOW, "")  # same types, other names
    append({"c": 3, "d": "zz"}, NOW, "")
    with pytest.raises(InvalidArgumentError, match="column name"):
        append({"": 4, "d": "q"}, NOW, "")
    (item,) = items(b)
    assert len(item.segments) == 2
    assert decoded(item) == {
        "a": [1, None, None],
        "b": ["x", None, None],
        "c": [None, 2, 3],
        "d": [None, "y", "zz"],
    }
    assert b.buffered == 3


def test_two_threads_with_different_signatures_on_one_table() -> None:
    b = buffers()
    append = appender(b, {"v": 0, "s": "s"})
    n = 3000
    start = threading.Barrier(2)

    def log(value: Any, text: str) -> None:
        start.wait()
        for _ in range(n):
            append({"v": value, "s": text}, NOW, "")

    threads = [
        threading.Thread(target=log, args=(1, "ab")),
        threading.Thread(target=log, args=(2.5, "élan")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = items(b)
    got: dict[str, list[Any]] = {"v": [], "s": []}
    for item in taken:
        for k, v in decoded(item).items():
            got[k] += v
    pairs = list(zip(got["v"], got["s"], strict=True))
    assert pairs.count((1.0, "ab")) == n and pairs.count((2.5, "élan")) == n
    base = _tables.ROW_BYTES + 2 * _tables.CELL_BYTES
    expected = (2 * n + 1) * base + 1 + n * 2 + n * 4 * 4
    assert b.buffered_bytes == sum(i.cost for i in taken) == expected
