"""QueryService: metrics of a run (recursively), one series by step range."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from ingest import model
from ingest.batch import KIND_SCALAR, VALUE_TEXT
from ingest.errors import invalid
from ingest.servicers.common import handle_errors
from ingest.timescale import QueryStore
from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as pb
from steplog.v1 import query_service_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_POINTS_DEFAULT = 1_000_000


def _scalars(
    rows: Sequence[Mapping[str, Any]], text: bool, stepped: bool
) -> data_pb2.ScalarColumns:
    cols = data_pb2.ScalarColumns(times=[r["t"] for r in rows])
    if stepped:
        cols.steps.extend(r["step"] for r in rows)
    if text:
        cols.text_values.extend(r["value"] for r in rows)
    else:
        cols.values.extend(r["value"] for r in rows)
    return cols


class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(self, store: QueryStore, readers: dict[int, Any] | None = None) -> None:
        self.store = store
        # Other kinds register a reader: async fn(series_rows) -> {series_id: SeriesData}.
        self.readers = readers if readers is not None else {}

    @handle_errors
    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Ctx
    ) -> pb.GetMetricsResponse:
        workspace = model.workspace_name(request.workspace)
        run_ids = await self.store.run_ids(
            workspace, model.run_id(request.run_id), request.recursive
        )
        series = await self.store.series(run_ids, list(request.names))
        by_run: dict[str, list[data_pb2.SeriesData]] = defaultdict(list)
        numeric = [s for s in series if s["kind"] == KIND_SCALAR and s["value_type"] != VALUE_TEXT]
        text = [s for s in series if s["kind"] == KIND_SCALAR and s["value_type"] == VALUE_TEXT]
        points: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
        for group, is_text in ((numeric, False), (text, True)):
            if group:
                points.update(
                    await self.store.scalar_points([s["series_id"] for s in group], is_text)
                )
        others: dict[int, data_pb2.SeriesData] = {}
        for kind, reader in self.readers.items():
            rows = [s for s in series if s["kind"] == kind]
            if rows:
                others.update(await reader(rows))
        for s in series:
            data = data_pb2.SeriesData(
                name=s["name"], labels=s["labels"], description=s["description"]
            )
            if s["kind"] == KIND_SCALAR:
                data.scalars.CopyFrom(
                    _scalars(points[s["series_id"]], s["value_type"] == VALUE_TEXT, s["stepped"])
                )
            elif s["series_id"] in others:
                data = others[s["series_id"]]
            else:
                continue
            by_run[s["run_id"]].append(data)
        return pb.GetMetricsResponse(
            runs=[pb.RunMetrics(run_id=r, series=by_run.get(r, [])) for r in run_ids]
        )

    @handle_errors
    async def ReadSeries(
        self, request: pb.ReadSeriesRequest, context: Ctx
    ) -> pb.ReadSeriesResponse:
        workspace = model.workspace_name(request.workspace)
        if request.max_points < 0:
            raise invalid("max_points", "must be >= 0")
        start = request.start_step if request.HasField("start_step") else None
        end = request.end_step if request.HasField("end_step") else None
        if start is not None and end is not None and end < start:
            raise invalid("end_step", "must be >= start_step")
        s = await self.store.find_series(
            workspace, model.run_id(request.run_id), request.name, dict(request.labels)
        )
        data = data_pb2.SeriesData(name=s["name"], labels=s["labels"], description=s["description"])
        if s["kind"] != KIND_SCALAR:
            reader = self.readers.get(s["kind"])
            if reader is None:
                raise invalid("name", "this series kind cannot be read yet")
            got = await reader([s], start=start, end=end, include_bytes=request.include_bytes)
            return pb.ReadSeriesResponse(series=got.get(s["series_id"], data))
        is_text = s["value_type"] == VALUE_TEXT
        total = await self.store.count_points(s["series_id"], is_text, start, end)
        limit = request.max_points or MAX_POINTS_DEFAULT
        if total > limit and not is_text:
            rows = await self.store.downsampled(s["series_id"], max(1, limit // 3), start, end)
            downsampled = True
        else:
            grouped = await self.store.scalar_points([s["series_id"]], is_text, start, end)
            rows = grouped.get(s["series_id"], [])[:limit]
            downsampled = total > limit
        data.scalars.CopyFrom(_scalars(rows, is_text, True))
        return pb.ReadSeriesResponse(series=data, downsampled=downsampled, total_points=total)

    @handle_errors
    async def ListSeries(
        self, request: pb.ListSeriesRequest, context: Ctx
    ) -> pb.ListSeriesResponse:
        workspace = model.workspace_name(request.workspace)
        run_ids = await self.store.run_ids(workspace, model.run_id(request.run_id), False)
        rows = await self.store.series(run_ids, [])
        return pb.ListSeriesResponse(
            series=[
                pb.SeriesInfo(
                    name=r["name"],
                    labels=r["labels"],
                    kind=r["kind"],
                    stepped=r["stepped"],
                    point_count=r["point_count"],
                    last_step=r["last_step"],
                    description=r["description"],
                )
                for r in rows
            ]
        )
