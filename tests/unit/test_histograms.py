"""Histograms without I/O: the client's computation against numpy, every
client-side rule, every service-side rule (decode + validate of a batch as a
client written from the proto would send it), and the COPY encoder's layout."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from ingest.core import batch as b
from ingest.core.decode import decode_batch
from ingest.core.histograms import INVALID_HISTOGRAM, KIND_HISTOGRAM, HistogramBlock
from ingest.core.histograms import decode as decode_block
from ingest.core.validate import Limits
from ingest.store.copy import PG_EPOCH
from ingest.store.histograms import encode_rows
from steplog import _histograms as h
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

# -- the client: computed from raw values -----------------------------------------


def test_int_bins_match_numpy() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=1000)
    edges, counts, under, over, nan = h.compute("w", values, 20)
    want_counts, want_edges = np.histogram(values, bins=20)
    np.testing.assert_array_equal(edges, want_edges)
    np.testing.assert_array_equal(counts, want_counts)
    assert (under, over, nan) == (0.0, 0.0, 0.0)


def test_default_is_64_bins() -> None:
    item = h.histogram_item("w", np.arange(100.0), h.DEFAULT_BINS, None, None, 3, "", 1.0)
    assert item.counts.size == 64 and item.edges.size == 65
    assert item.counts.sum() == 100


def test_nan_and_infinities_are_counted_not_binned() -> None:
    values = [1.0, 2.0, 3.0, float("nan"), float("nan"), float("inf"), -float("inf"), 2.5]
    edges, counts, under, over, nan = h.compute("w", values, 4)
    assert (edges[0], edges[-1]) == (1.0, 3.0)  # the finite values' range
    assert counts.sum() == 4
    assert (under, over, nan) == (1.0, 1.0, 2.0)
    assert counts.sum() + under + over + nan == len(values)


def test_fixed_edges_count_values_outside_them() -> None:
    values = [-5.0, 0.0, 0.5, 1.0, 1.0, 7.0, float("inf"), float("nan")]
    edges, counts, under, over, nan = h.compute("w", values, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(edges, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(counts, [1.0, 3.0])  # the last bin holds its right edge
    assert (under, over, nan) == (1.0, 2.0, 1.0)


def test_auto_matches_numpy_auto() -> None:
    rng = np.random.default_rng(2)
    for values in (rng.normal(size=5000), rng.exponential(size=300), np.arange(10.0)):
        edges, counts, *_ = h.compute("w", values, "auto")
        np.testing.assert_allclose(edges, np.histogram_bin_edges(values, "auto"))
        assert counts.sum() == values.size


def test_auto_is_capped_before_allocating() -> None:
    # A narrow core with far outliers: numpy's 'auto' would ask for ~10^7 bins.
    values = np.concatenate([np.linspace(0, 1e-3, 10_000), [-1e4, 1e4]])
    _, counts, *_ = h.compute("w", values, "auto")
    assert counts.size == h.MAX_BINS
    assert counts.sum() == values.size


def test_degenerate_inputs() -> None:
    edges, counts, *_ = h.compute("w", [2.0, 2.0], 4)
    assert (edges[0], edges[-1]) == (1.5, 2.5) and counts.sum() == 2
    edges, counts, *_, nan = h.compute("w", [float("nan")] * 3, 4)
    assert counts.sum() == 0 and nan == 3 and edges.size == 5
    edges, counts, *_ = h.compute("w", [], "auto")
    assert counts.size == 1 and counts.sum() == 0


# -- the client: every rule --------------------------------------------------------


def _raises(field: str, text: str, **kwargs: Any) -> None:
    args: dict[str, Any] = {
        "values": None,
        "bins": 64,
        "edges": None,
        "counts": None,
        "step": None,
        "description": "",
        "now": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError) as err:
        h.histogram_item("w", **args)
    assert err.value.field == field, err.value
    assert text in str(err.value)
    assert "'w'" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        ({"values": [1.0], "bins": 0}, "bins", "bins must be 1..10000"),
        ({"values": [1.0], "bins": 10_001}, "bins", "bins must be 1..10000"),
        ({"values": [1.0], "bins": "fd"}, "bins", "'auto' or a sequence of edges"),
        ({"values": [1.0], "bins": True}, "bins", "bins must be an int"),
        ({"values": [1.0], "bins": [0.0, 1.0, 1.0]}, "bins", "strictly increasing"),
        ({"values": [1.0], "bins": [0.0, float("inf")]}, "bins", "must be finite"),
        ({"values": [1.0], "bins": [0.0]}, "bins", "at least 2"),
        ({"values": ["a"]}, "values", "must be numbers"),
        ({"values": [-1e308, 1e308]}, "values", "wider than float64"),
        ({"values": [1.0], "edges": [0, 1], "counts": [1]}, "edges", "not both"),
        ({"edges": [0, 1]}, "counts", "both edges and counts"),
        ({"counts": [1]}, "edges", "both edges and counts"),
        ({}, "counts", "both edges and counts"),
        ({"edges": [0, 1, 2], "counts": [1]}, "edges", "one longer than counts"),
        ({"edges": [0, 1], "counts": [1, 2]}, "edges", "one longer than counts"),
        ({"edges": [0, 2, 1], "counts": [1, 1]}, "edges", "edges[2] = 1.0 is not above"),
        ({"edges": [0, 1, float("nan")], "counts": [1, 1]}, "edges", "must be finite"),
        ({"edges": [0, 1, 2], "counts": [1, -1]}, "counts", "counts[1] is -1.0"),
        ({"edges": [0, 1, 2], "counts": [float("nan"), 1]}, "counts", "finite and >= 0"),
        ({"edges": [0, 1], "counts": [float("inf")]}, "counts", "finite and >= 0"),
        ({"edges": np.arange(10_002.0), "counts": np.ones(10_001)}, "edges", "the limit is"),
        ({"edges": [0, 1], "counts": [1], "step": -1}, "step", "step must be >= 0"),
        ({"edges": [0, 1], "counts": [1], "step": 1.5}, "step", "must be an integer"),
    ],
)
def test_client_rules(kwargs: dict[str, Any], field: str, text: str) -> None:
    _raises(field, text, **kwargs)


def test_given_edges_and_counts_are_kept_as_doubles() -> None:
    item = h.histogram_item("w", None, 64, [0, 1, 3], [2, 0.5], 7, "d", 5.0)
    series = item.encode("w", (("rank", "0"),), 1 << 20)[0]
    p = series.histograms
    assert list(p.bins) == [2] and list(p.edges) == [0.0, 1.0, 3.0]
    assert list(p.counts) == [2.0, 0.5] and list(p.steps) == [7] and list(p.times) == [5.0]
    assert len(p.underflow) == 0 and dict(series.labels) == {"rank": "0"}


# -- the service: decode + validate of a batch --------------------------------------


def _batch(*series: data_pb2.SeriesData) -> pb.Batch:
    batch = pb.Batch(writer_id="w1", sequence=1)
    for s in series:
        batch.series.add(run_id="run-1", series=s)
    return batch


def _series(name: str = "h", **points: Any) -> data_pb2.SeriesData:
    return data_pb2.SeriesData(name=name, histograms=data_pb2.HistogramPoints(**points))


def _decode(batch: pb.Batch, limits: Limits | None = None) -> Any:
    return decode_batch("ws", batch, 1_700_000_000.0, limits or Limits())


def test_service_accepts_what_the_client_sends() -> None:
    rng = np.random.default_rng(3)
    items = [
        h.histogram_item("w", rng.normal(size=200), 16, None, None, s, "", 1.0) for s in (1, 2)
    ]
    series = items[0].encode("w", (), 1 << 20)[0]
    series.histograms.MergeFrom(items[1].encode("w", (), 1 << 20)[0].histograms)
    decoded = _decode(_batch(series))
    assert decoded.outcome.rejected == 0
    chunk = decoded.chunks[0]
    assert chunk.kind == KIND_HISTOGRAM and len(chunk) == 2 and chunk.alive.all()
    block = chunk.payload[0]
    assert isinstance(block, HistogramBlock)
    e, c = block.point(1)
    np.testing.assert_array_equal(e, items[1].edges)
    np.testing.assert_array_equal(c, items[1].counts)


# Three points of 2 bins each; `bad` replaces fields to break point 1 only.
def _three(**bad: Any) -> dict[str, Any]:
    points: dict[str, Any] = {
        "steps": [1, 2, 3],
        "bins": [2, 2, 2],
        "edges": [0, 1, 2, 0, 1, 2, 0, 1, 2],
        "counts": [1, 2, 3, 4, 5, 6],
    }
    points.update(bad)
    return points


@pytest.mark.parametrize(
    ("bad", "reason", "text"),
    [
        (
            {"edges": [0, 1, 2, 0, 1, 1, 0, 1, 2]},
            INVALID_HISTOGRAM,
            "edges must be strictly increasing: edges[2] = 1.0 is not above edges[1] = 1.0",
        ),
        (
            {"edges": [0, 1, 2, 2, 1, 0, 0, 1, 2]},
            INVALID_HISTOGRAM,
            "edges must be strictly increasing",
        ),
        (
            {"edges": [0, 1, 2, 0, float("nan"), 2, 0, 1, 2]},
            INVALID_HISTOGRAM,
            "edges must be finite: edges[1] is nan",
        ),
        (
            {"edges": [0, 1, 2, -float("inf"), 1, 2, 0, 1, 2]},
            INVALID_HISTOGRAM,
            "edges must be finite: edges[0] is -inf",
        ),
        (
            {"counts": [1, 2, 3, -4, 5, 6]},
            INVALID_HISTOGRAM,
            "counts must be finite and >= 0: counts[1] is -4.0",
        ),
        ({"counts": [1, 2, float("nan"), 4, 5, 6]}, INVALID_HISTOGRAM, "counts[0] is nan"),
        ({"counts": [1, 2, 3, float("inf"), 5, 6]}, INVALID_HISTOGRAM, "counts[1] is inf"),
        ({"underflow": [0, -1, 0]}, INVALID_HISTOGRAM, "underflow must be finite and >= 0"),
        ({"overflow": [0, float("nan"), 0]}, INVALID_HISTOGRAM, "overflow must be finite"),
        ({"nan_count": [0, float("inf"), 0]}, INVALID_HISTOGRAM, "nan_count must be finite"),
        (
            {"bins": [2, 0, 2], "edges": [0, 1, 2, 9, 0, 1, 2], "counts": [1, 2, 5, 6]},
            INVALID_HISTOGRAM,
            "at least one bin",
        ),
        (
            {"bins": [2, 3, 1], "edges": [0, 1, 2, 0, 1, 2, 3, 0, 1], "counts": [1, 2, 3, 4, 5, 6]},
            b.LIMIT_EXCEEDED,
            "histogram bins is 3; the limit is 2 bins per point",
        ),
    ],
)
def test_service_rejects_the_bad_point_and_keeps_the_others(
    bad: dict[str, Any], reason: int, text: str
) -> None:
    decoded = _decode(_batch(_series(**_three(**bad))), Limits(max_histogram_bins=2))
    out = decoded.outcome
    assert out.rejected == 1 and out.by_reason == {reason: 1}, out
    (example,) = out.examples
    assert example[3] == 1 and example[4] == 2  # point index 1, step 2
    assert text in example[6], example[6]
    assert decoded.chunks[0].alive.tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("points", "text"),
    [
        ({"bins": [2, 2], "edges": [0, 1, 2, 0, 1], "counts": [1, 2, 3, 4]}, "need 6 edges"),
        ({"bins": [2], "edges": [0, 1, 2], "counts": [1]}, "need 3 edges and 2 counts"),
        ({"bins": [1, 1], "edges": [0, 1, 0, 1], "counts": [1, 1], "underflow": [1]}, "underflow"),
        ({"bins": [1], "edges": [0, 1], "counts": [1], "nan_count": [1, 2]}, "nan_count has 2"),
        ({"bins": [1, 1], "edges": [0, 1, 0, 1], "counts": [1, 1], "steps": [1]}, "2 points"),
    ],
)
def test_service_rejects_a_series_whose_columns_do_not_fit(
    points: dict[str, Any], text: str
) -> None:
    good = _series("ok", bins=[1], edges=[0.0, 1.0], counts=[3.0], steps=[5])
    decoded = _decode(_batch(_series("bad", **points), good))
    out = decoded.outcome
    assert out.rejected == len(points["bins"])
    reasons = set(out.by_reason)
    assert reasons <= {INVALID_HISTOGRAM, b.INVALID_VALUE}, out
    assert text in out.examples[0][6], out.examples[0][6]
    assert [c.name for c in decoded.chunks] == ["ok"] and decoded.chunks[0].alive.all()


def test_service_reason_has_a_name() -> None:
    assert b.REASON_NAMES[INVALID_HISTOGRAM] == "invalid_histogram"
    assert pb.REJECT_REASON_INVALID_HISTOGRAM == INVALID_HISTOGRAM
    assert data_pb2.SERIES_KIND_HISTOGRAM == KIND_HISTOGRAM


def test_many_bad_points_cost_one_message_each_at_most() -> None:
    n = 5000
    points = {
        "bins": [1] * n,
        "edges": [1.0, 0.0] * n,  # every point decreasing
        "counts": [1.0] * n,
    }
    decoded = _decode(_batch(_series(**points)))
    assert decoded.outcome.rejected == n
    assert len(decoded.outcome.examples) == b.MAX_REPORTED


# -- the COPY encoder ----------------------------------------------------------------


def test_copy_rows_layout() -> None:
    msg = data_pb2.HistogramPoints(
        bins=[1, 2], edges=[0, 1, 5, 6, 7], counts=[3, 4, 5], underflow=[0, 1], nan_count=[2, 0]
    )
    block = decode_block(msg)
    times = np.array([PG_EPOCH + 1.0, PG_EPOCH + 2.0])
    steps = np.array([10, 11], dtype=np.int64)
    raw = encode_rows(block, np.array([1], dtype=np.int64), times, steps, 42)
    at = 0

    def take(fmt: str) -> Any:
        nonlocal at
        got = struct.unpack_from(fmt, raw, at)
        at += struct.calcsize(fmt)
        return got

    assert take(">h") == (9,)
    assert take(">iq") == (8, 2_000_000)
    assert take(">iq") == (8, 42)
    assert take(">iq") == (8, 11)
    assert take(">iiiiii") == (20 + 12 * 3, 1, 0, 701, 3, 1)
    assert [take(">id")[1] for _ in range(3)] == [5.0, 6.0, 7.0]
    assert take(">iiiiii") == (20 + 12 * 2, 1, 0, 701, 2, 1)
    assert [take(">id")[1] for _ in range(2)] == [4.0, 5.0]
    assert take(">id") == (8, 1.0) and take(">id") == (8, 0.0) and take(">id") == (8, 0.0)
    assert take(">ib") == (1, 0)
    assert at == len(raw)
