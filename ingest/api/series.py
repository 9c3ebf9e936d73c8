"""Stored points -> the SeriesData messages of query answers, one function
per kind: the only place the reads turn into protobuf."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ingest.core.kinds import (
    KIND_EVALUATION,
    KIND_HISTOGRAM,
    KIND_IMAGE,
    KIND_SCALAR,
    KIND_TABLE,
)
from ingest.core.tables import BOOL, DOUBLE, INT64, STRING
from ingest.store.columns import Points
from ingest.store.queries import Column, Point, Read, SeriesHead
from steplog.v1 import data_pb2

_ARRAY_FIELD = {DOUBLE: "doubles", INT64: "ints", STRING: "strings", BOOL: "bools"}


def scalar_columns(rows: Sequence[Point], text: bool) -> data_pb2.ScalarColumns:
    cols = data_pb2.ScalarColumns(steps=[r["step"] for r in rows], times=[r["t"] for r in rows])
    if text:
        cols.text_values.extend(r["value"] for r in rows)
    else:
        cols.values.extend(r["value"] for r in rows)
    return cols


# 2**7, 2**14, ..., 2**63: a value at or above k of these takes k + 1 bytes.
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_VARINT_SHIFTS = np.arange(10, dtype=np.uint64) * np.uint64(7)


def varints(x: npt.NDArray[np.int64]) -> bytes:
    """Protobuf's varint encoding of int64 values, all at once with numpy (a
    negative value takes ten bytes, its two's complement, as protobuf writes it)."""
    if len(x) == 0:
        return b""
    u = x.astype(np.uint64)
    top = int(u.max())
    width = max(1, (top.bit_length() + 6) // 7)  # bytes of the largest value
    if width == 1:
        return u.astype(np.uint8).tobytes()
    # Bytes beyond the first, per value: how many limits it reaches.
    more = np.searchsorted(_VARINT_LIMITS[: width - 1], u, "right")
    # A byte per (value, position), the continuation bit on all but a value's
    # last byte; the bytes past a value's size are dropped, row by row.
    cells = ((u[:, None] >> _VARINT_SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    position = np.arange(width)
    cont = position < more[:, None]
    cells[cont] |= np.uint8(0x80)
    return cells[position <= more[:, None]].tobytes()


def _varint(n: int) -> bytes:
    """One non-negative int's varint."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _packed(field: int, payload: bytes) -> bytes:
    """A packed repeated field: its tag (wire type 2), length and bytes."""
    if not payload:
        return b""
    return bytes([field << 3 | 2]) + _varint(len(payload)) + payload


def scalar_bytes(points: Points) -> bytes:
    """Numeric scalar points read as numpy columns -> ScalarColumns' bytes,
    encoded with numpy (packed steps as varints, times and values as
    little-endian doubles, bit for bit): no Python object per point."""
    return (
        _packed(1, varints(points.steps))
        + _packed(2, points.times.astype("<f8").tobytes())
        + _packed(3, points.values.astype("<f8").tobytes())
    )


def scalar_arrays(points: Points) -> data_pb2.ScalarColumns:
    """scalar_bytes parsed by protobuf."""
    return data_pb2.ScalarColumns.FromString(scalar_bytes(points))


def table_columns(
    rows: Sequence[Point], columns: Iterable[Column], with_steps: bool = True
) -> data_pb2.TableColumns:
    """Stored rows -> TableColumns, columns in order of first appearance; a
    cell past the end of its row's array (an older row) reads as missing."""
    table = data_pb2.TableColumns(row_count=len(rows), times=[r["t"] for r in rows])
    if with_steps:
        table.steps.extend(r["step"] for r in rows)
    for col in sorted(columns, key=lambda c: c.position):
        field = _ARRAY_FIELD[col.type]
        slot = col.slot
        cells = [
            a[slot] if a is not None and slot < len(a) else None for a in (r[field] for r in rows)
        ]
        out = table.columns.add(name=col.name, type=col.type)
        present = [c is not None for c in cells]
        if col.type == DOUBLE:
            out.doubles.extend(0.0 if c is None else c for c in cells)
        elif col.type == INT64:
            out.ints.extend(0 if c is None else c for c in cells)
        elif col.type == BOOL:
            out.bools.extend(False if c is None else c for c in cells)
        else:
            out.strings.extend("" if c is None else c for c in cells)
        if not all(present):
            out.present.extend(present)
    return table


def image_points(
    rows: Sequence[Point], blobs: Mapping[str, bytes] | None = None
) -> data_pb2.ImagePoints:
    data = blobs or {}
    return data_pb2.ImagePoints(
        steps=[r["step"] for r in rows],
        times=[r["t"] for r in rows],
        images=[
            data_pb2.Image(
                data=data.get(r["sha256"], b""),
                content_type=r["content_type"],
                width=r["width"],
                height=r["height"],
                sha256=r["sha256"],
                size=r["size"],
            )
            for r in rows
        ],
    )


def evaluation_points(rows: Sequence[Point]) -> data_pb2.EvaluationPoints:
    return data_pb2.EvaluationPoints(
        steps=[r["step"] for r in rows],
        times=[r["t"] for r in rows],
        documents=[r["document"] for r in rows],
    )


def histogram_points(rows: Sequence[Point], with_steps: bool = True) -> data_pb2.HistogramPoints:
    """Stored rows -> HistogramPoints; underflow, overflow and nan_count only
    when some point has one."""
    points = data_pb2.HistogramPoints(
        times=[r["t"] for r in rows], bins=[len(r["counts"]) for r in rows]
    )
    if with_steps:
        points.steps.extend(r["step"] for r in rows)
    points.edges.extend(itertools.chain.from_iterable(r["edges"] for r in rows))
    points.counts.extend(itertools.chain.from_iterable(r["counts"] for r in rows))
    for field in ("underflow", "overflow", "nan_count"):
        values = [r[field] for r in rows]
        if any(values):
            getattr(points, field).extend(values)
    return points


def _fill(data: data_pb2.SeriesData, s: SeriesHead, rows: Sequence[Point], read: Read) -> None:
    """Set the kind's points of data (present even when empty: the kind shows)."""
    if s.kind == KIND_SCALAR and s.series_id in read.slice.columns:
        data.scalars.CopyFrom(scalar_arrays(read.slice.columns[s.series_id]))
        data.scalars.SetInParent()
    elif s.kind == KIND_SCALAR:
        data.scalars.CopyFrom(scalar_columns(rows, s.text))
        data.scalars.SetInParent()
    elif s.kind == KIND_TABLE:
        data.table.CopyFrom(table_columns(rows, read.columns.get(s.series_id, ())))
        data.table.SetInParent()
    elif s.kind == KIND_IMAGE:
        data.images.CopyFrom(image_points(rows, read.blobs))
        data.images.SetInParent()
    elif s.kind == KIND_EVALUATION:
        data.evaluations.CopyFrom(evaluation_points(rows))
        data.evaluations.SetInParent()
    elif s.kind == KIND_HISTOGRAM:
        data.histograms.CopyFrom(histogram_points(rows))
        data.histograms.SetInParent()


def fill_chart(data: data_pb2.SeriesData, s: SeriesHead, points: Points) -> None:
    """A numeric scalar series read as columns (ReadCharts) into its
    SeriesData in place (a ChartSeries' own: the points parsed once into the
    answer, never copied)."""
    data.name = s.name
    data.labels.update(s.labels)
    data.description = s.description
    data.scalars.MergeFromString(scalar_bytes(points))
    data.scalars.SetInParent()


def series_data(s: SeriesHead, read: Read) -> data_pb2.SeriesData:
    """One series of a read as SeriesData (the points of this slice only)."""
    data = data_pb2.SeriesData(name=s.name, labels=s.labels, description=s.description)
    _fill(data, s, read.slice.rows.get(s.series_id, []), read)
    return data
