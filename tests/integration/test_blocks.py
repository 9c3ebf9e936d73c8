"""Numeric scalars as blocks (migration 010_scalar_blocks, ingest/store/blocks.py):
every bit of a value and every int64 step survives a block, a rewind or a
last write inside a block hides only what it should, and the migration
converts an existing row table keeping every point."""

from __future__ import annotations

import asyncio
import io
import math
import struct
import uuid
from importlib import resources

import asyncpg
import numpy as np

from ingest.devstack import LocalStack
from ingest.store.blocks import BLOCK_COLUMNS, Block, encode_blocks_copy, to_pg_us
from ingest.store.migrate import migrate
from steplog import Experiment
from steplog.v1 import data_pb2
from tests.sql import fetch
from tests.support import ProtoClient, ServiceProcess, scalar_series

I64_MAX = 2**63 - 1


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _points(database_url: str, run_id: str, name: str) -> list[tuple[int, float, bool]]:
    rows = fetch(
        database_url,
        "SELECT p.step, p.value, p.hidden FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 AND s.name = $2 ORDER BY p.step, p.hidden DESC",
        run_id,
        name,
    )
    return [(r["step"], r["value"], r["hidden"]) for r in rows]


def _blocks(database_url: str, run_id: str, name: str) -> list[asyncpg.Record]:
    return fetch(
        database_url,
        "SELECT b.* FROM scalar_blocks b JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 AND s.name = $2 ORDER BY b.block_id",
        run_id,
        name,
    )


def test_values_and_int64_steps_survive_a_block_bit_for_bit(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    subnormal = 5e-324
    values = [
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        subnormal,
        *[float(i) for i in range(8)],  # a commit of 16 points or more is a block
        2.2250738585072014e-308 / 3,
        1.7976931348623157e308,
        0.1,
    ]
    steps = [0, 1, 2, 3, 5, *range(6, 14), 2**31, 2**62, I64_MAX]  # steps are >= 0
    r = raw.write(run.id, scalar_series("edge", steps, values))
    assert (r.result.accepted, r.result.rejected) == (16, 0)
    # A contiguous block ending at the int64 limit: its steps are implied.
    top = [float(i) for i in range(1, 17)]
    r = raw.write(run.id, scalar_series("top", list(range(I64_MAX - 15, I64_MAX + 1)), top))
    assert r.result.accepted == 16

    got = _points(database_url, run.id, "edge")
    assert [p[0] for p in got] == steps
    assert math.isnan(got[0][1])
    assert [_bits(p[1]) for p in got[1:]] == [_bits(v) for v in values[1:]]
    assert not any(p[2] for p in got)
    (block,) = _blocks(database_url, run.id, "edge")
    assert (block["n"], block["nan_count"], block["min_step"], block["max_step"]) == (
        16,
        1,
        0,
        I64_MAX,
    )
    assert (block["min_value"], block["max_value"]) == (-math.inf, math.inf)
    assert list(block["steps"]) == steps and block["hidden"] is None

    assert _points(database_url, run.id, "top") == [
        (I64_MAX - 15 + i, v, False) for i, v in enumerate(top)
    ]
    (block,) = _blocks(database_url, run.id, "top")
    assert block["steps"] is None and block["last_value"] == 16.0

    # The public read path (blocks pruned by step) returns the same values.
    read = run.get_metrics()
    assert [_bits(v) for v in read["edge"][1:]] == [_bits(v) for v in values[1:]]
    assert math.isnan(read["edge"][0])
    assert read["top"] == top


def test_rewind_inside_a_block_hides_the_later_points_only(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    raw.write(run.id, scalar_series("loss", list(range(20)), [float(s) for s in range(20)]))
    assert len(_blocks(database_url, run.id, "loss")) == 1
    assert run.rewind(4) == 15
    (block,) = _blocks(database_url, run.id, "loss")
    assert block["hidden_count"] == 15
    assert list(block["hidden"]) == [False] * 5 + [True] * 15
    assert run.rewind(4) == 0  # nothing more to hide
    # Three points: rows beside the block (a commit of fewer than 16 points).
    r = raw.write(run.id, scalar_series("loss", [5, 6, 7], [-5.0, -6.0, -7.0]))
    assert (r.result.accepted, r.result.rejected) == (3, 0)
    assert run.get_metrics()["loss"] == [0.0, 1.0, 2.0, 3.0, 4.0, -5.0, -6.0, -7.0]
    visible = [(s, v) for s, v, h in _points(database_url, run.id, "loss") if not h]
    assert visible == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, -5.0),
        (6, -6.0),
        (7, -7.0),
    ]
    # The next point after the rewind's last visible one still follows the step rules.
    r = raw.write(run.id, scalar_series("loss", [7], [1.0]))
    assert r.result.rejected == 1


def test_last_write_wins_rewrites_a_step_inside_a_block(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    ooo = data_pb2.STEP_POLICY_OUT_OF_ORDER
    raw.write(
        run.id,
        scalar_series(
            "eval",
            list(range(20)),
            [float(s) for s in range(20)],
            step_policy=ooo,
        ),
    )
    # Two points (rows): the block's point at step 3 is hidden.
    r = raw.write(run.id, scalar_series("eval", [3, 25], [30.0, 120.0]))
    assert (r.result.accepted, r.result.rejected) == (2, 0)
    (first,) = _blocks(database_url, run.id, "eval")
    assert first["hidden_count"] == 1 and [i for i, h in enumerate(first["hidden"]) if h] == [3]
    expected = [float(s) for s in range(20)]
    expected[3] = 30.0
    assert run.get_metrics()["eval"] == [*expected, 120.0]
    # Sixteen points rewriting steps 10..25 (a block): the block's and the rows' hidden.
    r = raw.write(run.id, scalar_series("eval", list(range(10, 26)), [-1.0] * 16))
    assert (r.result.accepted, r.result.rejected) == (16, 0)
    assert run.get_metrics()["eval"] == [*expected[:10], *[-1.0] * 16]
    # Writing step 3 a third time hides the second write, not the first again.
    raw.write(run.id, scalar_series("eval", [3], [300.0]))
    at3 = [(v, h) for s, v, h in _points(database_url, run.id, "eval") if s == 3]
    assert sorted(at3) == [(3.0, True), (30.0, True), (300.0, False)]


def test_block_encoder_splits_long_spans_and_keeps_masks(
    service: ServiceProcess, database_url: str
) -> None:
    sid = -int(uuid.uuid4().int % 10**12) - 1  # no series has a negative id
    n = 5000
    # Times over 3 hours: more than one int4-microsecond block span (~35 min).
    times = 1.8e9 + np.linspace(0.0, 3 * 3600.0, n) + 1e-6 * (np.arange(n) % 7)
    steps = np.arange(n, dtype=np.int64) * 3 - 7
    values = np.sin(np.arange(n, dtype=np.float64))
    values[::97] = np.nan
    hidden = np.zeros(n, dtype=np.bool_)
    hidden[100:150] = True
    payload, rows = encode_blocks_copy([Block(sid, to_pg_us(times), steps, values, hidden)])
    assert rows >= 6

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.copy_to_table(
                "scalar_blocks", source=io.BytesIO(payload), columns=BLOCK_COLUMNS, format="binary"
            )
            return list(
                await conn.fetch(
                    "SELECT step, value, hidden, (extract(epoch FROM time) * 1000000)::bigint AS us"
                    " FROM scalar_points WHERE series_id = $1 ORDER BY step",
                    sid,
                )
            )
        finally:
            await conn.execute("DELETE FROM scalar_blocks WHERE series_id = $1", sid)
            await conn.close()

    got = asyncio.run(go())
    assert [r["step"] for r in got] == steps.tolist()
    assert [r["hidden"] for r in got] == hidden.tolist()
    # Microseconds as the row layout rounds them (ingest.store.copy.encode_scalar_copy).
    assert [r["us"] for r in got] == (to_pg_us(times) + 946_684_800_000_000).tolist()
    for r, v in zip(got, values.tolist(), strict=True):
        assert (math.isnan(r["value"]) and math.isnan(v)) or _bits(r["value"]) == _bits(v)


def test_migration_converts_existing_rows_keeping_every_point(stack: LocalStack) -> None:
    name = f"steplog_blocks_{uuid.uuid4().hex[:10]}"
    url = stack.create_database(name)
    files = sorted(
        (
            f
            for f in resources.files("ingest.store.migrations").iterdir()
            if f.name.endswith(".sql")
        ),
        key=lambda f: f.name,
    )
    before = [f for f in files if f.name < "010"]
    snapshot = (
        "SELECT series_id, step, (extract(epoch FROM time) * 1000000)::bigint AS us,"
        " float8send(value) AS bits, hidden FROM scalar_points ORDER BY 1, 2, 3, 4, 5"
    )

    async def go() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int, int]:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            await conn.execute(
                "CREATE TABLE schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for f in before:
                await conn.execute(f.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    f.name.removesuffix(".sql"),
                )
            # 10,000 points of one series (three blocks of at most 4096), times
            # over 3 hours (cut into 2,000-second buckets), a rewound tail, a
            # step written twice, NaN, -0.0 and infinities; and a small series.
            await conn.execute(
                "INSERT INTO scalar_points (time, series_id, step, value, hidden)"
                " SELECT timestamptz '2026-01-01' + g * interval '1.0801 second', 1, g,"
                "  CASE WHEN g % 101 = 0 THEN 'NaN'::float8 WHEN g = 5 THEN '-0'::float8"
                "   WHEN g = 6 THEN 'Infinity' WHEN g = 7 THEN '-Infinity' ELSE sin(g) END,"
                "  g > 9900 FROM generate_series(0, 9999) g"
            )
            await conn.execute(
                "INSERT INTO scalar_points (time, series_id, step, value, hidden) VALUES"
                " ('2026-01-01 00:00:00.000001+00', 1, 9950, 1.5, false),"
                " ('2026-01-02', 2, 3, 0.25, false), ('2026-01-02 00:00:01', 2, 9, 0.5, false)"
            )
            old = [tuple(r) for r in await conn.fetch(snapshot)]
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            assert await migrate(pool) == [
                f.name.removesuffix(".sql") for f in files if f.name >= "010"
            ]
            new = [tuple(r) for r in await pool.fetch(snapshot)]
            rows = int(await pool.fetchval("SELECT count(*) FROM scalar_rows"))
            blocks = int(await pool.fetchval("SELECT count(*) FROM scalar_blocks"))
        finally:
            await pool.close()
        return old, new, rows, blocks

    try:
        old, new, rows, blocks = asyncio.run(go())
        assert len(old) == 10_003
        assert new == old
        assert rows == 0
        assert blocks >= 4
    finally:
        stack.drop_database(name)


def test_log_batch_logs_arrays_of_one_series_or_many(url: str, experiment_name: str) -> None:
    import pytest

    from steplog.errors import InvalidArgumentError

    run = Experiment(experiment_name, url=url).start_logging()
    steps = np.arange(1000, dtype=np.int64)
    run.log_batch({"a": np.sqrt(steps), "b": -np.arange(1000.0)}, steps=steps)
    run.log_batch("c", [0.5, math.nan, math.inf])  # unstepped, from a list
    run.log_batch("a", np.array([7.0]), steps=np.array([999]))  # same step, another value
    with pytest.raises(InvalidArgumentError):
        run.log_batch("d", np.zeros((2, 2)))
    with pytest.raises(InvalidArgumentError):
        run.log_batch("d", np.zeros(2), steps=np.array([0.5, 1.5]))
    assert run.flush(30)
    got = run.get_metrics()
    assert got["a"] == np.sqrt(steps).tolist()
    assert got["b"] == (-np.arange(1000.0)).tolist()
    assert got["c"][0] == 0.5 and math.isnan(got["c"][1]) and got["c"][2] == math.inf
    assert "d" not in got
    (rejection,) = run.rejections()
    assert (rejection.name, rejection.step, rejection.reason) == ("a", 999, "STEP_CONFLICT")


def test_log_batch_refuses_a_bad_call_whole_before_logging_anything(
    url: str, experiment_name: str
) -> None:
    """log_batch checks every column with numpy before it appends any: a
    wrong dtype, a wrong shape, lengths that differ, steps that go back or
    leave int64, times that are not finite raise InvalidArgumentError naming
    the field, and no series of that call is logged (steplog._batch)."""
    import pytest

    from steplog.errors import InvalidArgumentError

    run = Experiment(experiment_name, url=url).start_logging()
    steps = np.arange(3)
    bad: list[tuple[dict[str, object], str, str]] = [
        ({"metrics": {"ok": np.ones(3), "s": np.array(["1.5", "2", "3"])}}, "value", "dtype <U3"),
        ({"metrics": {"ok": np.ones(3), "z": np.ones(3) * 1j}}, "value", "complex128"),
        ({"metrics": {"ok": np.ones(3), "o": [1.0, None, 2.0]}}, "value", "object"),
        ({"metrics": {"ok": np.ones(3), "m": np.zeros((3, 1))}}, "value", "one-dimensional"),
        ({"metrics": {"ok": np.ones(3), "short": np.ones(2)}}, "value", "2 log_batch values for 3"),
        ({"metrics": {"ok": np.ones(3)}, "steps_": np.array([0.0, 1.0, 2.0])}, "step", "float64"),
        ({"metrics": {"ok": np.ones(3)}, "steps_": np.array([True, False, True])}, "step", "bool"),
        ({"metrics": {"ok": np.ones(3)}, "steps_": np.array([0, 5, 4])}, "step", "not decrease"),
        ({"metrics": {"ok": np.ones(3)}, "steps_": np.array([-2, -1, 0])}, "step", ">= 0"),
        (
            {"metrics": {"ok": np.ones(3)}, "steps_": np.array([0, 1, 2**63], dtype=np.uint64)},
            "step",
            "at most",
        ),
        ({"metrics": {"ok": np.ones(3)}, "times_": np.array([1.0, np.nan, 2.0])}, "time", "finite"),
        ({"metrics": {"ok": np.ones(3)}, "times_": np.ones(2)}, "time", "3 steps but 2 times"),
    ]
    for case, field, words in bad:
        kwargs = {"steps": case.get("steps_", steps)}
        if "times_" in case:
            kwargs["times"] = case["times_"]
        with pytest.raises(InvalidArgumentError, match=words) as err:
            run.log_batch(case["metrics"], **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field, (words, err.value)
    # The same columns, well formed: logged (ints, bools and float32 as float64).
    run.log_batch(
        {"ok": np.ones(3), "i": np.array([1, 2, 3]), "b": [True, False, True]},
        steps=np.array([0, 1, 1], dtype=np.uint8),  # an equal step is the service's to judge
        times=np.array([1.7e9, 1.7e9 + 1, 1.7e9 + 2], dtype=np.float32),
    )
    assert run.flush(30)
    got = run.get_metrics()
    assert sorted(got) == ["b", "i", "ok"]
    assert got["i"] == [1.0, 2.0] and got["b"] == [1.0, 0.0]  # step 1 again: conflict
    assert {(r.name, r.step, r.reason) for r in run.rejections()} == {
        ("i", 1, "STEP_CONFLICT"),
        ("b", 1, "STEP_CONFLICT"),
    }
    assert got["ok"] == [1.0, 1.0]  # the repeat of (1, 1.0) is a duplicate, not stored


def test_log_batch_keeps_every_float_bit_for_bit_and_int64_steps(
    url: str, experiment_name: str
) -> None:
    """NaN, both infinities, -0.0, subnormals and the extremes of float64
    through log_batch, the wire and the blocks, read back bit for bit; steps
    up to the int64 limit (every varint width), many series in one call."""
    run = Experiment(experiment_name, url=url).start_logging()
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, -5e-324, 2.2250738585072014e-308]
    specials += [1.7976931348623157e308, -1.7976931348623157e308, 1.0, -1.5]
    steps = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28, 2**35, 2**49, 2**56, I64_MAX])
    run.log_batch({"x": specials, "y": np.array(specials[::-1])}, steps=steps)
    big = np.arange(50_000, dtype=np.int64) * 7 + 100
    run.log_batch("z", np.sin(big.astype(np.float64)), steps=big)
    assert run.flush(60)
    for name, want in (("x", specials), ("y", specials[::-1])):
        got = run.get_series(name)
        assert got["steps"] == steps.tolist()
        assert [_bits(v) for v in got["values"]] == [_bits(v) for v in want], name
    z = run.get_series("z")
    assert z["steps"] == big.tolist() and z["values"] == np.sin(big.astype(np.float64)).tolist()


def test_pages_over_overlapping_blocks_return_every_visible_point_once(
    url: str, experiment_name: str, database_url: str
) -> None:
    """Pages read only the blocks they need (scalar_points_page): with blocks
    whose step ranges overlap (an out-of-order series), hidden points, a
    rewind and several series in one page, the pages together still hold
    every visible point once, in order."""
    from steplog.v1 import query_service_pb2 as qs
    from tests.integration.test_query_edges import Raw

    run = Experiment(experiment_name, url=url).start_logging()
    raw = Raw(url)
    ooo = data_pb2.STEP_POLICY_OUT_OF_ORDER

    def series(
        name: str, steps: list[int], values: list[float], **kw: object
    ) -> data_pb2.SeriesData:
        return data_pb2.SeriesData(
            name=name, scalars=data_pb2.ScalarColumns(steps=steps, values=values), **kw
        )

    # "o": blocks of even steps, odd steps, then a rewrite of 40..59 (overlapping ranges).
    raw.write(run.id, series("o", list(range(0, 100, 2)), [1.0] * 50, step_policy=ooo))
    raw.write(run.id, series("o", list(range(1, 100, 2)), [2.0] * 50, step_policy=ooo))
    raw.write(run.id, series("o", list(range(40, 60)), [3.0] * 20, step_policy=ooo))
    # "s": ten blocks of 30 strict steps, then a rewind to 149 and 20 more.
    for k in range(10):
        raw.write(run.id, series("s", list(range(30 * k, 30 * k + 30)), [float(k)] * 30))
    assert run.rewind(149, names=["s"]) == 150
    raw.write(run.id, series("s", list(range(150, 170)), [-1.0] * 20))

    truth = {
        name: [
            (r["step"], r["value"])
            for r in fetch(
                database_url,
                "SELECT p.step, p.value FROM scalar_points p JOIN series s USING (series_id)"
                " WHERE s.run_id = $1 AND s.name = $2 AND NOT p.hidden ORDER BY p.step",
                run.id,
                name,
            )
        ]
        for name in ("o", "s")
    }
    assert len(truth["o"]) == 100 and len(truth["s"]) == 170
    for page_size in (1, 7, 33, 1000):
        for name in ("o", "s"):
            request = qs.ReadSeriesRequest(
                workspace="default", run_id=run.id, name=name, page_size=page_size
            )
            pages = list(raw.pages("ReadSeries", request))
            got = [
                (s, v)
                for p in pages
                for s, v in zip(p.series.scalars.steps, p.series.scalars.values, strict=True)
            ]
            assert got == truth[name], (name, page_size)
            # Counted from the blocks' summaries where nothing is hidden.
            assert pages[0].total_points == len(truth[name])
        request = qs.GetMetricsRequest(workspace="default", run_id=run.id, page_size=page_size)
        merged: dict[str, list[tuple[int, float]]] = {}
        for p in raw.pages("GetMetrics", request):
            for run_data in p.runs:
                for sd in run_data.series:
                    merged.setdefault(sd.name, []).extend(
                        zip(sd.scalars.steps, sd.scalars.values, strict=True)
                    )
        assert merged == truth, page_size


def test_an_update_of_the_view_changes_a_point_inside_a_block(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    values = [1.0, 2.0, 9.0, 4.0, 5.0, *[float(i) for i in range(6, 17)]]  # 16: a block
    raw.write(run.id, scalar_series("x", list(range(16)), values))
    fetch(
        database_url,
        "UPDATE scalar_points p SET value = 'NaN' FROM series s WHERE s.series_id = p.series_id"
        " AND s.run_id = $1 AND p.step = 2",
        run.id,
    )
    (block,) = _blocks(database_url, run.id, "x")
    assert (block["nan_count"], block["max_value"], block["last_value"]) == (1, 16.0, 16.0)
    got = run.get_metrics()["x"]
    assert got[:2] + got[3:] == values[:2] + values[3:] and math.isnan(got[2])
