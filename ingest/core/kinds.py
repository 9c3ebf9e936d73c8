"""Series kinds and reject reasons, read from the proto descriptors
(steplog.v1.SeriesKind, steplog.v1.RejectReason), so a new enum value in
protos/ is known here without a copy to keep in step. Pure: the generated
messages' descriptors only."""

from __future__ import annotations

from steplog.v1 import data_pb2, ingest_service_pb2


def _names(enum: object, prefix: str) -> dict[int, str]:
    values = enum.DESCRIPTOR.values  # type: ignore[attr-defined]
    return {v.number: v.name.removeprefix(prefix).lower() for v in values if v.number}


KIND_SCALAR: int = data_pb2.SERIES_KIND_SCALAR
KIND_TABLE: int = data_pb2.SERIES_KIND_TABLE
KIND_IMAGE: int = data_pb2.SERIES_KIND_IMAGE
KIND_EVALUATION: int = data_pb2.SERIES_KIND_EVALUATION
KIND_HISTOGRAM: int = data_pb2.SERIES_KIND_HISTOGRAM
# kind -> "scalar", "table", ... (metric labels, messages)
KIND_LABELS: dict[int, str] = _names(data_pb2.SeriesKind, "SERIES_KIND_")

_R = ingest_service_pb2
INVALID_NAME: int = _R.REJECT_REASON_INVALID_NAME
INVALID_LABELS: int = _R.REJECT_REASON_INVALID_LABELS
KIND_MISMATCH: int = _R.REJECT_REASON_KIND_MISMATCH
STEP_MODE_MISMATCH: int = _R.REJECT_REASON_STEP_MODE_MISMATCH
STEP_NOT_INCREASING: int = _R.REJECT_REASON_STEP_NOT_INCREASING
STEP_CONFLICT: int = _R.REJECT_REASON_STEP_CONFLICT
INVALID_STEP: int = _R.REJECT_REASON_INVALID_STEP
INVALID_VALUE: int = _R.REJECT_REASON_INVALID_VALUE
RUN_NOT_FOUND: int = _R.REJECT_REASON_RUN_NOT_FOUND
RUN_NOT_ACTIVE: int = _R.REJECT_REASON_RUN_NOT_ACTIVE
LIMIT_EXCEEDED: int = _R.REJECT_REASON_LIMIT_EXCEEDED
INVALID_TABLE: int = _R.REJECT_REASON_INVALID_TABLE
INVALID_EVALUATION: int = _R.REJECT_REASON_INVALID_EVALUATION
INVALID_IMAGE: int = _R.REJECT_REASON_INVALID_IMAGE
INVALID_HISTOGRAM: int = _R.REJECT_REASON_INVALID_HISTOGRAM
# reason -> "invalid_name", ... (metric labels)
REASON_NAMES: dict[int, str] = _names(_R.RejectReason, "REJECT_REASON_")

# A scalar series holds numbers or strings (series.value_type).
VALUE_NUMERIC = 0
VALUE_TEXT = 1
