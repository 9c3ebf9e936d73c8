"""PostgreSQL's binary COPY format: the header and trailer, written once, and
the encoder of scalar_points rows (a numpy structured array, no per-point
Python objects). Every store that COPYs uses these."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

PG_EPOCH = 946684800.0  # 2000-01-01T00:00:00Z, PostgreSQL's timestamp origin

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def copy_payload(rows: Sequence[bytes]) -> bytes:
    """Encoded rows as one COPY payload."""
    return COPY_HEADER + b"".join(rows) + COPY_TRAILER


async def copy_source(rows: Sequence[bytes]) -> AsyncIterator[bytes]:
    """The COPY stream piece by piece: no copy of a group's rows into one buffer."""
    yield COPY_HEADER
    for part in rows:
        yield part
    yield COPY_TRAILER


# The fields every points row starts with in PostgreSQL's binary COPY format:
# the field count, then (length, big-endian value) of time, series_id, step.
POINT_HEAD: list[tuple[str, str]] = [
    ("nfields", ">i2"),
    ("l_time", ">i4"),
    ("time", ">i8"),
    ("l_sid", ">i4"),
    ("sid", ">i8"),
    ("l_step", ">i4"),
    ("step", ">i8"),
]


def fill_point_head(
    rows: np.ndarray[Any, Any],
    nfields: int,
    times: np.ndarray[Any, Any],
    series_ids: np.ndarray[Any, Any] | int,
    steps: np.ndarray[Any, Any],
) -> None:
    """Set the POINT_HEAD fields of encoded rows (times in epoch seconds)."""
    rows["nfields"] = nfields
    rows["l_time"] = 8
    rows["time"] = np.rint((times - PG_EPOCH) * 1e6).astype(np.int64)
    rows["l_sid"] = 8
    rows["sid"] = series_ids
    rows["l_step"] = 8
    rows["step"] = steps


# One scalar_points row in PostgreSQL's binary COPY format: field count, then
# (length, big-endian value) per column: time, series_id, step, value, hidden.
SCALAR_ROW = np.dtype(
    [
        *POINT_HEAD,
        ("l_value", ">i4"),
        ("value", ">f8"),
        ("l_hidden", ">i4"),
        ("hidden", "u1"),
    ]
)
SCALAR_COLUMNS = ["time", "series_id", "step", "value", "hidden"]


def encode_scalar_copy(
    times: np.ndarray[Any, Any],
    series_ids: np.ndarray[Any, Any],
    steps: np.ndarray[Any, Any],
    values: np.ndarray[Any, Any],
    hidden: np.ndarray[Any, Any] | None = None,
) -> bytes:
    """Build a binary COPY payload for scalar_points (or scalar_rows) from
    arrays, vectorized: no per-row Python objects on the hot path. `hidden`
    (bool per row) defaults to none hidden."""
    rows = np.empty(times.shape[0], dtype=SCALAR_ROW)
    fill_point_head(rows, len(SCALAR_COLUMNS), times, series_ids, steps)
    rows["l_value"] = 8
    rows["value"] = values
    rows["l_hidden"] = 1
    rows["hidden"] = 0 if hidden is None else hidden
    return COPY_HEADER + rows.tobytes() + COPY_TRAILER
