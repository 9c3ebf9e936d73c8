"""Histogram points (steplog.v1.HistogramPoints): decoded and validated. Pure.

A series' histograms arrive columnar: `bins[i]` says how many bins point i
has; its edges and counts are the next bins[i] + 1 entries of `edges` and the
next bins[i] entries of `counts`. So the whole series is a handful of float
arrays, checked with numpy at once, never a Python object per bin.

Rules (data.proto, HistogramPoints):
- the lengths fit together (sum(bins) + n edges, sum(bins) counts, 0 or n
  underflow / overflow / nan_count), else the whole series is rejected before
  anything of it is decoded;
- a point has 1..max_bins bins (0 is INVALID_HISTOGRAM, over the limit
  LIMIT_EXCEEDED): a point is at most 16 * max_bins + 64 bytes;
- its edges are finite and strictly increasing;
- its counts, underflow, overflow and nan_count are finite and >= 0.
A point that breaks a rule is rejected with the field and the rule named;
the other points are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.core.batch import (
    F64,
    I64,
    INVALID_HISTOGRAM,
    KIND_HISTOGRAM,
    LIMIT_EXCEEDED,
    Chunk,
    Mask,
    Outcome,
)

__all__ = ["INVALID_HISTOGRAM", "KIND_HISTOGRAM", "HistogramBlock", "validate_histograms"]

DEFAULT_MAX_BINS = 10_000
# Encoded bytes of one stored point besides its bins: step, time, the three
# extra counts and framing (a query's byte budget counts 16 per bin on top).
POINT_OVERHEAD_BYTES = 64
# Per rule, the first bad points get a message with their values; the rest
# (not shown in the acknowledgement anyway) share one.
_DETAILED = 20

_EMPTY_F64 = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class HistogramBlock:
    """The histograms of one series in one batch, as arrays.

    edges and counts are every point's, concatenated; edge_start[i] and
    count_start[i] are where point i's begin."""

    bins: I64
    edges: F64
    counts: F64
    underflow: F64
    overflow: F64
    nan_count: F64
    edge_start: I64
    count_start: I64

    def __len__(self) -> int:
        return int(self.bins.shape[0])

    def point(self, i: int) -> tuple[F64, F64]:
        """(edges, counts) of point i (views, no copy)."""
        k = int(self.bins[i])
        e, c = int(self.edge_start[i]), int(self.count_start[i])
        return self.edges[e : e + k + 1], self.counts[c : c + k]


def structure_problem(msg: Any, n: int) -> tuple[int, str] | None:
    """Whether the columns of a HistogramPoints message fit together, from
    lengths alone (bins is summed; nothing else is read). n = len(bins)."""
    total = int(np.asarray(msg.bins, dtype=np.int64).sum()) if n else 0
    edges, counts = len(msg.edges), len(msg.counts)
    if edges != total + n or counts != total:
        return (
            INVALID_HISTOGRAM,
            f"histogram columns do not fit: {n} points (bins) with {total} bins in all need "
            f"{total + n} edges and {total} counts; got {edges} edges and {counts} counts",
        )
    for field in ("underflow", "overflow", "nan_count"):
        got = len(getattr(msg, field))
        if got not in (0, n):
            return (
                INVALID_HISTOGRAM,
                f"histogram {field} has {got} entries; it must be empty or one per point ({n})",
            )
    return None


def _per_point(values: Any, n: int) -> F64:
    return np.array(values, dtype=np.float64) if len(values) else np.zeros(n, dtype=np.float64)


def decode(msg: Any) -> HistogramBlock:
    """HistogramPoints -> HistogramBlock (after `structure_problem` passed)."""
    bins = np.array(msg.bins, dtype=np.int64)
    n = int(bins.shape[0])
    edge_ends = np.cumsum(bins + 1)
    count_ends = np.cumsum(bins)
    return HistogramBlock(
        bins=bins,
        edges=np.array(msg.edges, dtype=np.float64) if len(msg.edges) else _EMPTY_F64.copy(),
        counts=np.array(msg.counts, dtype=np.float64) if len(msg.counts) else _EMPTY_F64.copy(),
        underflow=_per_point(msg.underflow, n),
        overflow=_per_point(msg.overflow, n),
        nan_count=_per_point(msg.nan_count, n),
        edge_start=(edge_ends - (bins + 1)).astype(np.int64),
        count_start=(count_ends - bins).astype(np.int64),
    )


def _reject(
    chunk: Chunk,
    outcome: Outcome,
    points: I64,
    first: I64,
    reason: int,
    describe: Callable[[int, int], str],
    generic: str,
) -> None:
    """Reject `points` (point indices, ascending); `first[j]` is the bad
    element of points[j] that `describe(point, element)` tells about."""
    detailed = 0
    rest = np.zeros(len(chunk), dtype=np.bool_)
    for p, e in zip(points.tolist(), first.tolist(), strict=True):
        if not chunk.alive[p]:
            continue
        if detailed < _DETAILED:
            outcome.reject_one(chunk, p, reason, describe(p, e))
            detailed += 1
        else:
            rest[p] = True
    if rest.any():
        outcome.reject(chunk, rest, reason, generic)


def _first_bad(bad: Mask, owner: I64) -> tuple[I64, I64]:
    """For elements flagged bad and the point owning each: (points with a bad
    element, ascending; the first bad element of each)."""
    where = np.flatnonzero(bad)
    points, first = np.unique(owner[where], return_index=True)
    return points.astype(np.int64), where[first].astype(np.int64)


def _fmt(value: float) -> str:
    return repr(float(value))


def validate_histograms(chunk: Chunk, outcome: Outcome, max_bins: int) -> None:
    """Reject the points of the chunk that break a rule (module docstring)."""
    block = chunk.payload[0] if chunk.payload else None
    if not isinstance(block, HistogramBlock):
        return
    n = len(block)
    bins = block.bins
    empty = bins == 0
    if empty.any():
        outcome.reject(
            chunk, empty, INVALID_HISTOGRAM, "histogram bins is 0; a histogram has at least one bin"
        )
    over = bins > max_bins
    if over.any():
        for p in np.flatnonzero(over & chunk.alive)[:_DETAILED].tolist():
            outcome.reject_one(
                chunk,
                p,
                LIMIT_EXCEEDED,
                f"histogram bins is {int(bins[p])}; the limit is {max_bins} bins per point",
            )
        outcome.reject(
            chunk, over, LIMIT_EXCEEDED, f"histogram bins over the limit of {max_bins} per point"
        )
    points = np.arange(n, dtype=np.int64)
    edge_owner = np.repeat(points, bins + 1)
    count_owner = np.repeat(points, bins)
    edges, counts = block.edges, block.counts

    def local(p: int, e: int, start: I64) -> int:
        return e - int(start[p])

    finite = np.isfinite(edges)
    if not finite.all():
        bad_points, first = _first_bad(~finite, edge_owner)
        _reject(
            chunk,
            outcome,
            bad_points,
            first,
            INVALID_HISTOGRAM,
            lambda p, e: (
                f"histogram edges must be finite: edges[{local(p, e, block.edge_start)}]"
                f" is {_fmt(edges[e])}"
            ),
            "histogram edges must be finite",
        )
    if edges.shape[0] > 1:
        # Pairs (j, j + 1) inside one point must increase; NaN never does.
        same = edge_owner[1:] == edge_owner[:-1]
        with np.errstate(invalid="ignore"):
            flat = same & ~(edges[1:] > edges[:-1])
        if flat.any():
            bad_points, first = _first_bad(flat, edge_owner[:-1])
            _reject(
                chunk,
                outcome,
                bad_points,
                first,
                INVALID_HISTOGRAM,
                lambda p, e: (
                    "histogram edges must be strictly increasing: "
                    f"edges[{local(p, e, block.edge_start) + 1}] = {_fmt(edges[e + 1])} is not"
                    f" above edges[{local(p, e, block.edge_start)}] = {_fmt(edges[e])}"
                ),
                "histogram edges must be strictly increasing",
            )
    with np.errstate(invalid="ignore"):
        bad_counts = ~(np.isfinite(counts) & (counts >= 0))
    if bad_counts.any():
        bad_points, first = _first_bad(bad_counts, count_owner)
        _reject(
            chunk,
            outcome,
            bad_points,
            first,
            INVALID_HISTOGRAM,
            lambda p, e: (
                "histogram counts must be finite and >= 0: "
                f"counts[{local(p, e, block.count_start)}] is {_fmt(counts[e])}"
            ),
            "histogram counts must be finite and >= 0",
        )
    for field in ("underflow", "overflow", "nan_count"):
        values: F64 = getattr(block, field)
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            _reject(
                chunk,
                outcome,
                np.flatnonzero(bad).astype(np.int64),
                np.flatnonzero(bad).astype(np.int64),
                INVALID_HISTOGRAM,
                _describe_extra(field, values),
                f"histogram {field} must be finite and >= 0",
            )


def _describe_extra(field: str, values: F64) -> Callable[[int, int], str]:
    def describe(point: int, element: int) -> str:
        return f"histogram {field} must be finite and >= 0, not {_fmt(values[element])}"

    return describe
