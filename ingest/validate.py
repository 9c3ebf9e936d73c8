"""Validation of decoded chunks, with a reason per point. Pure.

Whole-series problems (a bad name, bad labels) reject every point of the
chunk; point problems (a negative step, a bad time, an oversize string)
reject only those points. The valid points of a batch are always kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ingest.batch import (
    INVALID_LABELS,
    INVALID_NAME,
    INVALID_STEP,
    INVALID_VALUE,
    KIND_EVALUATION,
    KIND_IMAGE,
    KIND_TABLE,
    LIMIT_EXCEEDED,
    Chunk,
    Outcome,
)
from ingest.evaluations import validate_evaluations
from ingest.images import validate_images
from ingest.tables import validate_table

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LABEL_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

MAX_NAME = 255
MAX_LABEL_VALUE = 256
# Wall times must fall between 1970 and 2200.
MIN_TIME = 0.0
MAX_TIME = 7258118400.0


@dataclass(frozen=True)
class Limits:
    max_labels: int = 16
    max_text_value_chars: int = 4096
    # Tables: distinct columns per request and per series, rows per request
    # (per series); evaluation documents: bytes each.
    max_table_columns: int = 1000
    max_table_rows: int = 100_000
    max_evaluation_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024


def name_problem(name: str) -> str | None:
    if not name:
        return "series name is empty"
    if len(name) > MAX_NAME:
        return f"series name is {len(name)} characters; the limit is {MAX_NAME}"
    if _CONTROL.search(name):
        return "series name contains a control character"
    return None


def labels_problem(labels: dict[str, str], limits: Limits) -> str | None:
    if len(labels) > limits.max_labels:
        return f"{len(labels)} labels; the limit is {limits.max_labels}"
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            return f"label key {key[:70]!r} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}"
        if len(value) > MAX_LABEL_VALUE:
            return f"label {key!r} value is longer than {MAX_LABEL_VALUE} characters"
        if _CONTROL.search(value):
            return f"label {key!r} value contains a control character"
    return None


def validate_chunk(chunk: Chunk, outcome: Outcome, limits: Limits) -> None:
    """Reject what is invalid in the chunk; leave the rest alive."""
    problem = name_problem(chunk.name)
    if problem:
        outcome.reject(chunk, None, INVALID_NAME, problem, steps=False)
        return
    problem = labels_problem(chunk.labels, limits)
    if problem:
        outcome.reject(chunk, None, INVALID_LABELS, problem, steps=False)
        return
    if chunk.stepped:
        negative = chunk.steps < 0
        if negative.any():
            outcome.reject(chunk, negative, INVALID_STEP, "step must be >= 0")
    bad_time = ~((chunk.times >= MIN_TIME) & (chunk.times <= MAX_TIME))
    if bad_time.any():
        outcome.reject(chunk, bad_time, INVALID_VALUE, "time must be seconds since 1970 (< 2200)")
    if chunk.kind == KIND_TABLE:
        validate_table(
            chunk,
            outcome,
            limits.max_table_columns,
            limits.max_table_rows,
            limits.max_text_value_chars,
        )
    elif chunk.kind == KIND_EVALUATION:
        validate_evaluations(chunk, outcome, limits.max_evaluation_bytes)
    elif chunk.kind == KIND_IMAGE:
        validate_images(chunk, outcome, limits.max_image_bytes)
    if chunk.texts is not None:
        limit = limits.max_text_value_chars
        too_long = np.fromiter(
            (len(t) > limit or "\x00" in t for t in chunk.texts), dtype=np.bool_, count=len(chunk)
        )
        if too_long.any():
            outcome.reject(
                chunk,
                too_long,
                LIMIT_EXCEEDED,
                f"string value longer than {limit} characters or contains NUL",
            )
