"""Downsampled reads of numeric scalars through the real service (the numpy
path of ingest/store/columns.py, ReadSeries with max_points and ReadCharts):
equal to the SQL downsampling over the points as rows (the reference the
service used before), with hidden points inside a block left out, blocks
straddling bucket edges, blocks overlapping (an out-of-order series), rows
beside blocks, and a rewind after the blocks were cached; ReadCharts' pages,
errors and the public `run.get_charts`."""

from __future__ import annotations

import asyncio
import math
import struct
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from bench.common import scrape
from ingest.store.queries import MAX_STEP, MIN_STEP, Window, visible_points
from steplog import Experiment, Run
from steplog.errors import InvalidArgumentError, NotFoundError
from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs
from tests.support import ProtoClient, ServiceProcess, free_port
from tests.support import scalar_series as series

Triple = tuple[list[int], list[float], list[float]]


def wave(steps: range) -> list[float]:
    out = []
    for s in steps:
        v = math.sin(s / 37.0) * (1 + s % 5)
        if s % 211 == 3:
            v = math.nan
        elif s % 307 == 5:
            v = math.inf
        elif s % 401 == 7:
            v = -math.inf
        out.append(v)
    return out


def sql_downsample(database_url: str, sid: int, start: int, end: int, max_points: int) -> Triple:
    """The SQL downsampling (queries._DOWNSAMPLE_EXTREMES) over scalar_points."""

    async def run() -> Triple:
        conn = await asyncpg.connect(database_url)
        try:
            window = Window(
                limit=1_000_000,
                budget=1 << 40,
                start=start,
                end=end,
                after=(sid, MIN_STEP),
                extremes=max_points,
            )
            got = await visible_points(conn, "scalar_points", [("value", "value")], [sid], window)
        finally:
            await conn.close()
        rows = got.rows.get(sid, [])
        return [r["step"] for r in rows], [r["t"] for r in rows], [r["value"] for r in rows]

    return asyncio.run(run())


def bits(values: Any) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def series_id(database_url: str, run_id: str, name: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT series_id FROM series WHERE run_id = $1 AND name = $2", run_id, name
                )
            )
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def logged(url: str, experiment_name: str) -> tuple[Any, ProtoClient]:
    """A run with "plain" (blocks of 1,000 consecutive steps), "ooo" (an
    out-of-order series: blocks of even, then odd steps, a rewrite of some
    steps and rows beside the blocks) and "rw" (blocks with a rewind inside
    one, and more points after it); NaN and both infinities in each."""
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url, prefix="charts", strict=True)
    for k in range(5):
        steps = range(1000 * k, 1000 * k + 1000)
        raw.write(run.id, series("plain", list(steps), wave(steps)))
    ooo = data_pb2.STEP_POLICY_OUT_OF_ORDER
    evens, odds = range(0, 3000, 2), range(1, 3000, 2)
    raw.write(run.id, series("ooo", list(evens), wave(evens), step_policy=ooo))
    raw.write(run.id, series("ooo", list(odds), [-v for v in wave(odds)], step_policy=ooo))
    raw.write(run.id, series("ooo", list(range(500, 700)), [7.0] * 200, step_policy=ooo))
    raw.write(run.id, series("ooo", [10, 2999, 3000], [1e9, -1e9, 5.0], step_policy=ooo))
    for k in range(3):
        steps = range(1000 * k, 1000 * k + 1000)
        raw.write(run.id, series("rw", list(steps), wave(steps)))
    assert run.rewind(1499, names=["rw"]) == 1500
    raw.write(run.id, series("rw", list(range(1500, 2200)), [float(s) for s in range(1500, 2200)]))
    return run, raw


def chart(raw: ProtoClient, run_id: str, names: list[str], **kw: Any) -> list[qs.ChartSeries]:
    request = qs.ReadChartsRequest(
        workspace="default",
        run_id=run_id,
        series=[qs.SeriesRef(name=n) for n in names],
        **kw,
    )
    return [c for page in raw.pages("ReadCharts", request) for c in page.series]


def test_downsampled_reads_equal_the_sql_downsampling(
    logged: tuple[Any, ProtoClient], database_url: str
) -> None:
    run, raw = logged
    names = ["plain", "ooo", "rw"]
    sids = {n: series_id(database_url, run.id, n) for n in names}
    for start, end in [(MIN_STEP, MAX_STEP), (123, 2777), (1490, 1510)]:
        for max_points in [1, 2, 3, 10, 100, 299, 1000, 100_000]:
            got = chart(raw, run.id, names, start_step=start, end_step=end, max_points=max_points)
            assert [c.series.name for c in got] == names
            for c in got:
                steps, times, values = sql_downsample(
                    database_url, sids[c.series.name], start, end, max_points
                )
                sc = c.series.scalars
                where = (c.series.name, start, end, max_points)
                assert list(sc.steps) == steps, where
                assert bits(sc.values) == bits(values), where
                assert list(sc.times) == times, where
                assert len(sc.steps) <= max_points
                assert c.downsampled == (c.total_points > max_points)
            # ReadSeries with max_points answers the same points.
            for name in names:
                one = run.get_series(name, start_step=start, end_step=end, max_points=max_points)
                sc = next(c.series.scalars for c in got if c.series.name == name)
                assert one["steps"] == list(sc.steps) and bits(one["values"]) == bits(sc.values)


def test_a_rewind_after_a_read_is_seen_by_the_next_read(
    logged: tuple[Any, ProtoClient], database_url: str
) -> None:
    """The service caches decoded blocks by (block_id, xmin): hiding points
    inside a cached block changes its xmin, so the next read unpacks it again."""
    run, raw = logged
    sid = series_id(database_url, run.id, "plain")
    before = chart(raw, run.id, ["plain"], max_points=300)[0]
    assert before.total_points == 5000
    assert run.rewind(2499, names=["plain"]) == 2500  # inside the third block
    after = chart(raw, run.id, ["plain"], max_points=300)[0]
    assert after.total_points == 2500
    steps, _, values = sql_downsample(database_url, sid, MIN_STEP, MAX_STEP, 300)
    assert list(after.series.scalars.steps) == steps and max(steps) <= 2499
    assert bits(after.series.scalars.values) == bits(values)
    # Full resolution when the range holds no more than max_points.
    whole = chart(raw, run.id, ["plain"], start_step=2400, max_points=300)[0]
    assert not whole.downsampled and list(whole.series.scalars.steps) == list(range(2400, 2500))


def test_read_charts_pages_whole_series_in_request_order(
    logged: tuple[Any, ProtoClient],
) -> None:
    run, raw = logged
    names = ["rw", "plain", "rw", "ooo"]
    request = qs.ReadChartsRequest(
        workspace="default",
        run_id=run.id,
        series=[qs.SeriesRef(name=n) for n in names],
        max_points=50,
        page_size=1,
    )
    pages = list(raw.pages("ReadCharts", request))
    assert [[c.series.name for c in p.series] for p in pages] == [[n] for n in names]
    assert [bool(p.next_page_token) for p in pages] == [True, True, True, False]
    whole = chart(raw, run.id, names, max_points=50)
    assert [c.SerializeToString() for p in pages for c in p.series] == [
        c.SerializeToString() for c in whole
    ]


def test_read_charts_refuses_what_it_cannot_answer(logged: tuple[Any, ProtoClient]) -> None:
    run, raw = logged
    raw.write(
        run.id,
        data_pb2.SeriesData(
            name="note", scalars=data_pb2.ScalarColumns(steps=[0], text_values=["x"])
        ),
    )
    with pytest.raises(InvalidArgumentError) as bad:
        chart(raw, run.id, ["plain", "note"], max_points=10)
    assert bad.value.field == "series[1]"
    with pytest.raises(NotFoundError) as missing:
        chart(raw, run.id, ["plain", "nope"], max_points=10)
    assert missing.value.field == "series[1].name"
    for max_points in (0, -1, 100_001):
        with pytest.raises(InvalidArgumentError) as bad:
            chart(raw, run.id, ["plain"], max_points=max_points)
        assert bad.value.field == "max_points"
    with pytest.raises(InvalidArgumentError) as bad:
        chart(raw, run.id, [], max_points=10)
    assert bad.value.field == "series"
    with pytest.raises(InvalidArgumentError) as bad:
        chart(raw, run.id, ["plain"], max_points=10, start_step=5, end_step=4)
    assert bad.value.field == "end_step"


def test_get_charts_returns_numpy_columns(logged: tuple[Any, ProtoClient]) -> None:
    run, _ = logged
    run.log("tagged", 1.5, step=0, labels={"rank": "3"})
    got = run.get_charts(["plain", ("tagged", {"rank": "3"})], max_points=300)
    assert list(got) == ["plain", "tagged{rank=3}"]
    plain = got["plain"]
    assert plain["steps"].dtype == np.int64 and plain["values"].dtype == np.float64
    assert plain["downsampled"] and plain["total_points"] == 5000 and len(plain["steps"]) <= 300
    assert np.isnan(plain["values"]).any()
    assert math.inf in plain["values"] and -math.inf in plain["values"]
    one = run.get_series("plain", max_points=300)
    assert plain["steps"].tolist() == one["steps"] and plain["times"].tolist() == one["times"]
    tagged = got["tagged{rank=3}"]
    assert not tagged["downsampled"] and tagged["values"].tolist() == [1.5]


def test_a_chart_of_many_series_is_read_on_two_connections_in_one_snapshot(
    url: str, experiment_name: str, database_url: str
) -> None:
    """Eight series or more: the blocks are read on two connections sharing
    one snapshot (queries.PARALLEL_FROM_SERIES); every series still equals
    the SQL downsampling."""
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url, prefix="charts", strict=True)
    names = [f"s{j}" for j in range(9)]
    for k in range(2):
        steps = range(600 * k, 600 * k + 600)
        raw.write(
            run.id,
            *(
                series(n, list(steps), [v * (j + 1) for v in wave(steps)])
                for j, n in enumerate(names)
            ),
        )
    got = chart(raw, run.id, names, max_points=60)
    assert [c.series.name for c in got] == names
    for c in got:
        steps, times, values = sql_downsample(
            database_url, series_id(database_url, run.id, c.series.name), MIN_STEP, MAX_STEP, 60
        )
        assert list(c.series.scalars.steps) == steps and list(c.series.scalars.times) == times
        assert bits(c.series.scalars.values) == bits(values)
        assert c.downsampled and c.total_points == 1200


def test_a_chart_read_again_after_more_points_equals_the_sql_downsampling(
    logged: tuple[Any, ProtoClient], database_url: str
) -> None:
    """A chart read (its blocks cached and joined), then more points
    logged (a block, then a few points that stay rows), then a rewind: every
    read equals the SQL downsampling, whole and in a step range."""
    run, raw = logged
    sid = series_id(database_url, run.id, "plain")

    def same(start: int = MIN_STEP, end: int = MAX_STEP) -> None:
        got = chart(raw, run.id, ["plain"], start_step=start, end_step=end, max_points=90)[0]
        steps, times, values = sql_downsample(database_url, sid, start, end, 90)
        assert list(got.series.scalars.steps) == steps and list(got.series.scalars.times) == times
        assert bits(got.series.scalars.values) == bits(values)

    same()
    same()
    steps = range(5000, 6000)
    raw.write(run.id, series("plain", list(steps), wave(steps)))
    same()
    raw.write(run.id, series("plain", [6000, 6001, 6005], [math.nan, -0.0, math.inf]))
    same()
    same(4990, 6003)
    assert run.rewind(5499, names=["plain"]) == 503  # 5500-5999 and the three rows
    same()
    same(100, 5600)


def test_the_block_cache_holds_its_bound_and_can_be_off(
    url: str, service_env: dict[str, str], experiment_name: str, tmp_path: Path
) -> None:
    """STEPLOG_READ_CACHE_BYTES bounds the decoded blocks a service keeps
    (steplog_query_block_cache_bytes); 0 keeps none; the answers are the same."""
    names = [f"c{k}" for k in range(4)]
    steps = np.arange(20_000)
    run = Experiment(experiment_name, url=url).start_logging()
    run.log_batch({n: np.sin(steps / (k + 3.0)) for k, n in enumerate(names)}, steps=steps)
    assert run.flush(timeout=60)
    charts = {}
    for bound in (0, 300_000):
        env = service_env | {"STEPLOG_READ_CACHE_BYTES": str(bound)}
        log = tmp_path / f"cache-{bound}.log"
        proc = ServiceProcess(env, metrics_port=free_port(), log_path=log).start()
        try:
            reader = Run.get(run.id, url=proc.address)
            first = reader.get_charts(names, max_points=600)
            again = reader.get_charts(names, max_points=600)
            used = scrape(proc.metrics_port, "steplog_query_block_cache_bytes")
        finally:
            proc.stop()
        for name in names:
            for column in ("steps", "values"):
                assert np.array_equal(first[name][column], again[name][column])
        charts[bound] = first
        if bound == 0:
            assert used == 0
        else:
            # 4 x 20,000 points are 640 kB of values alone: only part of them fits.
            assert 0 < used <= bound, used
    for name in names:
        assert len(charts[0][name]["steps"]) > 100
        for column in ("steps", "values"):
            assert np.array_equal(charts[0][name][column], charts[300_000][name][column])
    run.complete()
