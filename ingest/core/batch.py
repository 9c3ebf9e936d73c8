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

from ingest.core.kinds import (
    INVALID_EVALUATION as INVALID_EVALUATION,
)
from ingest.core.kinds import (
    INVALID_HISTOGRAM as INVALID_HISTOGRAM,
)
from ingest.core.kinds import (
    INVALID_IMAGE as INVALID_IMAGE,
)
from ingest.core.kinds import (
    INVALID_LABELS as INVALID_LABELS,
)
from ingest.core.kinds import (
    INVALID_NAME as INVALID_NAME,
)
from ingest.core.kinds import (
    INVALID_STEP as INVALID_STEP,
)
from ingest.core.kinds import (
    INVALID_TABLE as INVALID_TABLE,
)
from ingest.core.kinds import (
    INVALID_VALUE as INVALID_VALUE,
)
from ingest.core.kinds import (
    KIND_EVALUATION as KIND_EVALUATION,
)
from ingest.core.kinds import (
    KIND_HISTOGRAM as KIND_HISTOGRAM,
)
from ingest.core.kinds import (
    KIND_IMAGE as KIND_IMAGE,
)
from ingest.core.kinds import (
    KIND_MISMATCH as KIND_MISMATCH,
)

# The kinds and reasons are derived from the proto (ingest/core/kinds.py);
# named here too for the many modules that import them with the batch types.
from ingest.core.kinds import (
    KIND_SCALAR as KIND_SCALAR,
)
from ingest.core.kinds import (
    KIND_TABLE as KIND_TABLE,
)
from ingest.core.kinds import (
    LIMIT_EXCEEDED as LIMIT_EXCEEDED,
)
from ingest.core.kinds import (
    REASON_NAMES as REASON_NAMES,
)
from ingest.core.kinds import (
    RUN_NOT_ACTIVE as RUN_NOT_ACTIVE,
)
from ingest.core.kinds import (
    RUN_NOT_FOUND as RUN_NOT_FOUND,
)
from ingest.core.kinds import (
    STEP_CONFLICT as STEP_CONFLICT,
)
from ingest.core.kinds import (
    STEP_MODE_MISMATCH as STEP_MODE_MISMATCH,
)
from ingest.core.kinds import (
    STEP_NOT_INCREASING as STEP_NOT_INCREASING,
)
from ingest.core.kinds import (
    VALUE_NUMERIC as VALUE_NUMERIC,
)
from ingest.core.kinds import (
    VALUE_TEXT as VALUE_TEXT,
)

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


class SequenceGap(Exception):
    """A writer skipped a sequence number: the client must resend from `expected`.

    The numbers are the writer's own, in its own workspace."""

    def __init__(self, writer_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"writer {writer_id[:128]!r}: expected batch sequence {expected}, got {got}; "
            f"resend from {expected}"
        )
        self.expected = expected


@dataclass
class CommitResult:
    """What the commit decided for one batch (beside its outcome)."""

    duplicate_batch: bool = False
    gap: SequenceGap | None = None
    # For a duplicate batch: what the commit that stored it decided, while
    # the service keeps it (the writer's last batches, store/writers.py OUTCOMES_KEPT).
    original: Outcome | None = None
