"""Queries at the edges (issue 9): counts and downsampling for every kind,
NaN beside infinities, unstepped steps, and responses bounded in bytes and
points, read in pages. Python client and raw stubs -> real gRPC server ->
TimescaleDB and S3."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from steplog import Experiment, Run
from steplog.client import Client
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs
from tests import imagegen
from tests.support import ProtoClient, ServiceProcess

SMALL = 65536  # STEPLOG_MAX_RESPONSE_BYTES of the small-bound service below
I64 = data_pb2.COLUMN_TYPE_INT64
STR = data_pb2.COLUMN_TYPE_STRING


class Raw(ProtoClient):
    """Every write must come back without a rejected point."""

    def __init__(self, url: str) -> None:
        super().__init__(url, prefix="edges", strict=True)


def scalars(name: str, values: list[float], steps: list[int] | None = None) -> data_pb2.SeriesData:
    cols = data_pb2.ScalarColumns(values=values)
    if steps is not None:
        cols.steps.extend(steps)
    return data_pb2.SeriesData(name=name, scalars=cols)


def texts(name: str, values: list[str], steps: list[int]) -> data_pb2.SeriesData:
    return data_pb2.SeriesData(
        name=name, scalars=data_pb2.ScalarColumns(text_values=values, steps=steps)
    )


def table(name: str, n: int, steps: bool = True, text: str = "") -> data_pb2.SeriesData:
    cols = [data_pb2.Column(name="i", type=I64, ints=list(range(n)))]
    if text:
        cols.append(data_pb2.Column(name="s", type=STR, strings=[f"{text}{i}" for i in range(n)]))
    t = data_pb2.TableColumns(row_count=n, columns=cols)
    if steps:
        t.steps.extend(range(n))
    return data_pb2.SeriesData(name=name, table=t)


def confusion(i: int) -> dict[str, Any]:
    return {
        "schema_type": "confusion_matrix",
        "schema_version": "1.0.0",
        "data": {"class_labels": ["a", "b"], "matrix": [[i, 0], [0, 1]]},
    }


def new_run(url: str, experiment_name: str) -> Run:
    return Experiment(experiment_name, url=url).start_logging()


@pytest.fixture(scope="module")
def small(service_env: dict[str, str]) -> Iterator[str]:
    """A service whose responses are at most 64 KiB."""
    with ServiceProcess(service_env, extra_env={"STEPLOG_MAX_RESPONSE_BYTES": str(SMALL)}) as svc:
        yield svc.address


# -- counts and downsampling for every kind ----------------------------------------


def test_total_points_is_counted_for_tables_images_and_evaluations(
    url: str, experiment_name: str
) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    raw.write(run.id, table("t", 7))
    for step in range(3):
        run.log_image("img", imagegen.png(3, 3, seed=step), step=step)
    for step in range(4):
        run.log_confusion_matrix("cm", confusion(step), step=step)
    assert run.flush(60)
    assert raw.read(run.id, "t").total_points == 7
    assert raw.read(run.id, "img").total_points == 3
    assert raw.read(run.id, "cm").total_points == 4
    assert raw.read(run.id, "cm", start_step=1, end_step=2).total_points == 2


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
def test_max_points_is_an_upper_bound(url: str, experiment_name: str, n: int) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    values = [math.sin(i / 7) for i in range(200)]
    values[50], values[120] = math.nan, math.inf
    raw.write(run.id, scalars("x", values, list(range(200))))
    raw.write(run.id, texts("s", [f"v{i}" for i in range(200)], list(range(200))))
    raw.write(run.id, table("t", 200))
    for name in ("x", "s", "t"):
        reply = raw.read(run.id, name, max_points=n)
        which = reply.series.WhichOneof("points")
        got = reply.series.table.row_count if which == "table" else len(reply.series.scalars.steps)
        assert 1 <= got <= n, (name, n, got)
        assert reply.downsampled and reply.total_points == 200


def test_nan_does_not_hide_infinities_in_a_bucket(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    values = [float(i % 10) for i in range(1000)]
    # One bucket of max_points=30 (10 buckets of 100) holds a NaN and both infinities.
    values[500], values[501], values[502] = math.nan, math.inf, -math.inf
    raw.write(run.id, scalars("loss", values, list(range(1000))))
    for max_points in (30, 4, 3):
        reply = raw.read(run.id, "loss", max_points=max_points)
        got = list(reply.series.scalars.values)
        assert len(got) <= max_points
        assert any(math.isnan(v) for v in got), (max_points, got)
        assert math.inf in got and -math.inf in got, (max_points, got)
        steps = list(reply.series.scalars.steps)
        assert steps == sorted(steps)
    # Outside the spiky bucket, extremes are real values (NaN no longer the max).
    reply = raw.read(run.id, "loss", max_points=30, end_step=399)
    assert set(reply.series.scalars.values) <= {float(i) for i in range(10)}
    assert {0.0, 9.0} <= set(reply.series.scalars.values)


def test_two_points_prefer_nan_then_the_largest(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    values = [1.0, 5.0, math.nan, -3.0, 2.0]
    raw.write(run.id, scalars("x", values, list(range(5))))
    got = list(raw.read(run.id, "x", max_points=2).series.scalars.values)
    assert len(got) == 2 and math.isnan(got[1]) and got[0] == 5.0
    got = list(raw.read(run.id, "x", max_points=1).series.scalars.values)
    assert len(got) == 1 and math.isnan(got[0])


def test_text_series_are_spread_over_the_range(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    raw.write(run.id, texts("phase", [f"p{i}" for i in range(1000)], list(range(1000))))
    reply = raw.read(run.id, "phase", max_points=10)
    steps = list(reply.series.scalars.steps)
    assert steps == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert list(reply.series.scalars.text_values) == [f"p{s}" for s in steps]
    assert reply.downsampled and reply.total_points == 1000
    part = raw.read(run.id, "phase", max_points=3, start_step=100, end_step=200)
    assert list(part.series.scalars.steps) == [100, 150, 200]


def test_tables_images_and_evaluations_honour_max_points(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    raw.write(run.id, table("t", 101))
    for step in range(10):
        run.log_image("img", imagegen.png(2, 2, seed=step), step=step * 10)
        run.log_confusion_matrix("cm", confusion(step), step=step)
    assert run.flush(60)
    t = raw.read(run.id, "t", max_points=5).series.table
    assert t.row_count == 5 and list(t.steps) == [0, 25, 50, 75, 100]
    assert list(t.columns[0].ints) == [0, 25, 50, 75, 100]
    img = raw.read(run.id, "img", max_points=4, include_bytes=True)
    assert list(img.series.images.steps) == [0, 30, 60, 90] and img.downsampled
    assert img.series.images.images[1].data == imagegen.png(2, 2, seed=3)
    cm = raw.read(run.id, "cm", max_points=2).series.evaluations
    assert list(cm.steps) == [0, 9]
    assert [json.loads(d)["data"]["matrix"][0][0] for d in cm.documents] == [0, 9]


def test_unstepped_series_have_the_same_steps_in_both_queries(
    url: str, experiment_name: str
) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    raw.write(run.id, scalars("free", [0.5, 0.25, 0.125]))
    raw.write(run.id, table("rows", 4, steps=False))
    raw.write(run.id, texts("note", ["a", "b"], []))
    got = Client(url, "default").call(
        raw.client.queries.GetMetrics, qs.GetMetricsRequest(workspace="default", run_id=run.id)
    )
    by_name = {s.name: s for s in got.runs[0].series}
    assert list(by_name["free"].scalars.steps) == [0, 1, 2]
    assert list(by_name["note"].scalars.steps) == [0, 1]
    assert list(by_name["rows"].table.steps) == [0, 1, 2, 3]
    assert list(raw.read(run.id, "free").series.scalars.steps) == [0, 1, 2]
    assert list(raw.read(run.id, "note").series.scalars.steps) == [0, 1]
    assert list(raw.read(run.id, "rows").series.table.steps) == [0, 1, 2, 3]
    # Azure's shape is unchanged: values only.
    assert run.get_metrics()["free"] == [0.5, 0.25, 0.125]


# -- paging -------------------------------------------------------------------------


def test_read_series_pages_through_a_long_series(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    n = 5500
    raw.write(run.id, scalars("loss", [i / 2 for i in range(n)], list(range(n))))
    request = qs.ReadSeriesRequest(workspace="default", run_id=run.id, name="loss", page_size=1000)
    pages = list(raw.pages("ReadSeries", request))
    assert len(pages) == 6
    assert all(len(p.series.scalars.steps) <= 1000 for p in pages)
    steps = [s for p in pages for s in p.series.scalars.steps]
    values = [v for p in pages for v in p.series.scalars.values]
    assert steps == list(range(n)) and values == [i / 2 for i in range(n)]
    assert {p.total_points for p in pages} == {n} and not any(p.downsampled for p in pages)
    # A point logged while paging, after the range as it stood, is not read.
    request = qs.ReadSeriesRequest(workspace="default", run_id=run.id, name="loss", page_size=5000)
    first = raw.client.call(raw.client.queries.ReadSeries, request)
    raw.write(run.id, scalars("loss", [1.0], [n]))
    request.page_token = first.next_page_token
    rest = list(raw.pages("ReadSeries", request))
    assert [s for p in rest for s in p.series.scalars.steps] == list(range(5000, n))
    # The client follows the pages.
    got = run.get_series("loss", start_step=10)
    assert got["steps"] == list(range(10, n + 1)) and got["total_points"] == n + 1 - 10


def test_page_size_bounds(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    n = 100_500
    raw.write(run.id, scalars("big", [0.0] * n, list(range(n))))
    first = raw.read(run.id, "big", page_size=10**9)
    assert len(first.series.scalars.steps) == 100_000 and first.next_page_token
    default = raw.read(run.id, "big")
    assert len(default.series.scalars.steps) == 100_000
    for bad in ({"page_size": -1}, {"max_points": -1}):
        with pytest.raises(InvalidArgumentError) as err:
            raw.read(run.id, "big", **bad)
        assert err.value.field == next(iter(bad))
    for method, request in (
        ("GetMetrics", qs.GetMetricsRequest(workspace="default", run_id=run.id, page_size=-5)),
        ("ListSeries", qs.ListSeriesRequest(workspace="default", run_id=run.id, page_size=-5)),
    ):
        with pytest.raises(InvalidArgumentError) as err:
            raw.client.call(getattr(raw.client.queries, method), request)
        assert err.value.field == "page_size"
    metrics = raw.client.call(
        raw.client.queries.GetMetrics,
        qs.GetMetricsRequest(workspace="default", run_id=run.id, page_size=10**9),
    )
    assert len(metrics.runs[0].series[0].scalars.steps) == 100_000
    assert metrics.next_page_token
    assert len(run.get_metrics()["big"]) == n


def test_a_bad_page_token_is_invalid_argument(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    raw.write(run.id, scalars("loss", [1.0] * 30, list(range(30))))
    for i in range(3):
        raw.write(run.id, scalars(f"s{i}", [1.0]))
    first = raw.read(run.id, "loss", page_size=10)
    assert first.next_page_token
    requests: list[tuple[str, Any]] = [
        ("ReadSeries", qs.ReadSeriesRequest(workspace="default", run_id=run.id, name="loss")),
        ("GetMetrics", qs.GetMetricsRequest(workspace="default", run_id=run.id)),
        ("ListSeries", qs.ListSeriesRequest(workspace="default", run_id=run.id)),
    ]
    for method, request in requests:
        for token in ("garbage", "eyJ2IjoxfQ", "x" * 5000, first.next_page_token[:-3]):
            request.page_token = token
            with pytest.raises(InvalidArgumentError) as err:
                raw.client.call(getattr(raw.client.queries, method), request)
            assert err.value.field == "page_token", (method, token)
    # A token of another request (here: another range) is refused, naming the field.
    other = qs.ReadSeriesRequest(
        workspace="default",
        run_id=run.id,
        name="loss",
        start_step=5,
        page_token=first.next_page_token,
    )
    with pytest.raises(InvalidArgumentError) as err:
        raw.client.call(raw.client.queries.ReadSeries, other)
    assert err.value.field == "page_token" and "another request" in str(err.value)
    # page_size may change between pages.
    again = qs.ReadSeriesRequest(
        workspace="default",
        run_id=run.id,
        name="loss",
        page_size=5,
        page_token=first.next_page_token,
    )
    assert list(raw.client.call(raw.client.queries.ReadSeries, again).series.scalars.steps) == [
        10,
        11,
        12,
        13,
        14,
    ]


def test_list_series_pages(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = Raw(url)
    raw.write(run.id, *(scalars(f"m{i:04d}", [float(i)]) for i in range(2300)))
    request = qs.ListSeriesRequest(workspace="default", run_id=run.id)
    pages = list(raw.pages("ListSeries", request))
    assert [len(p.series) for p in pages] == [1000, 1000, 300]
    assert [s.name for p in pages for s in p.series] == [f"m{i:04d}" for i in range(2300)]
    small_pages = list(raw.pages("ListSeries", qs.ListSeriesRequest(run_id=run.id, page_size=7)))
    assert len(small_pages) == 329 and sum(len(p.series) for p in small_pages) == 2300


# -- bounded in bytes ---------------------------------------------------------------


def assert_bounded(reply: Any, points: int) -> None:
    """Within the bound, unless the page holds one point (which may be larger)."""
    size = reply.ByteSize()
    if points != 1:
        assert size <= SMALL, f"{size} bytes with {points} points"


def count_points(series: data_pb2.SeriesData) -> int:
    which = series.WhichOneof("points")
    if which == "scalars":
        return len(series.scalars.steps)
    if which == "table":
        return int(series.table.row_count)
    if which == "images":
        return len(series.images.images)
    if which == "evaluations":
        return len(series.evaluations.documents)
    return 0


def test_every_response_stays_within_the_byte_bound(small: str, experiment_name: str) -> None:
    run = new_run(small, experiment_name)
    raw = Raw(small)
    n = 3000
    raw.write(run.id, scalars("loss", [float(i) for i in range(n)], list(range(n))))
    raw.write(run.id, texts("words", ["w" * (i * 10) for i in range(300)], list(range(300))))
    raw.write(run.id, table("t", 2000, text="cell-" * 20))
    raw.write(
        run.id,
        *(
            data_pb2.SeriesData(
                name=f"tiny{i}",
                labels={"rank": str(i), "host": "h" * 200},
                description="d" * 500,
                scalars=data_pb2.ScalarColumns(values=[1.0]),
            )
            for i in range(300)
        ),
    )
    big = imagegen.png_of_size(100_000)
    for step in range(4):
        run.log_image("img", imagegen.png(8, 8, seed=step) if step != 2 else big, step=step)
        run.log_confusion_matrix("cm", confusion(step), step=step)
    assert run.flush(60)

    for name, kw in (
        ("loss", {}),
        ("loss", {"max_points": 2500}),
        ("words", {}),
        ("words", {"max_points": 100}),
        ("t", {}),
        ("img", {"include_bytes": True}),
        ("cm", {}),
    ):
        request = qs.ReadSeriesRequest(workspace="default", run_id=run.id, name=name, **kw)
        pages = list(raw.pages("ReadSeries", request))
        total = 0
        for p in pages:
            assert_bounded(p, count_points(p.series))
            total += count_points(p.series)
        expected = kw.get("max_points") or pages[0].total_points
        if name == "loss" and kw:
            assert total <= expected
        else:
            assert total == expected, (name, kw, total)
        if name in ("loss", "words", "t") and not kw:
            assert len(pages) > 1, name
    img_pages = list(
        raw.pages(
            "ReadSeries",
            qs.ReadSeriesRequest(run_id=run.id, name="img", include_bytes=True),
        )
    )
    alone = [p for p in img_pages if any(i.data == big for i in p.series.images.images)]
    assert len(alone) == 1 and len(alone[0].series.images.images) == 1

    metrics = list(raw.pages("GetMetrics", qs.GetMetricsRequest(run_id=run.id)))
    assert len(metrics) > 3
    for p in metrics:
        assert_bounded(p, sum(count_points(s) for r in p.runs for s in r.series))
    listed = list(raw.pages("ListSeries", qs.ListSeriesRequest(run_id=run.id)))
    assert len(listed) > 1 and sum(len(p.series) for p in listed) == 305
    for p in listed:
        assert p.ByteSize() <= SMALL


def test_get_metrics_returns_everything_across_pages(small: str, experiment_name: str) -> None:
    parent = new_run(small, experiment_name)
    child = parent.child_run("child")
    for step in range(20_000):
        parent.log("loss", step / 3, step=step)
    parent.log_list("free", [float(i) for i in range(5000)])
    for i in range(3000):
        parent.log_row("rows", i=i, s=f"row {i} " * 3)
    for i in range(1000):
        parent.log_row("late", a=i)
    for i in range(1000):  # a column added later: earlier rows read as missing
        parent.log_row("late", a=1000 + i, b=float(i))
    for step in range(50):
        parent.log_confusion_matrix("cm", confusion(step), step=step)
        child.log("acc", step / 50, step=step)
    child.log("empty-ish", 1.0)
    assert parent.flush(120) and child.flush(120)
    request = qs.GetMetricsRequest(run_id=parent.id, recursive=True)
    assert len(list(Raw(small).pages("GetMetrics", request))) > 10

    got = parent.get_metrics()
    assert got["loss"] == [s / 3 for s in range(20_000)]
    assert got["free"] == [float(i) for i in range(5000)]
    assert got["rows"] == {"i": list(range(3000)), "s": [f"row {i} " * 3 for i in range(3000)]}
    assert got["late"] == {
        "a": list(range(2000)),
        "b": [None] * 1000 + [float(i) for i in range(1000)],
    }
    assert [d["data"]["matrix"][0][0] for d in got["cm"]] == list(range(50))
    everything = parent.get_metrics(recursive=True)
    assert everything[parent.id] == got
    assert everything[child.id] == {"acc": [s / 50 for s in range(50)], "empty-ish": 1.0}
    assert parent.get_metrics("loss") == {"loss": got["loss"]}
    chart = parent.get_series("loss", max_points=3000)
    assert chart["downsampled"] and len(chart["values"]) <= 3000
    assert chart["total_points"] == 20_000


def test_runs_without_series_are_paged_too(small: str, experiment_name: str) -> None:
    parent = new_run(small, experiment_name)
    children = parent.create_children(count=2000)
    request = qs.GetMetricsRequest(run_id=parent.id, recursive=True)
    pages = list(Raw(small).pages("GetMetrics", request))
    assert len(pages) > 1
    assert all(p.ByteSize() <= SMALL for p in pages)
    listed = [r.run_id for p in pages for r in p.runs]
    assert listed == [parent.id, *(c.id for c in children)]
    got = parent.get_metrics(recursive=True)
    assert list(got) == listed and all(v == {} for v in got.values())
