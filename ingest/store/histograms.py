"""The store of histogram points (asyncpg).

Storage (migrations/008_histograms.sql): one `histogram_points` row per
histogram, its edges and counts as float8 arrays, plus the values outside its
bins. The accepted histograms of a group become one binary COPY payload built
with numpy: each row's fixed fields are one structured array, the array
elements of every row another, and a row is their slices put side by side.
Queries read by step range through `visible_points`, the database counting 16
bytes per bin so a page stays within its byte budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import numpy as np

from ingest.core.batch import I64
from ingest.core.histograms import POINT_OVERHEAD_BYTES, HistogramBlock
from ingest.core.order import Accepted
from ingest.store.copy import POINT_HEAD, copy_source, fill_point_head
from ingest.store.db import acquire
from ingest.store.kinds import hide_superseded
from ingest.store.queries import Read, SeriesHead, Window, visible_points

Row = Mapping[str, Any]

TABLE = "histogram_points"
COLUMNS = [
    "time",
    "series_id",
    "step",
    "edges",
    "counts",
    "underflow",
    "overflow",
    "nan_count",
    "hidden",
]
_FLOAT8_OID = 701

# A one-dimensional float8 array in binary COPY: the field's length, then
# ndim, has-nulls, element type, length and lower bound; then its elements.
_ARRAY_HEAD = [
    ("l_array", ">i4"),
    ("ndim", ">i4"),
    ("nulls", ">i4"),
    ("oid", ">i4"),
    ("dim", ">i4"),
    ("lbound", ">i4"),
]
# The fixed fields of a row before its edges, between edges and counts, after.
_HEAD = np.dtype(
    [
        *POINT_HEAD,
        *_ARRAY_HEAD,
    ]
)
_MIDDLE = np.dtype(_ARRAY_HEAD)
_TAIL = np.dtype(
    [
        ("l_under", ">i4"),
        ("under", ">f8"),
        ("l_over", ">i4"),
        ("over", ">f8"),
        ("l_nan", ">i4"),
        ("nan", ">f8"),
        ("l_hidden", ">i4"),
        ("hidden", "u1"),
    ]
)
_ELEMENT = np.dtype([("l", ">i4"), ("v", ">f8")])
_ARRAY_HEAD_BYTES = 20


def _gather(starts: I64, lengths: I64) -> I64:
    """Indices of the ragged segments [starts[i], starts[i] + lengths[i]), in order."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return (shift + np.arange(total, dtype=np.int64)).astype(np.int64)


def _elements(values: np.ndarray[Any, Any]) -> bytes:
    out = np.empty(values.shape[0], dtype=_ELEMENT)
    out["l"] = 8
    out["v"] = values
    return out.tobytes()


def _array_head(rows: np.ndarray[Any, Any], lengths: I64) -> None:
    rows["l_array"] = _ARRAY_HEAD_BYTES + 12 * lengths
    rows["ndim"] = 1
    rows["nulls"] = 0
    rows["oid"] = _FLOAT8_OID
    rows["dim"] = lengths
    rows["lbound"] = 1


def encode_rows(
    block: HistogramBlock,
    index: I64,
    times: np.ndarray[Any, Any],
    steps: np.ndarray[Any, Any],
    series_id: int,
) -> bytes:
    """Binary COPY rows (no header or trailer) of the points `index` of a block."""
    m = int(index.shape[0])
    if m == 0:
        return b""
    bins = block.bins[index]
    n_edges = bins + 1
    head = np.empty(m, dtype=_HEAD)
    fill_point_head(head, len(COLUMNS), times[index], series_id, steps[index])
    _array_head(head, n_edges)
    middle = np.empty(m, dtype=_MIDDLE)
    _array_head(middle, bins)
    tail = np.empty(m, dtype=_TAIL)
    tail["l_under"] = tail["l_over"] = tail["l_nan"] = 8
    tail["under"] = block.underflow[index]
    tail["over"] = block.overflow[index]
    tail["nan"] = block.nan_count[index]
    tail["l_hidden"] = 1
    tail["hidden"] = 0
    edges = _elements(block.edges[_gather(block.edge_start[index], n_edges)])
    counts = _elements(block.counts[_gather(block.count_start[index], bins)])
    heads, middles, tails = head.tobytes(), middle.tobytes(), tail.tobytes()
    hs, ms, ts = _HEAD.itemsize, _MIDDLE.itemsize, _TAIL.itemsize
    edge_ends = (np.cumsum(n_edges) * _ELEMENT.itemsize).tolist()
    count_ends = (np.cumsum(bins) * _ELEMENT.itemsize).tolist()
    parts: list[bytes] = []
    e0 = c0 = 0
    for i in range(m):
        e1, c1 = edge_ends[i], count_ends[i]
        parts += (
            heads[i * hs : (i + 1) * hs],
            edges[e0:e1],
            middles[i * ms : (i + 1) * ms],
            counts[c0:c1],
            tails[i * ts : (i + 1) * ts],
        )
        e0, c0 = e1, c1
    return b"".join(parts)


class HistogramStore:
    """The writer (inside the pipeline's transaction) and reader (for
    queries) of histogram series."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def write_histograms(self, conn: asyncpg.Connection, accepted: list[Accepted]) -> int:
        """Append the accepted histograms (one binary COPY)."""
        parts: list[bytes] = []
        rows = 0
        for a in accepted:
            block = a.chunk.payload[0] if a.chunk.payload else None
            assert isinstance(block, HistogramBlock)
            await hide_superseded(conn, TABLE, a)
            parts.append(encode_rows(block, a.index, a.chunk.times, a.chunk.steps, a.series_id))
            rows += int(a.index.size)
        if rows:
            await conn.copy_to_table(
                TABLE, source=copy_source(parts), columns=COLUMNS, format="binary"
            )
        return rows

    async def read_histograms(self, series: Sequence[SeriesHead], window: Window) -> Read:
        """Visible histograms of a window in step order; a point's encoded
        bytes are bounded by 16 per bin plus POINT_OVERHEAD_BYTES."""
        ids = [s.series_id for s in series]
        async with acquire(self.pool) as conn:
            got = await visible_points(
                conn,
                TABLE,
                [(c, c) for c in ("edges", "counts", "underflow", "overflow", "nan_count")],
                ids,
                window,
                cost=f"16 * cardinality(counts) + {POINT_OVERHEAD_BYTES}",
            )
        return Read(got)
