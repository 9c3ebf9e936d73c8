"""The service's COPY encoding of table rows when every fixed-type cell is
present (ingest.store.tables._encode_joined: heads as one structured array,
strings joined after them) gives the same bytes as the general, masked
encoding (_encode_slice, checked against a struct reference in test_tables):
NaN and infinities, int64 limits, bools, empty and non-ASCII strings,
missing string cells, several string slots, no rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from ingest.core.tables import BOOL, DOUBLE, INT64, STRING
from ingest.store import tables as tables_store
from ingest.store.tables import Cells

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)
WORDS = ["", "a", "train", "eval", "héllo wörld", "日本語", "😀", "x" * 300, "tab\there"]


def cells_of(
    rng: np.random.Generator, m: int, kinds: dict[int, int], missing_strings: bool
) -> dict[int, Cells]:
    """Cells of m rows: {type: slots}; fixed cells all present."""
    out: dict[int, Cells] = {}
    for ctype, k in kinds.items():
        if ctype == STRING:
            columns = [[WORDS[int(x)] for x in rng.integers(0, len(WORDS), m)] for _ in range(k)]
            present = (
                rng.random((m, k)) > 0.3 if missing_strings else np.ones((m, k), dtype=np.bool_)
            )
            out[ctype] = Cells(columns, present)
            continue
        values: Any = {
            DOUBLE: rng.normal(size=(m, k)),
            INT64: rng.integers(I64_MIN, I64_MAX, size=(m, k), dtype=np.int64, endpoint=True),
            BOOL: rng.random((m, k)) > 0.5,
        }[ctype]
        out[ctype] = Cells(values, np.ones((m, k), dtype=np.bool_))
    return out


def both(cells: dict[int, Cells], m: int) -> tuple[bytes, bytes]:
    times = 1.7e9 + np.arange(m, dtype=np.float64) * 0.25
    steps = np.arange(m, dtype=np.int64) * 5
    joined = tables_store._encode_joined(times, 99, steps, cells)
    masked = tables_store._encode_slice(times, 99, steps, cells)
    assert tables_store.encode_table_rows(times, 99, steps, cells) == joined
    return joined, masked


@pytest.mark.parametrize(
    "kinds",
    [
        {DOUBLE: 5, INT64: 3, STRING: 1, BOOL: 1},  # bench_rows' ten columns
        {DOUBLE: 2},
        {INT64: 1},
        {BOOL: 4},
        {STRING: 1},
        {STRING: 3},
        {DOUBLE: 1, STRING: 4},
        {INT64: 2, BOOL: 1, STRING: 2},
    ],
)
@pytest.mark.parametrize("missing_strings", [False, True])
@pytest.mark.parametrize("m", [1, 2, 57])
def test_joined_encoding_matches_the_masked_one(
    kinds: dict[int, int], missing_strings: bool, m: int
) -> None:
    rng = np.random.default_rng(m * 31 + len(kinds))
    joined, masked = both(cells_of(rng, m, kinds, missing_strings), m)
    assert joined == masked


def test_special_numbers_and_limits() -> None:
    doubles = np.array([[math.nan, math.inf], [-math.inf, -0.0], [5e-324, 1.7976931348623157e308]])
    ints = np.array([[I64_MAX, I64_MIN], [0, -1], [1, I64_MAX - 1]], dtype=np.int64)
    bools = np.array([[True], [False], [True]])
    full = np.ones((3, 2), dtype=np.bool_)
    cells = {
        DOUBLE: Cells(doubles, full),
        INT64: Cells(ints, full),
        BOOL: Cells(bools, full[:, :1]),
        STRING: Cells([["", "ü", "\u2028"]], full[:, :1]),
    }
    joined, masked = both(cells, 3)
    assert joined == masked
    # The NaN's bits and -0.0's sign survive: the first row's first double.
    nan = np.frombuffer(doubles.astype(">f8").tobytes()[:8], dtype=">f8")[0]
    assert math.isnan(nan) and doubles.astype(">f8").tobytes()[:8] in joined


def test_every_string_cell_missing_and_no_rows() -> None:
    m = 4
    cells = {
        DOUBLE: Cells(np.zeros((m, 1)), np.ones((m, 1), dtype=np.bool_)),
        STRING: Cells([["x"] * m, [""] * m], np.zeros((m, 2), dtype=np.bool_)),
    }
    joined, masked = both(cells, m)
    assert joined == masked
    empty = {
        DOUBLE: Cells(np.zeros((0, 2)), np.ones((0, 2), dtype=np.bool_)),
        STRING: Cells([[]], np.ones((0, 1), dtype=np.bool_)),
    }
    assert both(empty, 0) == (b"", b"")


def test_a_missing_fixed_cell_takes_the_masked_encoding() -> None:
    m = 3
    present = np.array([[True], [False], [True]])
    cells = {
        DOUBLE: Cells(np.array([[1.0], [2.0], [3.0]]), present),
        STRING: Cells([["a", "bb", "ccc"]], np.ones((m, 1), dtype=np.bool_)),
    }
    times = np.full(m, 1.7e9)
    steps = np.arange(m, dtype=np.int64)
    got = tables_store.encode_table_rows(times, 1, steps, cells)
    assert got == tables_store._encode_slice(times, 1, steps, cells)
    # The missing double: an array with a NULL element (length -1), 8 bytes shorter.
    full = {**cells, DOUBLE: Cells(cells[DOUBLE].values, np.ones((m, 1), dtype=np.bool_))}
    assert len(tables_store.encode_table_rows(times, 1, steps, full)) == len(got) + 8
