"""Histograms end to end: the Python client and a client written from the
proto alone (raw Write) -> real gRPC server -> TimescaleDB, and back by step
range through ReadSeries and GetMetrics."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from steplog import Experiment, Run
from steplog.errors import NotFoundError
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import query_service_pb2 as qs
from tests.support import ProtoClient

MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # the service's default


def new_run(url: str, experiment_name: str) -> Run:
    return Experiment(experiment_name, url=url).start_logging()


def reasons_of(run: Run) -> list[tuple[str, int | None]]:
    run.flush()
    return [(r.reason, r.step) for r in run.rejections()]


def reasons(response: pb.WriteResponse) -> dict[str, int]:
    return {pb.RejectReason.Name(rc.reason): rc.count for rc in response.result.reject_counts}


# -- the Python client ---------------------------------------------------------------


def test_round_trip_raw_values_and_given_counts(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    rng = np.random.default_rng(7)
    logged = {}
    for step in range(0, 50, 10):
        values = rng.normal(loc=step, size=500)
        values[:3] = [np.nan, np.inf, -np.inf]
        run.log_histogram("weights", values, bins=32, step=step, labels={"layer": "fc1"})
        logged[step] = values
    run.log_histogram("grads", edges=[0.0, 0.5, 2.0], counts=[3, 0.25], step=1)
    run.log_histogram("grads", edges=[-1.0, 1.0], counts=[7], step=2)
    run.log_histogram("auto", rng.exponential(size=1000), bins="auto")
    assert reasons_of(run) == []

    got = run.get_histograms("weights", labels={"layer": "fc1"})
    assert [p["step"] for p in got] == [0, 10, 20, 30, 40]
    for p in got:
        values = logged[p["step"]]
        finite = values[np.isfinite(values)]
        want_counts, want_edges = np.histogram(finite, bins=32)
        np.testing.assert_array_equal(p["edges"], want_edges)
        np.testing.assert_array_equal(p["counts"], want_counts)
        assert (p["underflow"], p["overflow"], p["nan_count"]) == (1.0, 1.0, 1.0)
        assert p["time"] > 1.7e9

    # By step range, inclusive, open ends.
    assert [
        p["step"]
        for p in run.get_histograms("weights", labels={"layer": "fc1"}, start_step=10, end_step=30)
    ] == [10, 20, 30]
    assert [
        p["step"] for p in run.get_histograms("weights", labels={"layer": "fc1"}, start_step=25)
    ] == [30, 40]
    assert [
        p["step"] for p in run.get_histograms("weights", labels={"layer": "fc1"}, end_step=0)
    ] == [0]
    thinned = run.get_histograms("weights", labels={"layer": "fc1"}, max_points=2)
    assert [p["step"] for p in thinned] == [0, 40]
    # The label is part of the series: without it there is no such series.
    with pytest.raises(NotFoundError, match="no series 'weights' with labels"):
        run.get_histograms("weights")

    grads = run.get_histograms("grads")
    assert [p["step"] for p in grads] == [1, 2]
    np.testing.assert_array_equal(grads[0]["edges"], [0.0, 0.5, 2.0])
    np.testing.assert_array_equal(grads[0]["counts"], [3.0, 0.25])
    np.testing.assert_array_equal(grads[1]["counts"], [7.0])
    assert grads[1]["nan_count"] == 0.0

    # Unstepped: the service assigns indices, as for every kind.
    (auto,) = run.get_histograms("auto")
    assert auto["step"] == 0 and auto["counts"].sum() == 1000 and 1 < auto["counts"].size < 100

    # Azure's get_metrics shape: a dict per point, plain lists.
    metrics = run.get_metrics()
    assert metrics["grads"][0] == {
        "step": 1,
        "time": metrics["grads"][0]["time"],
        "edges": [0.0, 0.5, 2.0],
        "counts": [3.0, 0.25],
        "underflow": 0.0,
        "overflow": 0.0,
        "nan_count": 0.0,
    }
    assert len(metrics["weights{layer=fc1}"]) == 5

    kinds = {
        s.name: s.kind
        for s in run._client.queries.ListSeries(
            qs.ListSeriesRequest(workspace="default", run_id=run.id)
        ).series
    }
    assert kinds == dict.fromkeys(("weights", "grads", "auto"), data_pb2.SERIES_KIND_HISTOGRAM)
    run.complete()


def test_step_rules_are_those_of_every_kind(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    run.log_histogram("h", [1.0, 2.0], step=5)
    run.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.log_histogram("h", [1.0, 2.0], step=3)  # smaller
        run.log_histogram("h", [1.0, 3.0], step=5)  # the same step again
        run.log_histogram("h", [1.0, 3.0])  # no step in a stepped series
        run.log("h", 1.0, step=6)  # another kind
        run.log_histogram("loss", [1.0], step=1)
        run.log("loss", 0.5, step=0)  # a scalar into a histogram series
        got = reasons_of(run)
    assert ("STEP_NOT_INCREASING", 3) in got
    assert ("STEP_CONFLICT", 5) in got
    assert ("STEP_MODE_MISMATCH", None) in got
    assert ("KIND_MISMATCH", 6) in got and ("KIND_MISMATCH", 0) in got
    assert [p["step"] for p in run.get_histograms("h")] == [5]
    run.log_histogram("h", [4.0], step=9)
    run.flush()
    # Rewinding hides histograms after the step, like any other points.
    assert run.rewind(5, names=["h"]) == 1
    assert [p["step"] for p in run.get_histograms("h")] == [5]
    run.log_histogram("h", [4.0], step=6)
    assert [p["step"] for p in run.get_histograms("h")] == [5, 6]
    run.complete()


# -- a client written from the proto: every service-side rule ------------------------


def three(**bad: Any) -> data_pb2.SeriesData:
    """Three points of two bins; `bad` replaces fields to break point 1."""
    points: dict[str, Any] = {
        "steps": [1, 2, 3],
        "bins": [2, 2, 2],
        "edges": [0, 1, 2, 0, 1, 2, 0, 1, 2],
        "counts": [1, 2, 3, 4, 5, 6],
    }
    points.update(bad)
    return data_pb2.SeriesData(name="h", histograms=data_pb2.HistogramPoints(**points))


@pytest.mark.parametrize(
    ("bad", "reason", "text"),
    [
        ({"edges": [0, 1, 2, 0, 1, 1, 0, 1, 2]}, "INVALID_HISTOGRAM", "strictly increasing"),
        ({"edges": [0, 1, 2, 0, 1, float("inf"), 0, 1, 2]}, "INVALID_HISTOGRAM", "finite"),
        ({"counts": [1, 2, -3, 4, 5, 6]}, "INVALID_HISTOGRAM", "counts must be finite and >= 0"),
        ({"counts": [1, 2, float("nan"), 4, 5, 6]}, "INVALID_HISTOGRAM", "counts[0] is nan"),
        ({"underflow": [0, -1, 0]}, "INVALID_HISTOGRAM", "underflow must be finite"),
        ({"overflow": [0, float("inf"), 0]}, "INVALID_HISTOGRAM", "overflow must be finite"),
        ({"nan_count": [0, float("nan"), 0]}, "INVALID_HISTOGRAM", "nan_count must be finite"),
        (
            {"bins": [2, 0, 2], "edges": [0, 1, 2, 9, 0, 1, 2], "counts": [1, 2, 5, 6]},
            "INVALID_HISTOGRAM",
            "at least one bin",
        ),
        (
            {
                "bins": [2, 10_001, 2],
                "edges": [0, 1, 2, *range(10_002), 0, 1, 2],
                "counts": [1, 2, *([1] * 10_001), 5, 6],
            },
            "LIMIT_EXCEEDED",
            "the limit is 10000 bins per point",
        ),
        ({"steps": [1, -2, 3]}, "INVALID_STEP", "step must be >= 0"),
    ],
)
def test_bad_points_are_rejected_by_name_and_the_rest_stored(
    url: str, experiment_name: str, bad: dict[str, Any], reason: str, text: str
) -> None:
    run = new_run(url, experiment_name)
    raw = ProtoClient(url)
    good = data_pb2.SeriesData(
        name="other", histograms=data_pb2.HistogramPoints(bins=[1], edges=[0, 1], counts=[4])
    )
    reply = raw.write(run.id, three(**bad), good)
    assert reasons(reply) == {f"REJECT_REASON_{reason}": 1}
    assert reply.result.accepted == 3
    (point,) = reply.result.rejected_points
    assert point.name == "h" and point.index == 1 and text in point.message, point
    (page,) = raw.read_all(run.id, "h")
    hist = page.series.histograms
    assert list(hist.steps) == [1, 3] and list(hist.bins) == [2, 2]
    assert list(hist.counts) == [1, 2, 5, 6]
    (page,) = raw.read_all(run.id, "other")
    assert list(page.series.histograms.counts) == [4.0]
    run.complete()


@pytest.mark.parametrize(
    ("points", "text"),
    [
        ({"bins": [2, 2], "edges": [0, 1, 2, 0, 1], "counts": [1, 2, 3, 4]}, "need 6 edges"),
        ({"bins": [2], "edges": [0, 1, 2], "counts": [1]}, "and 2 counts"),
        ({"bins": [1, 1], "edges": [0, 1, 0, 1], "counts": [1, 1], "overflow": [1]}, "overflow"),
    ],
)
def test_a_series_whose_columns_do_not_fit_is_rejected_whole(
    url: str, experiment_name: str, points: dict[str, Any], text: str
) -> None:
    run = new_run(url, experiment_name)
    raw = ProtoClient(url)
    bad = data_pb2.SeriesData(name="bad", histograms=data_pb2.HistogramPoints(**points))
    good = data_pb2.SeriesData(
        name="good",
        histograms=data_pb2.HistogramPoints(steps=[4], bins=[1], edges=[0, 1], counts=[2]),
    )
    reply = raw.write(run.id, bad, good)
    assert reasons(reply) == {"REJECT_REASON_INVALID_HISTOGRAM": len(points["bins"])}
    assert text in reply.result.rejected_points[0].message
    assert reply.result.accepted == 1
    (page,) = raw.read_all(run.id, "good")
    assert list(page.series.histograms.steps) == [4]
    run.complete()


def test_pages_are_byte_bounded(url: str, experiment_name: str) -> None:
    """300 histograms of 1000 bins (16 kB each, 4.8 MB in all) come in pages
    of at most the service's response bound, and reassemble exactly."""
    run = new_run(url, experiment_name)
    raw = ProtoClient(url)
    k, n = 1000, 300
    edges = np.arange(k + 1, dtype=np.float64)
    for first in range(0, n, 50):
        steps = list(range(first, first + 50))
        points = data_pb2.HistogramPoints(
            steps=steps,
            bins=[k] * 50,
            edges=np.tile(edges, 50).tolist(),
            counts=np.concatenate([np.full(k, float(s)) for s in steps]).tolist(),
        )
        reply = raw.write(run.id, data_pb2.SeriesData(name="big", histograms=points))
        assert reply.result.accepted == 50, reply
    pages = raw.read_all(run.id, "big", start_step=10)
    assert len(pages) >= 2
    assert all(p.ByteSize() <= MAX_RESPONSE_BYTES for p in pages)
    steps = [s for p in pages for s in p.series.histograms.steps]
    assert steps == list(range(10, n))
    for p in pages:
        h = p.series.histograms
        assert list(h.bins) == [k] * len(h.steps)
        counts = np.asarray(h.counts).reshape(len(h.steps), k)
        np.testing.assert_array_equal(counts[:, 0], list(h.steps))
        assert p.total_points == n - 10
    # The Python client follows the same pages.
    got = run.get_histograms("big", start_step=295)
    assert [p["step"] for p in got] == [295, 296, 297, 298, 299]
    run.complete()
