"""Reading metrics back, in Azure ML's shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs

if TYPE_CHECKING:
    from steplog.client import Client


def series_key(data: data_pb2.SeriesData) -> str:
    """The metric's name, with its labels when it has any: loss{rank=3}."""
    if not data.labels:
        return data.name
    inner = ",".join(f"{k}={v}" for k, v in sorted(data.labels.items()))
    return f"{data.name}{{{inner}}}"


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


def get_metrics(
    client: Client, run_id: str, name: str | None = None, recursive: bool = False
) -> dict[str, Any]:
    reply = client.call(
        client.queries.GetMetrics,
        qs.GetMetricsRequest(
            workspace=client.workspace,
            run_id=run_id,
            names=[name] if name else [],
            recursive=recursive,
        ),
        timeout=120,
    )
    if recursive:
        return {r.run_id: metrics_of(r) for r in reply.runs}
    return metrics_of(reply.runs[0]) if reply.runs else {}


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
    "downsampled", "total_points"}; downsampled to about max_points when the
    range holds more (each bucket keeps its first, min and max point)."""
    reply = client.call(
        client.queries.ReadSeries,
        qs.ReadSeriesRequest(
            workspace=client.workspace,
            run_id=run_id,
            name=name,
            labels=labels or {},
            start_step=start_step,
            end_step=end_step,
            max_points=max_points,
        ),
        timeout=120,
    )
    sc = reply.series.scalars
    return {
        "steps": list(sc.steps),
        "values": list(sc.text_values) if len(sc.text_values) else list(sc.values),
        "times": list(sc.times),
        "downsampled": reply.downsampled,
        "total_points": reply.total_points,
    }
