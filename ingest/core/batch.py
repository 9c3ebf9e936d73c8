"""The columnar in-memory form of ingest batches. Pure: numpy only.

A `Chunk` holds the points of one series from one batch as arrays; a
`DecodedBatch` is one writer's batch; `Outcome` accumulates what happened to
its points (accepted, duplicates, rejections by reason) for the ack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# steplog.v1.SeriesKind values (kept here so pure code needs no proto import).
KIND_SCALAR = 1
KIND_TABLE = 2
KIND_IMAGE = 3
KIND_EVALUATION = 4
KIND_HISTOGRAM = 5

VALUE_NUMERIC = 0
VALUE_TEXT = 1

# steplog.v1.RejectReason values.
INVALID_NAME = 1
INVALID_LABELS = 2
KIND_MISMATCH = 3
STEP_MODE_MISMATCH = 4
STEP_NOT_INCREASING = 5
STEP_CONFLICT = 6
INVALID_STEP = 7
INVALID_VALUE = 8
RUN_NOT_FOUND = 9
RUN_NOT_ACTIVE = 10
LIMIT_EXCEEDED = 11
INVALID_TABLE = 12
INVALID_EVALUATION = 13
INVALID_IMAGE = 14
INVALID_HISTOGRAM = 15

REASON_NAMES = {
    INVALID_NAME: "invalid_name",
    INVALID_LABELS: "invalid_labels",
    KIND_MISMATCH: "kind_mismatch",
    STEP_MODE_MISMATCH: "step_mode_mismatch",
    STEP_NOT_INCREASING: "step_not_increasing",
    STEP_CONFLICT: "step_conflict",
    INVALID_STEP: "invalid_step",
    INVALID_VALUE: "invalid_value",
    RUN_NOT_FOUND: "run_not_found",
    RUN_NOT_ACTIVE: "run_not_active",
    LIMIT_EXCEEDED: "limit_exceeded",
    INVALID_TABLE: "invalid_table",
    INVALID_EVALUATION: "invalid_evaluation",
    INVALID_IMAGE: "invalid_image",
    INVALID_HISTOGRAM: "invalid_histogram",
}

# Rejected points reported back per batch, and how large they may be: every
# string of an example is clipped, and examples stop when their total would
# pass MAX_EXAMPLE_BYTES, so an answer stays small whatever the client sent.
MAX_REPORTED = 20
MAX_EXAMPLE_CHARS = 120
MAX_EXAMPLE_MESSAGE_CHARS = 300
MAX_EXAMPLE_LABELS = 16
MAX_EXAMPLE_BYTES = 16 * 1024

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


@dataclass(slots=True)
class Chunk:
    """The points of one series in one batch, as parallel arrays."""

    run_id: str
    name: str
    labels: dict[str, str]
    labels_key: str
    kind: int
    value_type: int
    stepped: bool
    out_of_order: bool | None  # None: the series' policy, or strict for a new series
    description: str
    steps: I64  # n steps; for unstepped series filled in by order.py
    times: F64  # n wall times, seconds since the epoch
    values: F64 | None  # numeric scalars
    texts: list[str] | None  # text scalars
    # Non-scalar payloads: one entry per point (images, evaluations), or one
    # block for the chunk (a table's TableBlock, a HistogramBlock).
    payload: list[Any] | None = None
    # Points still alive (not rejected by validation or ordering).
    alive: Mask = field(default_factory=lambda: np.ones(0, dtype=np.bool_))

    def __post_init__(self) -> None:
        if self.alive.shape[0] != len(self):
            self.alive = np.ones(len(self), dtype=np.bool_)

    def __len__(self) -> int:
        return int(self.times.shape[0])

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.run_id, self.name, self.labels_key)


def _clip(value: str, limit: int = MAX_EXAMPLE_CHARS) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


Example = tuple[str, str, dict[str, str], int, int | None, int, str]


@dataclass
class Outcome:
    """What happened to a batch's points: the partial-success answer."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    by_reason: dict[int, int] = field(default_factory=dict)
    # (run_id, name, labels, index, step or None, reason, message), clipped.
    examples: list[Example] = field(default_factory=list)
    # UTF-8 bytes of the strings in examples (bounded by MAX_EXAMPLE_BYTES).
    example_bytes: int = 0

    def _count(self, reason: int, n: int) -> None:
        self.rejected += n
        self.by_reason[reason] = self.by_reason.get(reason, 0) + n

    def _example(
        self,
        run_id: str,
        name: str,
        labels: dict[str, str],
        index: int,
        step: int | None,
        reason: int,
        message: str,
    ) -> bool:
        """Record one example if there is room; False when there is none."""
        if len(self.examples) >= MAX_REPORTED or self.example_bytes >= MAX_EXAMPLE_BYTES:
            return False
        shown = {
            _clip(k, 64): _clip(v)
            for k, v in (
                labels.items()
                if len(labels) <= MAX_EXAMPLE_LABELS
                else list(labels.items())[:MAX_EXAMPLE_LABELS]
            )
        }
        example = (
            _clip(run_id),
            _clip(name),
            shown,
            index,
            step,
            reason,
            _clip(message, MAX_EXAMPLE_MESSAGE_CHARS),
        )
        size = (
            len(example[0].encode())
            + len(example[1].encode())
            + sum(len(k.encode()) + len(v.encode()) for k, v in shown.items())
            + len(example[6].encode())
            + 32
        )
        if self.example_bytes + size > MAX_EXAMPLE_BYTES:
            self.example_bytes = MAX_EXAMPLE_BYTES
            return False
        self.examples.append(example)
        self.example_bytes += size
        return True

    def reject(
        self, chunk: Chunk, mask: Mask | None, reason: int, message: str, steps: bool = True
    ) -> int:
        """Reject the alive points selected by mask (all alive points when None)."""
        hit = chunk.alive.copy() if mask is None else (mask & chunk.alive)
        n = int(hit.sum())
        if n == 0:
            return 0
        chunk.alive &= ~hit
        self._count(reason, n)
        room = MAX_REPORTED - len(self.examples)
        if room > 0:
            for idx in np.flatnonzero(hit)[:room]:
                step = int(chunk.steps[idx]) if chunk.stepped and steps else None
                if not self._example(
                    chunk.run_id, chunk.name, chunk.labels, int(idx), step, reason, message
                ):
                    break
        return n

    def reject_one(self, chunk: Chunk, index: int, reason: int, message: str) -> int:
        """Reject one point by index, in constant time (no mask of the chunk's
        length: a chunk of n bad points costs O(n), not O(n^2))."""
        if not chunk.alive[index]:
            return 0
        chunk.alive[index] = False
        self._count(reason, 1)
        step = int(chunk.steps[index]) if chunk.stepped else None
        self._example(chunk.run_id, chunk.name, chunk.labels, index, step, reason, message)
        return 1

    def reject_series(
        self, run_id: str, name: str, labels: dict[str, str], n: int, reason: int, message: str
    ) -> int:
        """Reject the n points of a series that was never decoded (over a
        limit, or malformed): counted as the client claimed, nothing allocated."""
        if n > 0:
            self._count(reason, n)
        # Even with no points (a negative row_count) the client hears why.
        self._example(run_id, name, labels, 0, None, reason, message)
        return max(n, 0)

    def copy(self) -> Outcome:
        return Outcome(
            self.accepted,
            self.duplicates,
            self.rejected,
            dict(self.by_reason),
            list(self.examples),
            self.example_bytes,
        )


@dataclass
class DecodedBatch:
    """One writer's batch after decoding and validation."""

    workspace: str
    writer_id: str
    sequence: int
    sent_time: float
    received_time: float
    chunks: list[Chunk]
    outcome: Outcome
    points: int
    nbytes: int = 0
    _saved: Any = None

    def snapshot(self) -> None:
        """Remember the validated state, so a retried transaction starts over.

        Only what ordering changes is copied: the alive mask, and the steps
        of unstepped chunks (ordering assigns them)."""
        self._saved = (
            [(c.alive.copy(), None if c.stepped else c.steps.copy()) for c in self.chunks],
            self.outcome.copy(),
        )

    def reset(self) -> None:
        if self._saved is None:
            return
        arrays, outcome = self._saved
        for chunk, (alive, steps) in zip(self.chunks, arrays, strict=True):
            chunk.alive = alive.copy()
            if steps is not None:
                chunk.steps = steps.copy()
        self.outcome = outcome.copy()
