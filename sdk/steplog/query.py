"""Reading metrics back, in Azure ML's shapes. The service answers in pages
of bounded size (query_service.proto, "Paging"); these helpers follow the
pages and put the pieces back together."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs

if TYPE_CHECKING:
    from steplog.client import Client

R = TypeVar(
    "R",
    qs.GetMetricsResponse,
    qs.ReadSeriesResponse,
    qs.ListSeriesResponse,
    qs.ReadChartsResponse,
)

# A page may hold nothing while more follow (only an empty token ends a read),
# but a service that hands back the token it was given would loop for ever.
_TIMEOUT_S = 120.0


def pages(client: Client, method: Callable[..., R], request: Any) -> Iterator[R]:
    """Every page of a paged query, in order."""
    token = ""
    while True:
        request.page_token = token
        reply = client.call(method, request, timeout=_TIMEOUT_S)
        yield reply
        if not reply.next_page_token:
            return
        if reply.next_page_token == token:
            raise RuntimeError("the service returned the same page token twice")
        token = reply.next_page_token


def series_key(data: data_pb2.SeriesData) -> str:
    """The metric's name, with its labels when it has any: loss{rank=3}."""
    return key_of(data.name, data.labels)


def key_of(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def series_value(data: data_pb2.SeriesData) -> Any:
    """A value logged once is a value; logged several times, a list."""
    which = data.WhichOneof("points")
    if which == "scalars":
        sc = data.scalars
        values: list[Any] = list(sc.text_values) if len(sc.text_values) else list(sc.values)
        return values[0] if len(values) == 1 else values
    from steplog import _decoders

    return _decoders.decode(data)


def metrics_of(run: qs.RunMetrics) -> dict[str, Any]:
    return {series_key(s): series_value(s) for s in run.series}


_PLACEHOLDER: dict[int, tuple[str, Any]] = {
    data_pb2.COLUMN_TYPE_DOUBLE: ("doubles", 0.0),
    data_pb2.COLUMN_TYPE_INT64: ("ints", 0),
    data_pb2.COLUMN_TYPE_STRING: ("strings", ""),
    data_pb2.COLUMN_TYPE_BOOL: ("bools", False),
}


def merge_tables(parts: list[data_pb2.TableColumns]) -> data_pb2.TableColumns:
    """The rows of every part, in order; a column missing from a part has no
    cells in that part's rows."""
    out = data_pb2.TableColumns(row_count=sum(p.row_count for p in parts))
    for p in parts:
        out.steps.extend(p.steps)
        out.times.extend(p.times)
    keys: dict[tuple[str, int], None] = {}
    for p in parts:
        for c in p.columns:
            keys.setdefault((c.name, c.type), None)
    for name, ctype in keys:
        field, blank = _PLACEHOLDER.get(ctype, ("", None))
        merged = out.columns.add(name=name, type=ctype)
        present: list[bool] = []
        for p in parts:
            col = next((c for c in p.columns if (c.name, c.type) == (name, ctype)), None)
            if col is None:
                if field:
                    getattr(merged, field).extend([blank] * p.row_count)
                present += [False] * p.row_count
                continue
            if field:
                getattr(merged, field).extend(getattr(col, field))
            present += list(col.present) if len(col.present) else [True] * p.row_count
        if not all(present):
            merged.present.extend(present)
    return out


def merge_series(parts: list[data_pb2.SeriesData]) -> data_pb2.SeriesData:
    """One series from its pieces on successive pages."""
    if len(parts) == 1:
        return parts[0]
    out = data_pb2.SeriesData()
    out.CopyFrom(parts[0])
    if out.WhichOneof("points") == "table":
        out.table.CopyFrom(merge_tables([p.table for p in parts if p.HasField("table")]))
        return out
    for p in parts[1:]:
        out.MergeFrom(p)  # repeated fields append
    return out


def get_metrics(
    client: Client, run_id: str, name: str | None = None, recursive: bool = False
) -> dict[str, Any]:
    request = qs.GetMetricsRequest(
        workspace=client.workspace,
        run_id=run_id,
        names=[name] if name else [],
        recursive=recursive,
    )
    Key = tuple[str, tuple[tuple[str, str], ...]]
    runs: dict[str, dict[Key, list[data_pb2.SeriesData]]] = {}
    for page in pages(client, client.queries.GetMetrics, request):
        for r in page.runs:
            series = runs.setdefault(r.run_id, {})
            for s in r.series:
                series.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s)
    merged = {
        run: {series_key(p[0]): series_value(merge_series(p)) for p in series.values()}
        for run, series in runs.items()
    }
    if recursive:
        return merged
    return merged.get(run_id, {})


def read_series(
    client: Client,
    run_id: str,
    name: str,
    labels: dict[str, str] | None = None,
    start_step: int | None = None,
    end_step: int | None = None,
    max_points: int = 0,
) -> dict[str, Any]:
    """One scalar series by step range: {"steps", "values", "times",
    "downsampled", "total_points"}; downsampled to at most max_points points
    when the range holds more (each bucket keeps its first point, its extremes
    and a NaN). Follows the service's pages."""
    request = qs.ReadSeriesRequest(
        workspace=client.workspace,
        run_id=run_id,
        name=name,
        labels=labels or {},
        start_step=start_step,
        end_step=end_step,
        max_points=max_points,
    )
    out: dict[str, Any] = {"steps": [], "values": [], "times": []}
    for page in pages(client, client.queries.ReadSeries, request):
        sc = page.series.scalars
        out["steps"] += sc.steps
        out["values"] += sc.text_values if len(sc.text_values) else sc.values
        out["times"] += sc.times
        out["downsampled"] = page.downsampled
        out["total_points"] = page.total_points
    return out


def columns(sc: data_pb2.ScalarColumns) -> dict[str, Any]:
    """A page's numeric scalar columns as numpy arrays (steps int64, times
    and values float64), copied from protobuf's arrays in C, no Python loop."""
    return {
        "steps": np.fromiter(sc.steps, dtype=np.int64, count=len(sc.steps)),
        "values": np.fromiter(sc.values, dtype=np.float64, count=len(sc.values)),
        "times": np.fromiter(sc.times, dtype=np.float64, count=len(sc.times)),
    }


def read_charts(
    client: Client,
    run_id: str,
    series: Sequence[tuple[str, Mapping[str, str]]],
    start_step: int | None = None,
    end_step: int | None = None,
    max_points: int = 1000,
) -> list[dict[str, Any]]:
    """Several numeric scalar series, each downsampled to at most
    max_points (ReadCharts), in the order asked: for each, {"name",
    "labels", "steps", "values", "times" (numpy arrays), "downsampled",
    "total_points"}. Follows the service's pages."""
    request = qs.ReadChartsRequest(
        workspace=client.workspace,
        run_id=run_id,
        series=[qs.SeriesRef(name=n, labels=dict(labels)) for n, labels in series],
        start_step=start_step,
        end_step=end_step,
        max_points=max_points,
    )
    out: list[dict[str, Any]] = []
    for page in pages(client, client.queries.ReadCharts, request):
        for c in page.series:
            one = columns(c.series.scalars)
            one.update(
                name=c.series.name,
                labels=dict(c.series.labels),
                downsampled=c.downsampled,
                total_points=c.total_points,
            )
            out.append(one)
    return out
