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

import sys
from array import array

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


def packed_varints(column: array[int]) -> bytes:
    """The payload of a packed int64 field, vectorised (negative values take
    10 bytes, as protobuf encodes them)."""
    if not column:
        return b""
    v = np.frombuffer(column, dtype=np.int64).view(np.uint64)
    if int(v.max()) < 0x80:  # the common case: small steps, one byte each
        return v.astype(np.uint8).tobytes()
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


def scalar_columns(steps: array[int], times: array[float], values: array[float] | None) -> bytes:
    """The packed steps, times and (numeric) values of ScalarColumns, encoded."""
    raw = b""
    if steps:
        raw += length_delimited(STEPS_FIELD, packed_varints(steps))
    raw += length_delimited(TIMES_FIELD, le_bytes(times))
    if values is not None:
        raw += length_delimited(VALUES_FIELD, le_bytes(values))
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
