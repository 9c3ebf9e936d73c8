"""QueryService: metrics of a run (recursively), one series by step range,
the series of a run. Every response is bounded in bytes and points; what does
not fit continues on the next page (query_service.proto, "Paging")."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from ingest.api.common import handle_errors
from ingest.api.series import fill_chart, series_data
from ingest.core import model
from ingest.core.errors import invalid, not_found
from ingest.core.kinds import KIND_SCALAR
from ingest.store.queries import (
    MAX_STEP,
    MIN_STEP,
    SCALAR_POINT_BYTES,
    KindReader,
    QueryStore,
    SeriesHead,
    Window,
)
from steplog.v1 import query_service_pb2 as pb
from steplog.v1 import query_service_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

# Points in one response (GetMetrics, ReadSeries) and series (ListSeries):
# 0 asks for the default, larger values are treated as the maximum.
MAX_PAGE_POINTS = 100_000
MAX_PAGE_SERIES = 1_000
# ReadCharts: series in one request, and points of one series at most.
MAX_CHART_SERIES = 1_000
MAX_CHART_POINTS = 100_000
# Bytes of a response besides its points and series headers: run ids, the
# page token, counts and framing.
ENVELOPE_BYTES = 2048
# Series headers fetched at a time while filling a GetMetrics page.
SERIES_CHUNK = 256
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024

_TOKEN_VERSION = 1
_MAX_TOKEN_CHARS = 1024


def page_size(value: int, maximum: int, field: str = "page_size") -> int:
    if value < 0:
        raise invalid(field, f"must be >= 0 (0: the default, {maximum}); got {value}")
    return min(value or maximum, maximum)


def fingerprint(request: Message) -> str:
    """What a page token is bound to: every field but page_size and page_token."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("page_token")
    copy.ClearField("page_size")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:16]


def encode_token(request: Message, **position: Any) -> str:
    body = {"v": _TOKEN_VERSION, "f": fingerprint(request), **position}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(request: Message, token: str, fields: dict[str, type]) -> dict[str, Any] | None:
    """The position a page token holds (None for the first page), checked
    against the request it came with."""
    if not token:
        return None
    bad = invalid(
        "page_token",
        "is not a page token this service issued: pass the next_page_token of the "
        "previous response unchanged, or leave it empty for the first page",
    )
    if len(token) > _MAX_TOKEN_CHARS:
        raise bad
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(body, dict) or body.get("v") != _TOKEN_VERSION:
        raise bad
    for name, kind in fields.items():
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise bad
        if isinstance(value, int) and not MIN_STEP <= value <= MAX_STEP:
            raise bad
    if body.get("f") != fingerprint(request):
        raise invalid(
            "page_token",
            "belongs to another request: send every field but page_size and page_token "
            "unchanged while paging",
        )
    return body


class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(
        self,
        store: QueryStore,
        readers: Mapping[int, KindReader] | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.store = store
        # The readers of the kinds other than scalars (wired in ingest/server.py).
        self.readers: dict[int, KindReader] = {KIND_SCALAR: store.read_scalars, **(readers or {})}
        self.max_response_bytes = max_response_bytes

    # -- GetMetrics --------------------------------------------------------------

    @handle_errors
    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Ctx
    ) -> pb.GetMetricsResponse:
        workspace = model.workspace_name(request.workspace)
        limit = page_size(request.page_size, MAX_PAGE_POINTS)
        token = decode_token(request, request.page_token, {"r": str, "g": int, "s": int, "p": int})
        run_ids = await self.store.run_ids(
            workspace, model.run_id(request.run_id), request.recursive
        )
        first = 0
        if token is not None:
            if token["r"] not in run_ids:
                raise invalid("page_token", "names a run that is not part of this request")
            first = run_ids.index(token["r"])
        names = list(request.names)
        reply = pb.GetMetricsResponse()
        budget = self.max_response_bytes - ENVELOPE_BYTES
        points = 0
        empty = True  # nothing but run ids yet: the page must still make progress

        def stop(run: str, group: int, sid: int, step: int) -> pb.GetMetricsResponse:
            reply.next_page_token = encode_token(request, r=run, g=group, s=sid, p=step)
            return reply

        for run in run_ids[first:]:
            resume = token if token is not None and token["r"] == run else None
            if not empty and (points >= limit or len(run.encode()) + 8 > budget):
                return stop(run, 0, 0, MIN_STEP)
            run_metrics = reply.runs.add(run_id=run)
            budget -= len(run.encode()) + 8
            at = (resume["g"], resume["s"]) if resume is not None else (0, 0)
            while True:
                metas = await self.store.series_page(
                    workspace, run, names, at, SERIES_CHUNK, max(budget, 0)
                )
                if not metas:
                    break
                i = 0
                while i < len(metas):
                    head = metas[i]
                    group = head.group
                    if not empty and (points >= limit or head.header > budget):
                        return stop(run, group, head.series_id, MIN_STEP)
                    chunk = [head]
                    headers = head.header
                    for s in metas[i + 1 :]:
                        if s.group != group or headers + s.header > budget:
                            break
                        chunk.append(s)
                        headers += s.header
                    i += len(chunk)
                    # The token's series resumes at its step; every other from its start.
                    after = (head.series_id, MIN_STEP)
                    if resume is not None and resume["g"] == group:
                        after = (resume["s"], resume["p"])
                    resume = None
                    reader = self.readers.get(head.kind)
                    if reader is None:  # a kind this service cannot read: skipped
                        continue
                    got = await reader(
                        chunk,
                        Window(
                            limit=limit - points,
                            budget=budget - headers,
                            after=after,
                            force=empty,
                        ),
                    )
                    nxt = got.slice.next
                    for s in chunk:
                        sid = s.series_id
                        if nxt is not None and (
                            sid > nxt[0]
                            or (
                                sid == nxt[0]
                                and sid not in got.slice.rows
                                and sid not in got.slice.columns
                            )
                        ):
                            break
                        run_metrics.series.append(series_data(s, got))
                        budget -= s.header
                        empty = False
                    points += got.slice.count
                    budget -= got.slice.used
                    if nxt is not None:
                        return stop(run, group, nxt[0], nxt[1])
                last = metas[-1]
                at = (last.group, last.series_id + 1)
            empty = False  # this run is done: progress, even when it had no series
        return reply

    # -- ReadSeries --------------------------------------------------------------

    @handle_errors
    async def ReadSeries(
        self, request: pb.ReadSeriesRequest, context: Ctx
    ) -> pb.ReadSeriesResponse:
        workspace = model.workspace_name(request.workspace)
        if request.max_points < 0:
            raise invalid("max_points", f"must be >= 0 (0: every point); got {request.max_points}")
        limit = page_size(request.page_size, MAX_PAGE_POINTS)
        start = request.start_step if request.HasField("start_step") else MIN_STEP
        end = request.end_step if request.HasField("end_step") else MAX_STEP
        if end < start:
            raise invalid("end_step", "must be >= start_step")
        token = decode_token(request, request.page_token, {"s": int, "e": int, "n": int, "p": int})
        s = await self.store.find_series(
            workspace, model.run_id(request.run_id), request.name, dict(request.labels)
        )
        reader = self.readers.get(s.kind)
        if reader is None:
            raise invalid("name", "this series kind cannot be read yet")
        if token is None:
            total, last = await self.store.count_points(s, start, end)
            if last is not None:
                end = min(end, last)  # later points belong to a later read
            step = start
        else:
            if token["s"] != s.series_id:
                raise invalid("page_token", "belongs to another series")
            end, total, step = token["e"], token["n"], token["p"]
        downsampled = 0 < request.max_points < total
        numeric = s.kind == KIND_SCALAR and not s.text
        window = Window(
            limit=limit,
            budget=self.max_response_bytes - ENVELOPE_BYTES - s.header,
            start=start,
            end=end,
            after=(s.series_id, step),
            force=True,
            spread=request.max_points if downsampled and not numeric else 0,
            total=total,
            extremes=request.max_points if downsampled and numeric else 0,
            include_bytes=request.include_bytes,
        )
        got = await reader([s], window)
        reply = pb.ReadSeriesResponse(
            series=series_data(s, got), downsampled=downsampled, total_points=total
        )
        if got.slice.next is not None:
            reply.next_page_token = encode_token(
                request, s=s.series_id, e=end, n=total, p=got.slice.next[1]
            )
        return reply

    # -- ReadCharts --------------------------------------------------------------

    @handle_errors
    async def ReadCharts(
        self, request: pb.ReadChartsRequest, context: Ctx
    ) -> pb.ReadChartsResponse:
        workspace = model.workspace_name(request.workspace)
        count = len(request.series)
        if not 1 <= count <= MAX_CHART_SERIES:
            raise invalid("series", f"must name 1 to {MAX_CHART_SERIES} series; got {count}")
        if not 1 <= request.max_points <= MAX_CHART_POINTS:
            raise invalid(
                "max_points", f"must be 1 to {MAX_CHART_POINTS}; got {request.max_points}"
            )
        limit = page_size(request.page_size, MAX_PAGE_SERIES)
        start = request.start_step if request.HasField("start_step") else MIN_STEP
        end = request.end_step if request.HasField("end_step") else MAX_STEP
        if end < start:
            raise invalid("end_step", "must be >= start_step")
        token = decode_token(request, request.page_token, {"i": int})
        first = 0 if token is None else token["i"]
        if token is not None and not 0 < first < count:
            raise invalid("page_token", "names no series of this request")
        refs = [(r.name, dict(r.labels)) for r in request.series]
        heads = await self.store.find_many(workspace, model.run_id(request.run_id), refs)
        for i, h in enumerate(heads):
            if h is None:
                raise not_found(
                    f"series[{i}].name",
                    f"run {request.run_id!r} has no series {refs[i][0]!r} with labels {refs[i][1]}",
                )
            if h.kind != KIND_SCALAR or h.text:
                raise invalid(
                    f"series[{i}]", f"{h.name!r} is not a numeric scalar series (use ReadSeries)"
                )
        found = [h for h in heads if h is not None]
        # The series of this page: whole answers, at most their header and
        # max_points points each (the stored point count bounds a smaller one).
        budget = self.max_response_bytes - ENVELOPE_BYTES
        take: list[SeriesHead] = []
        for h in found[first:]:
            worst = h.header + 32 + SCALAR_POINT_BYTES * min(request.max_points, h.point_count)
            if take and (len(take) >= limit or worst > budget):
                break
            take.append(h)
            budget -= worst
        charts = await self.store.chart([h.series_id for h in take], start, end, request.max_points)
        reply = pb.ReadChartsResponse()
        for h in take:
            chart = charts[h.series_id]
            one = reply.series.add(downsampled=chart.downsampled, total_points=chart.total)
            fill_chart(one.series, h, chart.points)  # in place: the points never copied
        if first + len(take) < count:
            reply.next_page_token = encode_token(request, i=first + len(take))
        return reply

    # -- ListSeries --------------------------------------------------------------

    @handle_errors
    async def ListSeries(
        self, request: pb.ListSeriesRequest, context: Ctx
    ) -> pb.ListSeriesResponse:
        workspace = model.workspace_name(request.workspace)
        limit = page_size(request.page_size, MAX_PAGE_SERIES)
        token = decode_token(request, request.page_token, {"s": int})
        run_ids = await self.store.run_ids(workspace, model.run_id(request.run_id), False)
        rows = await self.store.list_series(
            workspace,
            run_ids[0],
            token["s"] if token is not None else 0,
            limit,
            self.max_response_bytes - ENVELOPE_BYTES,
        )
        reply = pb.ListSeriesResponse(
            series=[
                pb.SeriesInfo(
                    name=r.name,
                    labels=r.labels,
                    kind=r.kind,  # type: ignore[arg-type]
                    stepped=r.stepped,
                    point_count=r.point_count,
                    last_step=r.last_step,
                    description=r.description,
                )
                for r in rows
                if r.take
            ]
        )
        if rows and not rows[-1].take:
            reply.next_page_token = encode_token(request, s=rows[-1].series_id)
        return reply
