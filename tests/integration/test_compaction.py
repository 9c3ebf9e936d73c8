"""Compaction of numeric scalars (migration 011, ingest/store/compact.py):
commits of a few points per series are rows, and the sweep moves rows and
small blocks into full blocks keeping every point bit for bit (hidden ones
too), every count and last step, and every step rule that follows."""

from __future__ import annotations

import asyncio
import math
import struct
import time
import uuid
from typing import Any

import asyncpg
import pytest

from bench.common import scrape
from ingest.store.compact import CompactionTotals, compact_round, compact_series
from steplog import Experiment
from steplog.v1 import data_pb2
from tests.sql import fetch, fetchval
from tests.support import ProtoClient, ServiceProcess, free_port, scalar_series


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _points(database_url: str, run_id: str) -> list[tuple[str, int, bytes, bool, int]]:
    """Every stored point of a run, hidden ones too: (name, step, value bits,
    hidden, time in microseconds), sorted."""
    rows = fetch(
        database_url,
        "SELECT s.name, p.step, p.value, p.hidden,"
        " (extract(epoch FROM p.time) * 1000000)::bigint AS us"
        " FROM scalar_points p JOIN series s USING (series_id) WHERE s.run_id = $1",
        run_id,
    )
    return sorted((r["name"], r["step"], _bits(r["value"]), r["hidden"], r["us"]) for r in rows)


def _layout(database_url: str, run_id: str) -> tuple[int, int, list[int]]:
    """Rows, blocks, and the blocks' sizes of a run."""
    rows = fetchval(
        database_url,
        "SELECT count(*) FROM scalar_rows JOIN series s USING (series_id) WHERE s.run_id = $1",
        run_id,
    )
    sizes = [
        r["n"]
        for r in fetch(
            database_url,
            "SELECT b.n FROM scalar_blocks b JOIN series s USING (series_id)"
            " WHERE s.run_id = $1 ORDER BY b.min_step",
            run_id,
        )
    ]
    return int(rows), len(sizes), sizes


def _block_ids(database_url: str, run_id: str) -> set[int]:
    rows = fetch(
        database_url,
        "SELECT b.block_id FROM scalar_blocks b JOIN series s USING (series_id)"
        " WHERE s.run_id = $1",
        run_id,
    )
    return {r["block_id"] for r in rows}


def _series(database_url: str, run_id: str) -> list[tuple[str, int, int]]:
    rows = fetch(
        database_url,
        "SELECT name, point_count, last_step FROM series WHERE run_id = $1 ORDER BY name",
        run_id,
    )
    return [(r["name"], r["point_count"], r["last_step"]) for r in rows]


def _compact(database_url: str, run_id: str) -> CompactionTotals:
    """Compact a run's series until nothing of theirs is left to move (the
    session's database holds other tests' series too: those are not
    touched here; the live-writer test runs the service's own sweep)."""

    async def go() -> CompactionTotals:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        assert pool is not None
        totals = CompactionTotals()
        try:
            async with pool.acquire() as conn:
                ids = [
                    r["series_id"]
                    for r in await conn.fetch(
                        "SELECT series_id FROM series WHERE run_id = $1 ORDER BY 1", run_id
                    )
                ]
                for _ in range(1000):
                    before = totals.points
                    for i in range(0, len(ids), 2):
                        await compact_series(conn, ids[i : i + 2], totals)
                    if totals.points == before:
                        break
        finally:
            await pool.close()
        return totals

    return asyncio.run(go())


def test_small_commits_are_rows_and_compaction_makes_them_blocks(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    specials = [math.nan, math.inf, -math.inf, -0.0, 5e-324]
    # Seven series, 300 commits of one point each (what a training loop sends).
    for step in range(300):
        for j in range(7):
            v = specials[step % 5] if step % 50 == 0 else step + j / 10
            r = raw.write(run.id, scalar_series(f"m{j}", [step], [v]))
            assert r.result.accepted == 1
    # A rewind and an out-of-order series rewriting a step: hidden rows.
    assert run.rewind(279, names=["m0"]) == 20
    ooo = data_pb2.STEP_POLICY_OUT_OF_ORDER
    raw.write(run.id, scalar_series("eval", [0, 1, 2], [1.0, 2.0, 3.0], step_policy=ooo))
    raw.write(run.id, scalar_series("eval", [1], [20.0], step_policy=ooo))
    rows, blocks, _ = _layout(database_url, run.id)
    assert (rows, blocks) == (7 * 300 + 4, 0)
    before, counts = _points(database_url, run.id), _series(database_url, run.id)
    metrics_before = run.get_metrics()

    totals = _compact(database_url, run.id)
    assert totals.rows_in >= 7 * 300 + 4
    rows, blocks, sizes = _layout(database_url, run.id)
    assert rows == 0 and blocks == 8  # one block per series
    assert sorted(sizes) == [4] + [300] * 7
    assert _points(database_url, run.id) == before  # bit for bit, hidden ones too
    assert _series(database_url, run.id) == counts
    after = run.get_metrics()
    assert after.keys() == metrics_before.keys()
    for name, values in after.items():
        assert [_bits(v) for v in values] == [_bits(v) for v in metrics_before[name]], name
    assert after["m0"][-1] == 279 and after["eval"] == [1.0, 20.0, 3.0]

    # Nothing left: another pass rewrites none of these blocks.
    ids = _block_ids(database_url, run.id)
    _compact(database_url, run.id)
    assert _block_ids(database_url, run.id) == ids

    # The step rules after compaction: the rewound series continues at 280,
    # a rewind inside a compacted block hides only what follows, the
    # out-of-order series rewrites a step of a compacted block.
    assert raw.write(run.id, scalar_series("m0", [279], [1.0])).result.rejected == 1
    assert raw.write(run.id, scalar_series("m0", [280], [1.0])).result.accepted == 1
    assert run.rewind(99, names=["m1"]) == 200
    raw.write(run.id, scalar_series("eval", [2], [30.0], step_policy=ooo))
    got = run.get_metrics()
    assert [_bits(v) for v in got["m1"]] == [_bits(v) for v in metrics_before["m1"][:100]]
    assert got["m0"][-1] == 1.0 and len(got["m0"]) == 281
    assert got["eval"] == [1.0, 20.0, 30.0]


def test_small_blocks_merge_within_a_time_cell_and_full_ones_stay(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    t0 = 2_000_000_000.0  # at the start of a 2,000-second cell
    # Ten commits of 20 points: ten small blocks in one cell.
    for k in range(10):
        steps = list(range(20 * k, 20 * k + 20))
        times = [t0 + s * 0.5 for s in steps]
        raw.write(run.id, scalar_series("a", steps, [float(s) for s in steps], times=times))
    # A full block (1024 points) is left as it is.
    steps = list(range(200, 1224))
    times = [t0 + 100 + s * 0.001 for s in steps]
    raw.write(run.id, scalar_series("a", steps, [float(s) for s in steps], times=times))
    # A slow series: one point an hour for ten hours, each in its own cell.
    for h in range(10):
        raw.write(run.id, scalar_series("slow", [h], [float(h)], times=[t0 + 3600.0 * h]))
    assert _layout(database_url, run.id)[:2] == (10, 11)
    before = _points(database_url, run.id)

    _compact(database_url, run.id)
    rows, _, sizes = _layout(database_url, run.id)
    # "a": one block of the 200 small-block points, the 1024 block untouched;
    # "slow": one block per hour (a block spans at most one cell).
    assert rows == 0 and sorted(sizes) == [1] * 10 + [200, 1024]
    assert _points(database_url, run.id) == before
    ids = _block_ids(database_url, run.id)
    _compact(database_url, run.id)
    assert _block_ids(database_url, run.id) == ids  # the single blocks of "slow" stay
    # One more point in the last hour's cell merges with that cell's block only.
    raw.write(run.id, scalar_series("slow", [10], [10.0], times=[t0 + 3600.0 * 9 + 5]))
    _compact(database_url, run.id)
    assert sorted(_layout(database_url, run.id)[2]) == [1] * 9 + [2, 200, 1024]
    assert len(ids - _block_ids(database_url, run.id)) == 1  # that block only was rewritten
    assert run.get_metrics()["slow"] == [float(h) for h in range(11)]


def test_compaction_beside_live_writers_keeps_every_point(
    own_database: dict[str, str], experiment_name: str, tmp_path: Any
) -> None:
    """A service compacting every 50 ms while a client logs small commits,
    and rewinds: what a reader sees at the end is what was logged, and the
    compaction counters moved."""
    service_env = own_database
    database_url = service_env["STEPLOG_DATABASE_URL"]
    env = dict(service_env, STEPLOG_COMPACT_INTERVAL_S="0.05")
    proc = ServiceProcess(env, metrics_port=free_port(), log_path=tmp_path / "service.log")
    proc.start()
    try:
        run = Experiment(experiment_name, url=proc.address).start_logging()
        expected: dict[str, dict[int, float]] = {f"s{j}": {} for j in range(4)}
        deadline = time.monotonic() + 60
        for step in range(600):
            for j in range(4):
                run.log(f"s{j}", step + j * 0.25, step=step)
                expected[f"s{j}"][step] = step + j * 0.25
            if step % 200 == 199:
                assert run.flush(30)
                # Back 150 steps; every series logs from there again.
                back = step - 150
                run.rewind(back)
                for j in range(4):
                    expected[f"s{j}"] = {s: v for s, v in expected[f"s{j}"].items() if s <= back}
                for j in range(4):
                    for s in range(back + 1, step + 1):
                        run.log(f"s{j}", -s - j * 0.25, step=s)
                        expected[f"s{j}"][s] = -s - j * 0.25
            # Paced: the client sends every 0.2 s, ~13 steps a commit (rows).
            time.sleep(0.015)
        assert run.flush(30)
        assert time.monotonic() < deadline
        # Let the sweep finish what is left, then read.
        until = time.monotonic() + 30
        while time.monotonic() < until:
            if _layout(database_url, run.id)[0] == 0:
                break
            time.sleep(0.1)
        assert _layout(database_url, run.id)[0] == 0
        metrics = run.get_metrics()
        for name, want in expected.items():
            assert metrics[name] == [want[s] for s in sorted(want)], name
        counts = {name: (n, last) for name, n, last in _series(database_url, run.id)}
        for name, want in expected.items():
            assert counts[name] == (len(want), max(want)), name
        port = proc.metrics_port
        assert scrape(port, 'steplog_compaction_points_total{source="row"}') > 0
        assert scrape(port, "steplog_compaction_blocks_written_total") > 0
        assert scrape(port, 'steplog_compaction_rounds_total{outcome="done"}') > 0
        assert scrape(port, 'steplog_compaction_rounds_total{outcome="failed"}') == 0
        run.complete()
    finally:
        proc.stop()


@pytest.mark.parametrize("compacted", [False, True])
def test_deleting_an_experiment_deletes_its_rows_and_blocks(
    url: str, experiment_name: str, database_url: str, compacted: bool
) -> None:
    exp = Experiment(experiment_name, url=url)
    run = exp.start_logging()
    for step in range(40):
        run.log("x", float(step), step=step)
        if step % 10 == 9:
            assert run.flush(30)
    run.complete()
    ids = [
        r["series_id"]
        for r in fetch(database_url, "SELECT series_id FROM series WHERE run_id = $1", run.id)
    ]
    if compacted:
        _compact(database_url, run.id)
        assert _layout(database_url, run.id)[0] == 0
    Experiment.delete(None, exp.id, url=url)
    left = fetchval(
        database_url,
        "SELECT (SELECT count(*) FROM scalar_rows WHERE series_id = ANY($1::bigint[]))"
        " + (SELECT count(*) FROM scalar_blocks WHERE series_id = ANY($1::bigint[]))",
        ids,
    )
    assert left == 0


def test_one_call_takes_a_bounded_share_of_a_long_backlog(
    url: str, experiment_name: str, database_url: str
) -> None:
    """scalar_compact(ids, most_rows, most_blocks) takes at most most_rows rows
    of a series (all rows of one step together) and most_blocks small blocks:
    a backlog is worked off over several calls, every point kept."""
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url)
    raw.write(run.id, scalar_series("x", [0], [0.0]))
    for k in range(5):  # five small blocks (20 points each) in one cell
        steps = list(range(2000 + 20 * k, 2020 + 20 * k))
        raw.write(run.id, scalar_series("x", steps, [1.0] * 20))
    (sid,) = [
        r["series_id"]
        for r in fetch(database_url, "SELECT series_id FROM series WHERE run_id = $1", run.id)
    ]
    # 999 more rows, then 300 rows at one step (an out-of-order series' rewrites).
    fetch(
        database_url,
        "INSERT INTO scalar_points (time, series_id, step, value, hidden)"
        " SELECT now() + i * interval '1 ms', $1, i, i, false FROM generate_series(1, 999) i",
        sid,
    )
    fetch(
        database_url,
        "INSERT INTO scalar_points (time, series_id, step, value, hidden)"
        " SELECT now() + i * interval '1 ms', $1, 1000, i, i < 300"
        " FROM generate_series(1, 300) i",
        sid,
    )
    before = _points(database_url, run.id)

    async def calls() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(database_url)
        taken = []
        try:
            for _ in range(50):
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM series WHERE series_id = $1 FOR UPDATE", sid)
                    got = await conn.fetch(
                        "SELECT * FROM scalar_compact(ARRAY[$1::bigint], 100, 2)", sid
                    )
                if not got:
                    break
                taken.append((int(got[0]["rows_in"]), int(got[0]["blocks_in"])))
        finally:
            await conn.close()
        return taken

    taken = asyncio.run(calls())
    assert sum(r for r, _ in taken) == 1300 and sum(b for _, b in taken) >= 5
    # At most 100 rows a call, but the 300 rows of step 1000 in one call.
    assert all(r <= 100 for r, _ in taken if r != 300) and 300 in [r for r, _ in taken]
    assert all(b <= 2 for _, b in taken)
    assert _layout(database_url, run.id)[0] == 0
    assert _points(database_url, run.id) == before


def test_steps_at_the_int64_limits_compact(
    url: str, experiment_name: str, database_url: str
) -> None:
    """Rows with steps 0 and 2**63 - 1 in one series, and a contiguous run
    ending at 2**63 - 1: compaction's step arithmetic does not overflow."""
    top = 2**63 - 1
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url, strict=True)
    for step in (0, 1, top):
        raw.write(run.id, scalar_series("wide", [step], [float(step % 7)]))
    for step in range(top - 4, top + 1):
        raw.write(run.id, scalar_series("end", [step], [1.0]))
    before = _points(database_url, run.id)
    _compact(database_url, run.id)
    assert _layout(database_url, run.id)[:2] == (0, 2)
    assert _points(database_url, run.id) == before
    implied = {
        r["name"]: r["implied"]
        for r in fetch(
            database_url,
            "SELECT s.name, b.steps IS NULL AS implied FROM scalar_blocks b"
            " JOIN series s USING (series_id) WHERE s.run_id = $1",
            run.id,
        )
    }
    assert implied == {"wide": False, "end": True}
    assert run.get_metrics()["end"] == [1.0] * 5


def test_a_series_that_fails_to_compact_holds_no_other_back(
    url: str, experiment_name: str, database_url: str
) -> None:
    """A fault placed in the database (a trigger refusing one series' new
    blocks): that series' transaction rolls back and stays rows, counted as
    failed; the series of the other transactions of the round are compacted."""
    run = Experiment(experiment_name, url=url).start_logging()
    raw = ProtoClient(url, strict=True)
    for step in range(3):
        for name in ("bad", "good"):
            raw.write(run.id, scalar_series(name, [step], [float(step)]))
    ids = {
        r["name"]: r["series_id"]
        for r in fetch(database_url, "SELECT name, series_id FROM series WHERE run_id = $1", run.id)
    }
    fault = f"refuse_{uuid.uuid4().hex[:8]}"

    async def go() -> CompactionTotals:
        conn = await asyncpg.connect(database_url)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        assert pool is not None
        try:
            await conn.execute(
                f"CREATE FUNCTION {fault}() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN IF NEW.series_id = {ids['bad']} THEN RAISE EXCEPTION 'injected';"
                " END IF; RETURN NEW; END $$"
            )
            await conn.execute(
                f"CREATE TRIGGER {fault} BEFORE INSERT ON scalar_blocks"
                f" FOR EACH ROW EXECUTE FUNCTION {fault}()"
            )
            totals = CompactionTotals()
            after = await compact_round(pool, totals, per_transaction=1)
            while after:
                after = await compact_round(pool, totals, after, per_transaction=1)
            return totals
        finally:
            await conn.execute(f"DROP TRIGGER IF EXISTS {fault} ON scalar_blocks")
            await conn.execute(f"DROP FUNCTION IF EXISTS {fault}()")
            await conn.close()
            await pool.close()

    totals = asyncio.run(go())
    assert totals.failed >= 1
    rows = {
        r["series_id"]: r["n"]
        for r in fetch(
            database_url,
            "SELECT series_id, count(*) AS n FROM scalar_rows"
            " WHERE series_id = ANY($1::bigint[]) GROUP BY 1",
            list(ids.values()),
        )
    }
    assert rows == {ids["bad"]: 3}  # "good" was compacted, "bad" stayed rows
    assert run.get_metrics() == {"bad": [0.0, 1.0, 2.0], "good": [0.0, 1.0, 2.0]}
