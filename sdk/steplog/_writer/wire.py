"""The wire encoding of the writer's columns, and the size bounds it uses.

A scalar series' packed fields (steps, times, values) are written as raw
bytes and merged into `ScalarColumns` with one `MergeFromString`: upb parses a
packed double array about 40x faster than it `extend()`s one from Python
numbers. The field numbers come from the generated descriptors, never from
constants here, so a renumbered .proto cannot silently corrupt batches.

The bounds (SERIES_OVERHEAD, labels_overhead, ...) are upper bounds of the
encoded size of parts of a RunSeries; the batch cutter uses them so a batch
never exceeds max_batch_bytes without serializing it first.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from steplog._writer.transport import Labels
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

_LITTLE_ENDIAN = sys.byteorder == "little"

SERIES_OVERHEAD = 64
LABEL_OVERHEAD = 8
DOUBLE_BYTES = 8
VARINT_MAX_BYTES = 10
# Writer id, sequence, sent_time, workspace and framing of one IngestRequest.
BATCH_HEADER_BYTES = 200


def _packed_field(name: str, kind: int) -> int:
    """The number of a repeated (packed) field of ScalarColumns, checked
    against its type (the raw encoding below depends on both)."""
    f = data_pb2.ScalarColumns.DESCRIPTOR.fields_by_name[name]
    if f.type != kind or not f.is_repeated:
        raise RuntimeError(f"ScalarColumns.{name} is not a repeated field of type {kind}")
    return int(f.number)


STEPS_FIELD = _packed_field("steps", FieldDescriptor.TYPE_INT64)
TIMES_FIELD = _packed_field("times", FieldDescriptor.TYPE_DOUBLE)
VALUES_FIELD = _packed_field("values", FieldDescriptor.TYPE_DOUBLE)


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def le_bytes(column: array[float]) -> bytes:
    if _LITTLE_ENDIAN:
        return column.tobytes()
    swapped = array("d", column)
    swapped.byteswap()
    return swapped.tobytes()


# The smallest value that takes k + 1 varint bytes, for k = 1..9.
_VARINT_FLOORS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


# The record a varint of k bytes is written as: little-endian unsigned fields
# of these sizes (numpy writes a record of 2 + 1 bytes several times faster
# than it copies 3 bytes out of every 4).
_WIDTH_FIELDS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def _varints_of_width(v: np.ndarray[Any, Any], width: int) -> bytes:
    """Varints of values that all take `width` (1..8) bytes: each value's
    7-bit groups are spread into the bytes of one machine word (group k goes
    to byte k: a left shift by k), the continuation bits set in all but the
    last byte, and the word's low `width` bytes written little-endian. About
    a dozen whole-array operations instead of a pass per byte."""
    x: np.ndarray[Any, Any] = v.astype(np.uint32 if width <= 4 else np.uint64)
    one: Any = x.dtype.type
    word: np.ndarray[Any, Any] = x & one(0x7F)
    for k in range(1, width):
        word |= (x << one(k)) & one(0x7F << (8 * k))
    word |= one(sum(0x80 << (8 * k) for k in range(width - 1)))
    sizes = _WIDTH_FIELDS[width]
    if len(sizes) == 1:
        return word.astype(f"<u{width}").tobytes()
    out = np.empty(len(x), dtype=[(f"f{i}", f"<u{size}") for i, size in enumerate(sizes)])
    shift = 0
    for i, size in enumerate(sizes):
        out[f"f{i}"] = word >> one(shift) if shift else word
        shift += 8 * size
    return out.tobytes()


def _varint_width(value: int) -> int:
    return int(np.searchsorted(_VARINT_FLOORS, np.uint64(value), side="right")) + 1


def packed_varints(column: array[int] | np.ndarray[Any, Any]) -> bytes:
    """The payload of a packed int64 field, vectorised (negative values take
    10 bytes, as protobuf encodes them). Steps in order (the usual case) are
    cut where their varint width changes and each run is encoded at its one
    width; any other column byte by byte."""
    if not len(column):
        return b""
    s = np.frombuffer(column, dtype=np.int64) if isinstance(column, array) else column
    lo, hi = int(s.min()), int(s.max())
    if lo >= 0 and hi < 1 << 56:
        v = s.view(np.uint64)
        w_lo, w_hi = _varint_width(lo), _varint_width(hi)
        if w_lo == w_hi:
            return _varints_of_width(v, w_lo)
        if bool(np.all(s[1:] >= s[:-1])):
            cuts = np.searchsorted(v, _VARINT_FLOORS[w_lo - 1 : w_hi - 1]).tolist()
            bounds = [0, *cuts, len(v)]
            runs = enumerate(itertools.pairwise(bounds))
            return b"".join(_varints_of_width(v[a:b], w_lo + i) for i, (a, b) in runs)
    return _packed_varints_any(s.view(np.uint64))


def _packed_varints_any(v: np.ndarray[Any, Any]) -> bytes:
    """Varints of any uint64 values, a pass per byte position."""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for k in range(int(nbytes.max())):
        sel = nbytes > k
        byte = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= (nbytes[sel] > k + 1).astype(np.uint8) << np.uint8(7)
        out[starts[sel] + k] = byte
    return out.tobytes()


def length_delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): tag, length, payload."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _le_view(column: array[float]) -> bytes | memoryview:
    """The little-endian bytes of a double column, without a copy when the
    machine is little-endian (the view is released before the column changes)."""
    return memoryview(column).cast("B") if _LITTLE_ENDIAN else le_bytes(column)


def scalar_columns(steps: array[int], times: array[float], values: array[float] | None) -> bytes:
    """The packed steps, times and (numeric) values of ScalarColumns, encoded
    (the parts joined once: each payload is copied once)."""
    parts: list[bytes | memoryview] = []
    fields: list[tuple[int, bytes | memoryview]] = []
    if steps:
        fields.append((STEPS_FIELD, packed_varints(steps)))
    fields.append((TIMES_FIELD, _le_view(times)))
    if values is not None:
        fields.append((VALUES_FIELD, _le_view(values)))
    for number, payload in fields:
        parts += (encode_varint(number << 3 | 2), encode_varint(len(payload)), payload)
    raw = b"".join(parts)
    for _, payload in fields:
        if isinstance(payload, memoryview):
            payload.release()
    return raw


def labels_overhead(labels: Labels) -> int:
    return sum(len(k) + len(v.encode()) + LABEL_OVERHEAD for k, v in labels)


def series_points(series: data_pb2.SeriesData) -> int:
    """How many points a SeriesData carries (rows, images, documents, values)."""
    kind = series.WhichOneof("points")
    if kind == "scalars":
        return len(series.scalars.values) or len(series.scalars.text_values)
    if kind == "table":
        return int(series.table.row_count)
    if kind == "images":
        return len(series.images.images)
    if kind == "evaluations":
        return len(series.evaluations.documents)
    if kind == "histograms":
        return len(series.histograms.bins)
    return 0


def sole_series(request: pb.IngestRequest | None) -> tuple[str, str, Labels] | None:
    """The (run, name, labels) of a batch's only series, if it held one."""
    if request is None:
        return None
    series = request.batch.series
    if len(series) != 1:
        return None
    rs = series[0]
    return (rs.run_id, rs.series.name, tuple(sorted(rs.series.labels.items())))
