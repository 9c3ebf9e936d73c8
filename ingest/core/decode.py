"""Proto batches to columnar chunks. Imports protobuf messages, no I/O.

Packed repeated fields become numpy arrays in one call each: no per-point
Python objects for numeric scalars.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from ingest.core import histograms
from ingest.core.batch import (
    INVALID_VALUE,
    KIND_EVALUATION,
    KIND_HISTOGRAM,
    KIND_IMAGE,
    KIND_SCALAR,
    KIND_TABLE,
    LIMIT_EXCEEDED,
    MAX_EXAMPLE_LABELS,
    VALUE_NUMERIC,
    VALUE_TEXT,
    Chunk,
    DecodedBatch,
    Outcome,
)
from ingest.core.errors import invalid
from ingest.core.images import DecodeBudget
from ingest.core.tables import table_structure_problem
from ingest.core.validate import Limits, series_problem, validate_chunk
from steplog.v1 import data_pb2, ingest_service_pb2

_WRITER_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")

_EMPTY_I64 = np.zeros(0, dtype=np.int64)


# Label sets already put in canonical form, by their sorted items: a
# service sees the same few label sets in batch after batch (a rank's
# labels, a node's), and json.dumps costs more than the rest of a small
# series' decode. Bounded: emptied when it reaches _KEYS_MOST entries.
_KEYS: dict[tuple[tuple[str, str], ...], str] = {}
_KEYS_MOST = 4096


def labels_key(labels: dict[str, str]) -> str:
    """The canonical form of a label set, part of the series identity."""
    if not labels:
        return ""
    items = tuple(sorted(labels.items()))
    key = _KEYS.get(items)
    if key is None:
        key = json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if len(_KEYS) >= _KEYS_MOST:
            _KEYS.clear()
        _KEYS[items] = key
    return key


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


def _claimed(series: data_pb2.SeriesData) -> tuple[str | None, Any, int]:
    """(which, points message, n): how many points the series says it holds,
    from lengths alone (O(1), nothing allocated). For a table that is
    row_count, which is checked against the data before it is trusted."""
    which = series.WhichOneof("points")
    if which is None:
        return None, None, 0
    msg = getattr(series, which)
    if which == "scalars":
        return which, msg, max(len(msg.values), len(msg.text_values))
    if which == "table":
        return which, msg, int(msg.row_count)
    if which == "images":
        return which, msg, len(msg.images)
    if which == "histograms":
        return which, msg, len(msg.bins)
    return which, msg, len(msg.documents)


def _shown_labels(labels: Any, limit: int) -> dict[str, str]:
    """The labels to name a series by; a map over the limit is not copied whole."""
    if len(labels) <= limit:
        return dict(labels)
    return dict(itertools.islice(labels.items(), MAX_EXAMPLE_LABELS))


def decode_batch(
    workspace: str,
    batch: ingest_service_pb2.Batch,
    received_time: float,
    limits: Limits,
    nbytes: int = 0,
) -> DecodedBatch:
    """Decode and validate one batch. Whole-batch problems raise ApiError;
    per-point problems are recorded in the outcome and the rest is kept.

    Every count and length is checked against the limits before anything is
    allocated for it: a series over a limit, or whose columns do not fit
    together, is rejected from its lengths alone. Series past
    limits.max_series_per_batch, or whose points would take the batch past
    limits.max_points_per_batch, are rejected with LIMIT_EXCEEDED, and so are
    images past limits.max_image_decode_bytes of pixels (core.images)."""
    wid = writer_id(batch.writer_id)
    if batch.sequence <= 0:
        raise invalid("batch.sequence", "sequence numbers start at 1")
    outcome = Outcome()
    chunks: list[Chunk] = []
    points = 0
    images = DecodeBudget(limits.max_image_decode_bytes)  # all image series together
    for position, rs in enumerate(batch.series):
        series = rs.series
        which, msg, n = _claimed(series)
        if which is None or n == 0:
            continue
        if position >= limits.max_series_per_batch:
            outcome.reject_series(
                rs.run_id,
                series.name,
                _shown_labels(series.labels, limits.max_labels),
                n,
                LIMIT_EXCEEDED,
                f"series {position + 1} of this batch; the limit is "
                f"{limits.max_series_per_batch} series per batch",
            )
            continue
        room = limits.max_points_per_batch - points
        chunk = _decode_series(rs, which, msg, n, received_time, outcome, limits, room)
        if chunk is None:
            continue
        points += len(chunk)
        validate_chunk(chunk, outcome, limits, series_checked=True, images=images)
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


def _structure_problem(which: str, msg: Any, n: int, limits: Limits) -> tuple[int, str] | None:
    """Whether the columns of a series fit together, from lengths alone."""
    if which == "scalars":
        if len(msg.values) and len(msg.text_values):
            return INVALID_VALUE, "values and text_values are both set; a series holds one type"
    elif which == "table":
        if n < 0:
            return INVALID_VALUE, f"row_count must be >= 0, not {n}"
        if n > 0:
            found = table_structure_problem(msg, n, limits.max_table_rows, limits.max_table_columns)
            if found is not None:
                return found
    elif which == "histograms":
        found = histograms.structure_problem(msg, n)
        if found is not None:
            return found
    steps, times = len(msg.steps), len(msg.times)
    if steps not in (0, n) or times not in (0, n):
        return INVALID_VALUE, f"{n} points but {steps} steps and {times} times"
    return None


def _decode_series(
    rs: ingest_service_pb2.RunSeries,
    which: str,
    msg: Any,
    n: int,
    received: float,
    outcome: Outcome,
    limits: Limits,
    room: int,
) -> Chunk | None:
    """One series -> Chunk, or None when it is refused (recorded in outcome)
    or empty. room: points the batch may still decode."""
    series = rs.series
    run_id, name, description = rs.run_id, series.name, series.description
    proto_labels = series.labels
    # A map over the limit is not copied (series_problem rejects it by its length).
    labels = dict(proto_labels) if len(proto_labels) <= limits.max_labels else {}
    problem = series_problem(
        run_id, name, labels if labels else proto_labels, description, limits
    ) or _structure_problem(which, msg, n, limits)
    if problem is None and n > room:
        problem = (
            LIMIT_EXCEEDED,
            f"{n} points would take this batch past {limits.max_points_per_batch} points; "
            "send them in another batch",
        )
    if problem is not None:
        outcome.reject_series(
            run_id,
            name,
            labels or _shown_labels(proto_labels, limits.max_labels),
            max(n, 0),
            problem[0],
            problem[1],
        )
        return None
    if n == 0:
        return None
    stepped = len(msg.steps) > 0
    steps = _i64(msg.steps) if stepped else np.zeros(n, dtype=np.int64)
    times = _f64(msg.times) if len(msg.times) else np.full(n, received, dtype=np.float64)
    common: dict[str, Any] = {
        "run_id": run_id,
        "name": name,
        "labels": labels,
        "labels_key": labels_key(labels),
        "out_of_order": _policy(series),
        "description": description,
        "stepped": stepped,
        "steps": steps,
        "times": times,
        "alive": np.ones(n, dtype=np.bool_),  # not Chunk's default, then a second
    }
    if which == "scalars":
        text = len(msg.text_values) > 0
        return Chunk(
            kind=KIND_SCALAR,
            value_type=VALUE_TEXT if text else VALUE_NUMERIC,
            values=None if text else _f64(msg.values),
            texts=list(msg.text_values) if text else None,
            **common,
        )
    kind = {
        "table": KIND_TABLE,
        "images": KIND_IMAGE,
        "evaluations": KIND_EVALUATION,
        "histograms": KIND_HISTOGRAM,
    }[which]
    # Images and documents stay in the request's containers until validation
    # reads them one by one (a list of n wrappers would cost more than they do).
    payload: Any
    if which == "table":
        payload = [msg]
    elif which == "histograms":
        payload = [histograms.decode(msg)]
    elif which == "images":
        payload = msg.images
    else:
        payload = msg.documents
    return Chunk(
        kind=kind,
        value_type=VALUE_NUMERIC,
        values=None,
        texts=None,
        payload=payload,
        **common,
    )
