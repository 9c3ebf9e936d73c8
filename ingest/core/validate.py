"""Validation of decoded chunks, with a reason per point. Pure.

Whole-series problems (a bad name, bad labels) reject every point of the
chunk; point problems (a negative step, a bad time, an oversize string)
reject only those points. The valid points of a batch are always kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ingest.core.batch import (
    INVALID_LABELS,
    INVALID_NAME,
    INVALID_STEP,
    INVALID_VALUE,
    KIND_EVALUATION,
    KIND_HISTOGRAM,
    KIND_IMAGE,
    KIND_TABLE,
    LIMIT_EXCEEDED,
    RUN_NOT_FOUND,
    Chunk,
    Outcome,
)
from ingest.core.checks import CONTROL, LABEL_KEY, clip, label_key_ok
from ingest.core.evaluations import validate_evaluations
from ingest.core.histograms import DEFAULT_MAX_BINS, validate_histograms
from ingest.core.images import DecodeBudget, validate_images
from ingest.core.model import run_id_ok
from ingest.core.tables import validate_table

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
    # Histograms: bins of one point (16 bytes each).
    max_histogram_bins: int = DEFAULT_MAX_BINS
    max_image_bytes: int = 16 * 1024 * 1024
    # Pixel bytes the images of one batch may decode to, all together.
    max_image_decode_bytes: int = 1024 * 1024 * 1024
    # One batch: series and points decoded; the rest is rejected LIMIT_EXCEEDED
    # without being decoded (together they bound the memory a batch costs).
    max_series_per_batch: int = 100_000
    max_points_per_batch: int = 1_000_000


def name_problem(name: str) -> str | None:
    if not name:
        return "series name is empty"
    if len(name) > MAX_NAME:
        return f"series name is {len(name)} characters; the limit is {MAX_NAME}"
    if CONTROL.search(name):
        return "series name contains a control character"
    return None


def labels_problem(labels: Mapping[str, str], limits: Limits) -> str | None:
    if len(labels) > limits.max_labels:
        return f"{len(labels)} labels; the limit is {limits.max_labels}"
    for key, value in labels.items():
        if not label_key_ok(key):
            return f"label key {clip(key, 70)!r} must match {LABEL_KEY.pattern}"
        if len(value) > MAX_LABEL_VALUE:
            return f"label {key!r} value is longer than {MAX_LABEL_VALUE} characters"
        if CONTROL.search(value):
            return f"label {key!r} value contains a control character"
    return None


def series_problem(
    run_id: str, name: str, labels: Mapping[str, str], description: str, limits: Limits
) -> tuple[int, str] | None:
    """(reason, message) for a series that cannot be stored at all, or None.

    Checked before anything of the series is decoded. A run id that cannot
    be one (NUL, control characters, too long) names no run, so its points
    are RUN_NOT_FOUND here, without asking the database; a NUL in the
    description (PostgreSQL text cannot hold it) rejects the series'
    points with INVALID_VALUE."""
    if not run_id_ok(run_id):
        return (
            RUN_NOT_FOUND,
            f"run id {clip(run_id, 60)!r} is not a run id (1..128 characters of letters, "
            "digits, '_', '-' and '.'), so no such run exists",
        )
    problem = name_problem(name)
    if problem:
        return INVALID_NAME, problem
    problem = labels_problem(labels, limits)
    if problem:
        return INVALID_LABELS, problem
    if "\x00" in description:
        return INVALID_VALUE, "series description contains a NUL character"
    return None


def validate_chunk(
    chunk: Chunk,
    outcome: Outcome,
    limits: Limits,
    series_checked: bool = False,
    images: DecodeBudget | None = None,
) -> None:
    """Reject what is invalid in the chunk; leave the rest alive.

    series_checked: decode already ran `series_problem` on this series (and
    `table_structure_problem` on a table). images: the batch's decode
    budget, shared by its image chunks (None: a fresh one for this chunk)."""
    if not series_checked:
        found = series_problem(chunk.run_id, chunk.name, chunk.labels, chunk.description, limits)
        if found is not None:
            outcome.reject(chunk, None, found[0], found[1], steps=False)
            return
    # The common case (every step and time fine) decided by a reduction or
    # two; the masks only for a chunk that holds a bad one (a NaN time fails
    # the first test, as it fails the mask's).
    steps, times = chunk.steps, chunk.times
    if chunk.stepped and steps.shape[0] and steps.min() < 0:
        outcome.reject(chunk, steps < 0, INVALID_STEP, "step must be >= 0")
    if times.shape[0] and not (times.min() >= MIN_TIME and times.max() <= MAX_TIME):
        bad_time = ~((times >= MIN_TIME) & (times <= MAX_TIME))
        outcome.reject(chunk, bad_time, INVALID_VALUE, "time must be seconds since 1970 (< 2200)")
    if chunk.kind == KIND_TABLE:
        validate_table(
            chunk,
            outcome,
            limits.max_table_columns,
            limits.max_table_rows,
            limits.max_text_value_chars,
            checked=series_checked,
        )
    elif chunk.kind == KIND_EVALUATION:
        validate_evaluations(chunk, outcome, limits.max_evaluation_bytes)
    elif chunk.kind == KIND_HISTOGRAM:
        validate_histograms(chunk, outcome, limits.max_histogram_bins)
    elif chunk.kind == KIND_IMAGE:
        if images is None:
            images = DecodeBudget(limits.max_image_decode_bytes)
        validate_images(chunk, outcome, limits.max_image_bytes, images)
    elif chunk.texts is not None:
        _check_texts(chunk, outcome, limits.max_text_value_chars)


def _check_texts(chunk: Chunk, outcome: Outcome, limit: int) -> None:
    """Text values: NUL is INVALID_VALUE (it cannot be stored), over the
    length limit LIMIT_EXCEEDED. The common case is decided in C."""
    texts = chunk.texts or []
    if max(map(len, texts), default=0) <= limit and "\x00" not in "".join(texts):
        return
    nul = np.fromiter(("\x00" in t for t in texts), dtype=np.bool_, count=len(texts))
    if nul.any():
        outcome.reject(chunk, nul, INVALID_VALUE, "string value contains a NUL character")
    too_long = np.fromiter((len(t) > limit for t in texts), dtype=np.bool_, count=len(texts))
    if too_long.any():
        outcome.reject(
            chunk, too_long, LIMIT_EXCEEDED, f"string value longer than {limit} characters"
        )
