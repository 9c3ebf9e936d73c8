"""BULK: numeric points logged from arrays with `run.log_batch` (no Python
object per point), one process, one run, timed from the first call until
every point is acknowledged (`run.flush()`), the stored count checked by SQL.

    python -m bench.bulk_log [--series 20] [--steps 250000] [--chunk 10000]

Each call logs `chunk` steps of every series at once
(`run.log_batch({name: values, ...}, steps=steps)`), as a training loop that
keeps its metrics in arrays would. Prints

    BULK points_per_s=... points=... stored=... calls=... call_points_per_s=...

`call_points_per_s` is the logging calls alone (points over the time the
loop spent in `log_batch`); the CPU seconds (user + system, from /proc) of
this process alone (`client_cpu_s`: the service is its child, counted
apart), the service's process tree and PostgreSQL (the whole bench server,
shared with any other database on it), the backends serving this run's
database alone (`pg_db_cpu_s`: the service's connections, found by the
database name in their process title) over the timed part, and the 1-minute
load average at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import asyncpg
import numpy as np

from bench.common import (
    bench_stack,
    copy_ceiling,
    cpu_seconds,
    database_cpu,
    postmaster_pid,
    service,
    sql,
)


def blocks_ceiling(
    address: str, db: str, names: list[str], chunks: list[tuple[Any, dict[str, Any]]]
) -> float:
    """The fastest known way to store the same points (the reference of the
    same run): the blocks the service would write for them (one COPY per
    call's worth: every series' steps of that call, cut into blocks of at
    most MAX_BLOCK_POINTS), encoded before the clock starts, sent with
    binary copy_to_table into scalar_blocks, for the series of another run,
    from 1 and 2 connections; points/s of the better."""
    from ingest.store.blocks import (
        BLOCK_COLUMNS,
        MAX_BLOCK_POINTS,
        Block,
        encode_blocks_copy,
        to_pg_us,
    )
    from steplog import Experiment

    ref = Experiment("bulk-ceiling", url=address).start_logging()
    for name in names:
        ref.log(name, 0.0, step=0)  # creates the series
    ref.flush(60)
    ref.complete()
    ids = asyncio.run(series_ids(db, ref.id, names))
    now = time.time()
    payloads, points = [], 0
    for steps, metrics in chunks:
        blocks = []
        for name, values in metrics.items():
            times = to_pg_us(np.full(steps.size, now))
            for k in range(0, steps.size, MAX_BLOCK_POINTS):
                part = slice(k, k + MAX_BLOCK_POINTS)
                blocks.append(Block(ids[name], times[part], steps[part] + 1, values[part]))
            points += steps.size
        payloads.append(encode_blocks_copy(blocks)[0])
    best = min(
        asyncio.run(copy_ceiling(db, "scalar_blocks", BLOCK_COLUMNS, payloads, c)) for c in (1, 2)
    )
    return points / best


async def series_ids(db: str, run_id: str, names: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch(
            "SELECT name, series_id FROM series WHERE run_id = $1 AND name = ANY($2::text[])",
            run_id,
            names,
        )
    finally:
        await conn.close()
    return {r["name"]: int(r["series_id"]) for r in rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--series", type=int, default=20)
    p.add_argument("--steps", type=int, default=250_000)
    p.add_argument("--chunk", type=int, default=10_000)
    ns = p.parse_args()
    total = ns.series * ns.steps
    names = [f"metric_{i:02d}" for i in range(ns.series)]
    rng = np.random.default_rng(7)
    # The arrays exist before the clock starts: what is timed is logging them.
    chunks = []
    for s in range(0, ns.steps, ns.chunk):
        steps = np.arange(s, min(ns.steps, s + ns.chunk), dtype=np.int64)
        chunks.append((steps, {k: rng.standard_normal(steps.size) for k in names}))
    with bench_stack() as (stack, info, db), service(info, db) as svc:
        from steplog import Experiment

        run = Experiment("bulk", url=svc.address).start_logging()
        run.writer_stats()  # the writer started, as W1's writers are
        in_calls = 0.0
        assert svc.proc is not None
        pg = postmaster_pid(stack)
        dbname = db.rsplit("/", 1)[-1].split("?")[0]
        cpu0 = (time.process_time(), cpu_seconds(svc.proc.pid), cpu_seconds(pg))
        db0 = database_cpu(dbname)
        start = time.perf_counter()
        for steps, metrics in chunks:
            t = time.perf_counter()
            run.log_batch(metrics, steps=steps)
            in_calls += time.perf_counter() - t
        ok = run.flush(600)
        elapsed = time.perf_counter() - start
        cpu1 = (time.process_time(), cpu_seconds(svc.proc.pid), cpu_seconds(pg))
        db1 = database_cpu(dbname)
        run.complete()
        ceiling = blocks_ceiling(svc.address, db, names, chunks)
        stored = int(
            sql(  # type: ignore[call-overload]
                db,
                "SELECT count(*) FROM scalar_points p JOIN series s USING (series_id)"
                f" WHERE s.run_id = '{run.id}'",
            )
        )
    if stored != total:
        raise SystemExit(f"stored {stored} != logged {total}")
    rate = total / elapsed
    print(
        f"BULK points_per_s={rate:.0f} ceiling_points_per_s={ceiling:.0f}"
        f" ratio={rate / ceiling:.2f} points={total} stored={stored}"
        f" flushed={ok} calls={len(chunks)} call_points_per_s={total / in_calls:.0f}"
        f" series={ns.series} chunk={ns.chunk} elapsed_s={elapsed:.2f}"
        f" client_cpu_s={cpu1[0] - cpu0[0]:.2f} service_cpu_s={cpu1[1] - cpu0[1]:.2f}"
        f" postgres_cpu_s={cpu1[2] - cpu0[2]:.2f} pg_db_cpu_s={db1 - db0:.2f} cpus={os.cpu_count()}"
        f" load1={os.getloadavg()[0]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
