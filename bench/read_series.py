"""READ: the public query path over long series, on the block layout
(migration 010) and, in the same run, on the row layout as the reference.

    python -m bench.read_series [--long 1000000] [--series 100] [--points 100000] [--repeat 3]

One run, logged through the public client (`run.log(name, v, step=i)`) and
acknowledged before any read: one series of L points (default 1,000,000)
and N series of P points each (default 100 x 100,000); every series holds
NaN, +Inf and -Inf values among its numbers. Then, each repeated R times
(medians printed, the service on the bench stack, a fresh database):

- `full`: `run.get_series(long)`, every point of the long series (ReadSeries,
  all its pages), checked to hold L points;
- `get_metrics`: `run.get_metrics(long)` (GetMetrics, Azure's shape: the
  list of values), checked to hold L values;
- `downsampled_one`: `run.get_series(long, max_points=1000)`;
- `chart`: the N series downsampled to 1,000 points each in one call
  (`run.get_charts(names, max_points=1000)`, ReadCharts: what a chart of N
  lines asks), checked that every series' answer is downsampled, within its
  bound, and keeps NaN, +Inf and -Inf; `chart_cold` is its first call (the
  service's cache of decoded blocks does not hold these series yet: every
  block's arrays come from PostgreSQL), `chart` the median of the next
  `repeat` calls (the blocks cached, only their ids and versions read);
  likewise `full_cold` and `full` (the long series);
- `chart_loop`: the same chart asked series by series (`get_series(...,
  max_points=1000)` for each, one after the other), once;
- the reference, the same table read by SQL (asyncpg) in the same run:
  `sql_full` (the long series' step and value, ordered by step) and
  `sql_chart` (one query: the N series in 1,000 step buckets each, with
  min, max and the last value of every bucket, TimescaleDB's `last`).

`chart_fresh` is the chart's very first call, before any other read: the
service that took the points compacts them with its own sweep
(STEPLOG_COMPACT_INTERVAL_S=1 while they are logged, waited for until
nothing is left to compact), and commits and compactions put the blocks
they store into its cache (write-through, STEPLOG_READ_CACHE_WRITE_THROUGH):
what a user opening the chart of a run that is training meets. Then the
service is restarted (its cache empty, no compaction from there on) and
every read above runs, `chart_cold` and `full_cold` on that empty cache.

Then the same points are moved into the row table (`scalar_rows`, one row
per point, the layout before migration 010), the blocks emptied, and every
read is repeated. Prints, one line per layout,

    READ full_ms=... get_metrics_ms=... downsampled_one_ms=... chart_ms=...
         sql_full_ms=... sql_chart_ms=... layout=blocks|row_per_point

The SQL reference reads `scalar_points` (the view over rows and blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from bench.common import bench_stack, median, service, settle_compaction

BUCKETS = 1000


def value(i: int) -> float:
    """The series' values: mostly numbers, with NaN, +Inf and -Inf sprinkled in."""
    if i % 9973 == 17:
        return math.nan
    if i % 10007 == 29:
        return math.inf
    if i % 10009 == 41:
        return -math.inf
    return math.sin(i / 1000.0) + i * 1e-6


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median milliseconds of `repeat` calls of fn, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return median(times), out


def kept(values: list[float]) -> tuple[bool, bool, bool]:
    return (
        any(math.isnan(v) for v in values),
        any(v == math.inf for v in values),
        any(v == -math.inf for v in values),
    )


async def sql_reads(
    url: str, run_id: str, long: str, names: list[str], repeat: int
) -> tuple[float, float]:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch("SELECT name, series_id FROM series WHERE run_id = $1", run_id)
        ids = {r["name"]: r["series_id"] for r in found}
        full, chart = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            rows = await conn.fetch(
                "SELECT step, value FROM scalar_points WHERE series_id = $1 AND NOT hidden"
                " ORDER BY step",
                ids[long],
            )
            full.append((time.perf_counter() - t) * 1e3)
            assert len(rows) > 0
            t = time.perf_counter()
            rows = await conn.fetch(
                "WITH w AS (SELECT series_id, max(step) + 1 AS n FROM scalar_points"
                "  WHERE series_id = ANY($1::bigint[]) GROUP BY series_id)"
                " SELECT p.series_id, p.step * $2 / w.n AS bucket, min(p.value), max(p.value),"
                "  last(p.value, p.step)"
                " FROM scalar_points p JOIN w USING (series_id)"
                " WHERE NOT p.hidden GROUP BY 1, 2",
                [ids[n] for n in names],
                BUCKETS,
            )
            chart.append((time.perf_counter() - t) * 1e3)
            assert len(rows) == len(names) * BUCKETS, len(rows)
        return median(full), median(chart)
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--long", type=int, default=1_000_000)
    p.add_argument("--series", type=int, default=100)
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--skip-rows", action="store_true", help="no row-layout reference line (its reads are slow)"
    )
    ns = p.parse_args()
    # The service's own compaction while the points are logged (its
    # write-through is what chart_fresh measures); none after the restart:
    # the row layout's reads must not see their rows compacted back into blocks.
    with (
        bench_stack() as (_stack, info, db),
        service(info, db, STEPLOG_COMPACT_INTERVAL_S="1") as svc,
    ):
        from steplog import Experiment, Run

        run = Experiment("read", url=svc.address).start_logging()
        log = run.log
        t = time.perf_counter()
        for i in range(ns.long):
            log("long", value(i), step=i)
        names = [f"chart_{j:03d}" for j in range(ns.series)]
        for i in range(ns.points):
            v = value(i)
            for name in names:
                log(name, v, step=i)
        if not run.flush(1800):
            raise SystemExit("the points were not all acknowledged")
        load_s = time.perf_counter() - t
        blocks = asyncio.run(compacted(db))  # by the service's sweep

        rate = (ns.long + ns.series * ns.points) / load_s

        # The first read of all: the chart, served by the service that took
        # the points (and compacted them), to a client of its own as a
        # dashboard's (the logging client's get_charts first waits for its
        # writer's flush).
        viewer = Run.get(run.id, url=svc.address)

        def chart() -> list[dict[str, Any]]:
            got = viewer.get_charts(names, max_points=BUCKETS)
            return [got[n] for n in names]

        fresh_ms, lines = timed(chart, 1)
        check_chart(lines)
        # Restarted on the same address: its cache empty, no compaction.
        svc.stop()
        svc.env["STEPLOG_COMPACT_INTERVAL_S"] = "0"
        svc.start()
        # Read through a client of its own (a new connection, opened here by
        # Run.get: the logging client's channel is still backing off).
        reader = Run.get(run.id, url=svc.address)
        first = reads(reader, db, names, ns, fresh_ms)
        print(
            f"READ {first} load_points_per_s={rate:.0f} blocks={blocks} layout=blocks"
            f" cpus={os.cpu_count()}",
            flush=True,
        )
        # The row layout as the reference, in the same run: the same points
        # moved into scalar_rows (one row each, what scalar_points was before
        # migration 010), the blocks emptied, every read again.
        if not ns.skip_rows:
            asyncio.run(to_rows(db))
            second = reads(reader, db, names, ns)
            print(
                f"READ {second} load_points_per_s={rate:.0f} layout=row_per_point"
                f" cpus={os.cpu_count()}",
                flush=True,
            )
        run.complete()


async def compacted(url: str) -> int:
    """Wait until the service's sweep left nothing to compact
    (settle_compaction, then VACUUM); the number of blocks."""
    if not await settle_compaction(url, timeout_s=1800.0):
        raise SystemExit("the service's compaction did not finish")
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM scalar_blocks"))
    finally:
        await conn.close()


def check_chart(lines: list[dict[str, Any]]) -> list[int]:
    """A chart's answers downsampled within the bound; their point counts."""
    points = [len(line["values"]) for line in lines]
    if not all(line["downsampled"] for line in lines) or max(points) > BUCKETS:
        raise SystemExit(f"chart: not downsampled within {BUCKETS}: {max(points)} points")
    return points


async def to_rows(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO scalar_rows (time, series_id, step, value, hidden)"
                " SELECT time, series_id, step, value, hidden FROM scalar_points"
            )
            await conn.execute("TRUNCATE scalar_blocks")
        await conn.execute("ANALYZE scalar_rows")
    finally:
        await conn.close()


def reads(
    run: Any, db: str, names: list[str], ns: argparse.Namespace, fresh_ms: float | None = None
) -> str:
    """Every read of the module docstring, timed; the READ line's figures
    (with chart_fresh_ms when given)."""
    full_cold_ms, full = timed(lambda: run.get_series("long"), 1)
    full_ms, full = timed(lambda: run.get_series("long"), ns.repeat)
    if len(full["values"]) != ns.long:
        raise SystemExit(f"get_series returned {len(full['values'])} points of {ns.long}")
    gm_ms, gm = timed(lambda: run.get_metrics("long")["long"], ns.repeat)
    if len(gm) != ns.long:
        raise SystemExit(f"get_metrics returned {len(gm)} values of {ns.long}")
    one_ms, one = timed(lambda: run.get_series("long", max_points=BUCKETS), ns.repeat)

    def chart() -> list[dict[str, Any]]:
        got = run.get_charts(names, max_points=BUCKETS)
        return [got[n] for n in names]

    chart_cold_ms, lines = timed(chart, 1)
    chart_ms, lines = timed(chart, ns.repeat)
    loop_ms, looped = timed(lambda: [run.get_series(n, max_points=BUCKETS) for n in names], 1)
    if [list(x["steps"]) for x in lines] != [x["steps"] for x in looped]:
        raise SystemExit("chart: get_charts and get_series disagree")
    points = check_chart(lines)
    specials = [kept(line["values"]) for line in lines]
    sql_full_ms, sql_chart_ms = asyncio.run(sql_reads(db, run.id, "long", names, ns.repeat))
    return (
        f"full_ms={full_ms:.0f} full_cold_ms={full_cold_ms:.0f} get_metrics_ms={gm_ms:.0f}"
        f" downsampled_one_ms={one_ms:.1f} chart_ms={chart_ms:.0f}"
        f" chart_cold_ms={chart_cold_ms:.0f}"
        + ("" if fresh_ms is None else f" chart_fresh_ms={fresh_ms:.0f}")
        + f" chart_loop_ms={loop_ms:.0f}"
        f" sql_full_ms={sql_full_ms:.0f} sql_chart_ms={sql_chart_ms:.0f}"
        f" full_vs_sql={full_ms / sql_full_ms:.3g} chart_vs_sql={chart_ms / sql_chart_ms:.3g}"
        f" long_points={ns.long} chart_series={ns.series} points_per_series={ns.points}"
        f" buckets={BUCKETS} chart_points_returned={sum(points)}"
        f" one_points_returned={len(one['values'])}"
        f" nan_kept={all(s[0] for s in specials)} inf_kept={all(s[1] for s in specials)}"
        f" neg_inf_kept={all(s[2] for s in specials)} repeat={ns.repeat}"
        f" load1={os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
