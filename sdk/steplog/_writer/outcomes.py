"""What the writer tells the user: its warnings and errors, its counters
(`WriterStats`), and the bookkeeping behind them (`Outcomes`: counts, kept
rejections, one warning per series and reason). Pure code: the lane holds
its lock around every call; the news is delivered on the user's thread by
the next log/flush/close (`Notes`), so warnings point at user code and
strict mode raises there.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import grpc

from steplog._writer.transport import Labels, Rejection
from steplog.errors import SteplogError

REJECTIONS_KEPT = 10_000


class SteplogWarning(UserWarning):
    """Base of the writer's warnings."""


class RejectedPointsWarning(SteplogWarning):
    """The service rejected points (warned once per series and reason)."""


class DroppedPointsWarning(SteplogWarning):
    """Points were dropped on the client: the memory bound, or logged after close."""


class DeliveryWarning(SteplogWarning):
    """Batches could not be delivered (a non-retryable error, or a close timeout)."""


class PointsRejectedError(SteplogError):
    """Strict mode: the service rejected points logged earlier."""

    def __init__(self, rejections: Sequence[Rejection], count: int) -> None:
        self.rejections = tuple(rejections)
        self.count = count
        first = rejections[0] if rejections else None
        detail = f"; first: {describe(first)}" if first else ""
        super().__init__(f"the service rejected {count} points{detail}")


class DeliveryError(SteplogError):
    """Strict mode: batches were refused with a non-retryable status, or were
    still undelivered when close() timed out."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, points: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.points = points


def describe(r: Rejection) -> str:
    labels = ",".join(f"{k}={v}" for k, v in r.labels)
    at = "" if r.step is None else f" at step {r.step}"
    series = f"{r.name}{{{labels}}}" if labels else r.name
    return f"{series} of run {r.run_id}{at}: {r.reason} ({r.message})"


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of the writer's counters (points unless named batches)."""

    points_logged: int = 0
    points_acked: int = 0
    duplicates: int = 0
    rejected: int = 0
    dropped: int = 0
    dropped_unspooled: int = 0
    blocked_calls: int = 0
    refused: int = 0
    spooled: int = 0
    batches_sent: int = 0
    batches_acked: int = 0
    reconnects: int = 0
    points_buffered: int = 0
    bytes_in_memory: int = 0  # buffered + sequenced batches held in memory
    points_unacked: int = 0
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    last_error: str | None = None
    writer_id: str = ""


class Notes:
    """What the sender has to tell the user, delivered on the user's thread by
    the next log/flush/close (so warnings point at user code, and strict mode
    raises there)."""

    __slots__ = ("error", "warnings")

    def __init__(self) -> None:
        self.warnings: list[tuple[type[Warning], str]] = []
        self.error: SteplogError | None = None

    def __bool__(self) -> bool:
        return bool(self.warnings) or self.error is not None


def deliver(notes: Notes | None, stacklevel: int) -> None:
    """Warn and raise what the sender recorded, on the user's thread."""
    if notes is None:
        return
    for category, message in notes.warnings:
        warnings.warn(message, category, stacklevel=stacklevel)
    if notes.error is not None:
        raise notes.error


class Outcomes:
    """The counters, kept rejections and pending news of one stream (all
    touched with the lane's lock held)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.notes = Notes()
        self.warned: set[tuple[Any, ...]] = set()
        self.rejections: deque[Rejection] = deque(maxlen=REJECTIONS_KEPT)
        self.pending_rejections: list[Rejection] = []
        self.pending_rejected = 0
        self.drained = 0  # points moved from buffers into batches
        self.resolved_points = 0  # of those: acked, spooled offline, lost, rejected
        self.dropped_buffered = 0  # dropped before they were in a batch
        self.points_acked = 0
        self.duplicates = 0
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}
        self.dropped = 0
        self.dropped_unspooled = 0  # of those: over the bound, the spool unwritable
        self.blocked = 0  # log calls that waited the whole max_block_s
        self.refused = 0  # points in batches the service refused whole
        self.losses_reported = 0  # refused + dropped when flush/close last said so
        self.spooled = 0
        self.batches_sent = 0
        self.batches_acked = 0
        self.reconnects = 0
        self.last_error: str | None = None

    def note_once(self, key: tuple[Any, ...], category: type[Warning], message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.notes.warnings.append((category, message))

    def take_notes(self) -> Notes | None:
        if not self.notes:
            return None
        notes, self.notes = self.notes, Notes()
        self.pending_rejections = []
        self.pending_rejected = 0
        return notes

    def take_losses(self) -> bool:
        """True unless points were refused or dropped since the last call that
        said so: every loss makes the next flush()/close() return False, even
        when the batch was given up before it began."""
        losses = self.refused + self.dropped
        clean = losses == self.losses_reported
        self.losses_reported = losses
        return clean

    def report(self, message: str, code: grpc.StatusCode | None, points: int, key: Any) -> None:
        """A delivery failure: a DeliveryError in strict mode, else one
        DeliveryWarning per `key`."""
        if self.strict:
            self.notes.error = DeliveryError(message, code, points)
        else:
            self.note_once(key, DeliveryWarning, message)

    def record_rejections(
        self,
        rejections: list[Rejection],
        count: int,
        counts: Mapping[str, int],
        sole: tuple[str, str, Labels] | None = None,
    ) -> None:
        """Count, keep and announce rejections (the lane's lock held). `sole`: the one
        series the batch held, when it held one."""
        self.rejected += count
        for reason, n in counts.items():
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + n
        self.rejections.extend(rejections)
        if self.strict:
            self.pending_rejections.extend(rejections)
            self.pending_rejected += count
            self.notes.error = PointsRejectedError(self.pending_rejections, self.pending_rejected)
            return
        # One warning per (series, reason), the first time, with that
        # series' count in this batch. The service itemises at most 20
        # rejected points a batch: when it listed fewer than it rejected for
        # a reason, the unlisted ones belong to the series only if the batch
        # held one series (`sole`); otherwise the count is a lower bound.
        listed: dict[str, int] = {}
        per_series: dict[tuple[tuple[str, str, Labels], str], list[Rejection]] = {}
        for r in rejections:
            listed[r.reason] = listed.get(r.reason, 0) + 1
            per_series.setdefault((r.series, r.reason), []).append(r)
        for (series, reason), rs in per_series.items():
            key = ("rejected", series, reason)
            if key in self.warned:
                continue
            n = len(rs)
            unlisted = counts.get(reason, n) - listed[reason]
            if unlisted > 0 and sole == series:
                n += unlisted
                unlisted = 0
            how = f"{n} point(s)" if unlisted <= 0 else f"at least {n} point(s)"
            more = (
                ""
                if unlisted <= 0
                else f" ({counts[reason]} {reason} in that batch, {listed[reason]} itemised)"
            )
            self.note_once(
                key,
                RejectedPointsWarning,
                f"steplog: {how} of this series rejected{more}: {describe(rs[0])}; "
                "later rejections of this series for this reason are counted in "
                "stats.rejected and listed by rejections()",
            )
        if not rejections and count:
            for reason in counts:
                self.note_once(
                    ("rejected", None, reason),
                    RejectedPointsWarning,
                    f"steplog: {counts[reason]} point(s) rejected: {reason}",
                )


def merge_stats(a: WriterStats, b: WriterStats) -> WriterStats:
    """a's identity, both streams' counts."""
    merged: dict[str, Any] = {}
    for f in fields(WriterStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "rejected_by_reason":
            merged[f.name] = {k: x.get(k, 0) + y.get(k, 0) for k in {*x, *y}}
        elif isinstance(x, int):
            merged[f.name] = x + y
        else:
            merged[f.name] = x if x else y
    return WriterStats(**merged)
