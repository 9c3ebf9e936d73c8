"""Histograms: computed from raw values with numpy, or given as edges and
counts; checked here by the rules the service applies (data.proto,
HistogramPoints), so a bad histogram fails at the call that made it.

Raw values: NaN is counted in `nan_count`, -inf and +inf (and, with fixed
edges, finite values outside them) in `underflow` / `overflow`; every value
is counted exactly once. The bins cover the finite values' range.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs

if TYPE_CHECKING:
    from steplog.client import Client

F64 = npt.NDArray[np.float64]

# The service's default bound (STEPLOG_MAX_HISTOGRAM_BINS); a service
# configured lower rejects larger histograms as LIMIT_EXCEEDED.
MAX_BINS = 10_000
DEFAULT_BINS = 64
# Bytes a histogram holds besides 16 per bin (step, time, counts, framing).
_OVERHEAD_BYTES = 128


def _fail(name: str, field: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"histogram {name!r}: {message}", field=field)


def _floats(name: str, field: str, value: Any) -> F64:
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(name, field, f"{field} must be numbers") from None
    return out.reshape(-1)


def check_edges(name: str, edges: F64, field: str = "edges") -> None:
    """Finite, strictly increasing, 2 .. MAX_BINS + 1 of them."""
    if edges.size < 2:
        raise _fail(name, field, f"{field} needs at least 2 entries (one bin); got {edges.size}")
    if edges.size - 1 > MAX_BINS:
        raise _fail(name, field, f"{edges.size - 1} bins; the limit is {MAX_BINS}")
    bad = np.flatnonzero(~np.isfinite(edges))
    if bad.size:
        raise _fail(
            name, field, f"{field} must be finite: {field}[{bad[0]}] is {float(edges[bad[0]])!r}"
        )
    flat = np.flatnonzero(~(edges[1:] > edges[:-1]))
    if flat.size:
        j = int(flat[0])
        raise _fail(
            name,
            field,
            f"{field} must be strictly increasing: {field}[{j + 1}] = {float(edges[j + 1])!r} is "
            f"not above {field}[{j}] = {float(edges[j])!r}",
        )


def _auto_bins(finite: F64, lo: float, hi: float) -> int:
    """numpy's 'auto' rule: the smaller bin width of Sturges' and
    Freedman-Diaconis' (Sturges' alone when the IQR is 0), computed here so
    the count is capped before any edge is allocated."""
    n = finite.size
    if n == 0 or hi <= lo:
        return 1
    sturges = (hi - lo) / (math.log2(n) + 1.0)
    q75, q25 = np.percentile(finite, [75, 25])
    fd = 2.0 * float(q75 - q25) * n ** (-1.0 / 3.0)
    width = min(fd, sturges) if fd > 0 else sturges
    return max(1, min(MAX_BINS, math.ceil((hi - lo) / width)))


def compute(
    name: str, values: Any, bins: int | str | Sequence[float] | npt.ArrayLike
) -> tuple[F64, F64, float, float, float]:
    """(edges, counts, underflow, overflow, nan_count) of raw values."""
    data = _floats(name, "values", values)
    nan = np.isnan(data)
    nan_count = float(nan.sum())
    data = data[~nan]
    if isinstance(bins, str):
        if bins != "auto":
            raise _fail(
                name, "bins", f"bins must be an int, 'auto' or a sequence of edges, not {bins!r}"
            )
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if not math.isfinite(hi - lo):
            raise _fail(name, "values", f"the values' range [{lo!r}, {hi!r}] is wider than float64")
        k: int | F64 = _auto_bins(finite, lo, hi)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
    elif isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        k = operator.index(bins)
        if not 1 <= k <= MAX_BINS:
            raise _fail(name, "bins", f"bins must be 1..{MAX_BINS}, not {k}")
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi <= lo:  # numpy's convention for a single value
            lo, hi = lo - 0.5, hi + 0.5
    else:
        if isinstance(bins, bool):
            raise _fail(name, "bins", "bins must be an int, 'auto' or a sequence of edges")
        edges = _floats(name, "bins", bins)
        check_edges(name, edges, "bins")
        counts, _ = np.histogram(data[(data >= edges[0]) & (data <= edges[-1])], bins=edges)
        under = float((data < edges[0]).sum())
        over = float((data > edges[-1]).sum())
        return edges, counts.astype(np.float64), under, over, nan_count
    under = float(np.isneginf(data).sum())
    over = float(np.isposinf(data).sum())
    finite = data[np.isfinite(data)]
    if not math.isfinite(hi - lo):
        raise _fail(name, "values", f"the values' range [{lo!r}, {hi!r}] is wider than float64")
    counts, edges = np.histogram(finite, bins=k, range=(lo, hi))
    if not np.all(edges[1:] > edges[:-1]):  # a range too narrow for k bins in float64
        raise _fail(
            name, "values", f"the values' range [{lo!r}, {hi!r}] is too narrow for {k} bins"
        )
    return edges.astype(np.float64), counts.astype(np.float64), under, over, nan_count


def given(name: str, edges: Any, counts: Any) -> tuple[F64, F64]:
    """Edges and counts given by the caller, checked."""
    if edges is None or counts is None:
        raise _fail(
            name,
            "counts" if counts is None else "edges",
            "give values, or both edges and counts",
        )
    e = _floats(name, "edges", edges)
    c = _floats(name, "counts", counts)
    check_edges(name, e)
    if e.size != c.size + 1:
        raise _fail(
            name,
            "edges",
            f"edges must be one longer than counts: {e.size} edges, {c.size} counts",
        )
    bad = np.flatnonzero(~(np.isfinite(c) & (c >= 0)))
    if bad.size:
        raise _fail(
            name,
            "counts",
            f"counts must be finite and >= 0: counts[{bad[0]}] is {float(c[bad[0]])!r}",
        )
    return e, c


class HistogramItem:
    """One checked histogram, encoded later by the sender thread."""

    __slots__ = (
        "cost",
        "counts",
        "description",
        "edges",
        "nan_count",
        "overflow",
        "points",
        "step",
        "time",
        "underflow",
    )

    def __init__(
        self,
        edges: F64,
        counts: F64,
        underflow: float,
        overflow: float,
        nan_count: float,
        time: float,
        step: int | None,
        description: str,
    ) -> None:
        self.edges = edges
        self.counts = counts
        self.underflow = underflow
        self.overflow = overflow
        self.nan_count = nan_count
        self.time = time
        self.step = step
        self.description = description
        self.points = 1
        self.cost = 16 * counts.size + len(description) + _OVERHEAD_BYTES

    def encoded_bound(self, name: str, labels: Any) -> int:
        """An upper bound of the encoded size (checked before it is queued)."""
        return (
            self.cost
            + len(name.encode())
            + len(self.description.encode())
            + sum(len(k.encode()) + len(v.encode()) + 8 for k, v in dict(labels).items())
        )

    def encode(self, name: str, labels: Any, max_bytes: int) -> list[data_pb2.SeriesData]:
        points = data_pb2.HistogramPoints(
            times=[self.time],
            bins=[int(self.counts.size)],
            edges=self.edges.tolist(),
            counts=self.counts.tolist(),
        )
        if self.step is not None:
            points.steps.append(self.step)
        if self.underflow or self.overflow or self.nan_count:
            points.underflow.append(self.underflow)
            points.overflow.append(self.overflow)
            points.nan_count.append(self.nan_count)
        return [
            data_pb2.SeriesData(
                name=name, labels=dict(labels), description=self.description, histograms=points
            )
        ]


def histogram_item(
    name: str,
    values: Any,
    bins: Any,
    edges: Any,
    counts: Any,
    step: Any,
    description: str,
    now: float,
) -> HistogramItem:
    """The checked histogram of a `log_histogram` call (raises InvalidArgumentError)."""
    if step is not None:
        try:
            step = operator.index(step)
        except TypeError:
            raise _fail(
                name, "step", f"step must be an integer, not {type(step).__name__}"
            ) from None
        if step < 0:
            raise _fail(name, "step", f"step must be >= 0, not {step}")
    if values is not None:
        if edges is not None or counts is not None:
            raise _fail(
                name,
                "edges" if edges is not None else "counts",
                "give values (binned by bins) or edges and counts, not both; to bin values "
                "over fixed edges pass them as bins=",
            )
        e, c, under, over, nan = compute(name, values, bins)
    else:
        e, c = given(name, edges, counts)
        under = over = nan = 0.0
    return HistogramItem(e, c, under, over, nan, now, step, description)


def decode(points: data_pb2.HistogramPoints) -> list[dict[str, Any]]:
    """HistogramPoints -> one dict per point: step (None when unstepped and
    not a query answer), time, edges and counts (numpy arrays), underflow,
    overflow, nan_count."""
    steps = list(points.steps)
    edges = np.asarray(points.edges, dtype=np.float64)
    counts = np.asarray(points.counts, dtype=np.float64)
    extra = {f: list(getattr(points, f)) for f in ("underflow", "overflow", "nan_count")}
    out: list[dict[str, Any]] = []
    e = c = 0
    for i, k in enumerate(points.bins):
        out.append(
            {
                "step": steps[i] if i < len(steps) else None,
                "time": points.times[i] if i < len(points.times) else None,
                "edges": edges[e : e + k + 1],
                "counts": counts[c : c + k],
                **{f: (v[i] if v else 0.0) for f, v in extra.items()},
            }
        )
        e += k + 1
        c += k
    return out


def read_histograms(
    client: Client,
    run_id: str,
    name: str,
    labels: dict[str, str],
    start_step: int | None,
    end_step: int | None,
    max_points: int,
) -> list[dict[str, Any]]:
    """A histogram series by step range (ReadSeries, following its pages)."""
    from steplog.query import pages

    request = qs.ReadSeriesRequest(
        workspace=client.workspace,
        run_id=run_id,
        name=name,
        labels=labels,
        start_step=start_step,
        end_step=end_step,
        max_points=max_points,
    )
    out: list[dict[str, Any]] = []
    for page in pages(client, client.queries.ReadSeries, request):
        which = page.series.WhichOneof("points")
        if which not in (None, "histograms"):
            raise InvalidArgumentError(
                f"series {name!r} holds {which}, not histograms", field="name"
            )
        out += decode(page.series.histograms)
    return out


def as_lists(points: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Azure's get_metrics shape: plain lists instead of arrays."""
    return [
        {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in points
    ]
