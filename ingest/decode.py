"""Proto batches to columnar chunks. Imports protobuf messages, no I/O.

Packed repeated fields become numpy arrays in one call each: no per-point
Python objects for numeric scalars.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ingest.batch import (
    INVALID_VALUE,
    KIND_EVALUATION,
    KIND_IMAGE,
    KIND_SCALAR,
    KIND_TABLE,
    VALUE_NUMERIC,
    VALUE_TEXT,
    Chunk,
    DecodedBatch,
    Outcome,
)
from ingest.errors import invalid
from ingest.validate import Limits, validate_chunk
from steplog.v1 import data_pb2, ingest_service_pb2

_WRITER_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")

_EMPTY_I64 = np.zeros(0, dtype=np.int64)


def labels_key(labels: dict[str, str]) -> str:
    """The canonical form of a label set, part of the series identity."""
    if not labels:
        return ""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _i64(values: Any) -> np.ndarray[Any, np.dtype[np.int64]]:
    return np.array(values, dtype=np.int64) if len(values) else _EMPTY_I64.copy()


def _f64(values: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array(values, dtype=np.float64)


def writer_id(value: str) -> str:
    if not value or len(value) > 128 or not set(value) <= _WRITER_OK:
        raise invalid(
            "batch.writer_id", "writer_id must be 1..128 characters of letters, digits, '_.:-'"
        )
    return value


def decode_batch(
    workspace: str,
    batch: ingest_service_pb2.Batch,
    received_time: float,
    limits: Limits,
    nbytes: int = 0,
) -> DecodedBatch:
    """Decode and validate one batch. Whole-batch problems raise ApiError;
    per-point problems are recorded in the outcome and the rest is kept."""
    wid = writer_id(batch.writer_id)
    if batch.sequence <= 0:
        raise invalid("batch.sequence", "sequence numbers start at 1")
    outcome = Outcome()
    chunks: list[Chunk] = []
    points = 0
    for position, rs in enumerate(batch.series):
        chunk = _decode_series(rs, received_time, outcome, position)
        if chunk is None:
            continue
        points += len(chunk)
        validate_chunk(chunk, outcome, limits)
        chunks.append(chunk)
    decoded = DecodedBatch(
        workspace=workspace,
        writer_id=wid,
        sequence=int(batch.sequence),
        sent_time=batch.sent_time,
        received_time=received_time,
        chunks=chunks,
        outcome=outcome,
        points=points,
        nbytes=nbytes,
    )
    decoded.snapshot()
    return decoded


def _policy(series: data_pb2.SeriesData) -> bool | None:
    if series.step_policy == data_pb2.STEP_POLICY_OUT_OF_ORDER:
        return True
    if series.step_policy == data_pb2.STEP_POLICY_STRICT:
        return False
    return None


def _times(times: Any, n: int, received: float) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    if len(times) == 0:
        return np.full(n, received, dtype=np.float64)
    if len(times) != n:
        return None
    return _f64(times)


def _decode_series(
    rs: ingest_service_pb2.RunSeries, received: float, outcome: Outcome, position: int
) -> Chunk | None:
    series = rs.series
    labels = dict(series.labels)
    which = series.WhichOneof("points")
    common: dict[str, Any] = {
        "run_id": rs.run_id,
        "name": series.name,
        "labels": labels,
        "labels_key": labels_key(labels),
        "out_of_order": _policy(series),
        "description": series.description,
    }
    if which == "scalars":
        sc = series.scalars
        n_num, n_text = len(sc.values), len(sc.text_values)
        if n_num and n_text:
            _malformed(
                common,
                max(n_num, n_text),
                outcome,
                "values and text_values are both set; a series holds one type",
            )
            return None
        n = n_num or n_text
        if n == 0:
            return None
        steps = _i64(sc.steps)
        stepped = steps.size > 0
        times = _times(sc.times, n, received)
        if (stepped and steps.size != n) or times is None:
            _malformed(
                common,
                n,
                outcome,
                f"{n} values but {len(sc.steps)} steps and {len(sc.times)} times",
            )
            return None
        return Chunk(
            kind=KIND_SCALAR,
            value_type=VALUE_TEXT if n_text else VALUE_NUMERIC,
            stepped=stepped,
            steps=steps if stepped else np.zeros(n, dtype=np.int64),
            times=times,
            values=None if n_text else _f64(sc.values),
            texts=list(sc.text_values) if n_text else None,
            **common,
        )
    if which in ("table", "images", "evaluations"):
        kind = {"table": KIND_TABLE, "images": KIND_IMAGE, "evaluations": KIND_EVALUATION}[which]
        payload_msg = getattr(series, which)
        items: Any
        if which == "table":
            n = payload_msg.row_count
            if n < 0:
                _malformed(common, 0, outcome, f"row_count must be >= 0, not {n}")
                return None
            items = [payload_msg]
        elif which == "images":
            items = list(payload_msg.images)
            n = len(items)
        else:
            items = list(payload_msg.documents)
            n = len(items)
        if n == 0:
            return None
        steps = _i64(payload_msg.steps)
        stepped = steps.size > 0
        times = _times(payload_msg.times, n, received)
        if (stepped and steps.size != n) or times is None:
            _malformed(
                common,
                n,
                outcome,
                f"{n} points but {len(payload_msg.steps)} steps and {len(payload_msg.times)} times",
            )
            return None
        chunk = Chunk(
            kind=kind,
            value_type=VALUE_NUMERIC,
            stepped=stepped,
            steps=steps if stepped else np.zeros(n, dtype=np.int64),
            times=times,
            values=None,
            texts=None,
            payload=items,
            **common,
        )
        return chunk
    return None


def _malformed(common: dict[str, Any], n: int, outcome: Outcome, message: str) -> None:
    """Reject every point of a series whose columns do not fit together."""
    chunk = Chunk(
        kind=KIND_SCALAR,
        value_type=VALUE_NUMERIC,
        stepped=False,
        steps=np.zeros(n, dtype=np.int64),
        times=np.zeros(n, dtype=np.float64),
        values=None,
        texts=None,
        **common,
    )
    outcome.reject(chunk, None, INVALID_VALUE, message, steps=False)
    return None
