"""W1 "scalar firehose": W writer processes, each with its own run, each
logging K metric names x S steps through the public client API in a plain
loop, timed until every point is acknowledged; the stored count verified by
SQL. In the same invocation, the ceiling: the same number of points written
straight into the same hypertable with asyncpg binary COPY from 2 connections.

    python -m bench.w1_firehose [--writers 4] [--names 50] [--steps 25000]

Prints `W1 points_per_s=... ceiling_points_per_s=... ratio=...` and the rate
over time (first fifth vs last fifth of the run), from the service's
accepted-points counter scraped once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import threading
import time
from datetime import UTC, datetime

import asyncpg

from bench.common import bench_stack, scrape, service, sql


def _writer(
    url: str, experiment: str, names: int, steps: int, ready: mp.Barrier, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    from steplog import Experiment

    run = Experiment(experiment, url=url).start_logging()
    keys = [f"metric_{i:02d}" for i in range(names)]
    ready.wait()
    start = time.perf_counter()
    log = run.log
    for step in range(steps):
        v = 1.0 / (step + 1)
        for k in keys:
            log(k, v, step=step)
    logged = time.perf_counter() - start
    ok = run.flush(600)
    acked = time.perf_counter() - start
    out.put((run.id, logged, acked, ok))
    run.complete()


async def _ceiling(url: str, total: int, connections: int = 2) -> float:
    """Binary COPY of `total` rows into scalar_points from 2 connections."""
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    now = datetime.now(UTC)
    per = total // connections
    chunk = 50_000
    records = [(now, 999_000_000 + i % 50, i, 1.0 / (i + 1), False) for i in range(chunk)]
    cols = ["time", "series_id", "step", "value", "hidden"]

    async def one(conn: asyncpg.Connection) -> None:
        done = 0
        while done < per:
            n = min(chunk, per - done)
            async with conn.transaction():
                await conn.copy_records_to_table("scalar_points", records=records[:n], columns=cols)
            done += n

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        await c.execute("DELETE FROM scalar_points WHERE series_id >= 999000000")
        await c.close()
    return per * connections / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--steps", type=int, default=25_000)
    ns = p.parse_args()
    total = ns.writers * ns.names * ns.steps
    with bench_stack() as (_stack, info, db), service(info, db) as svc:
        ctx = mp.get_context("spawn")
        ready = ctx.Barrier(ns.writers + 1)
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [
            ctx.Process(target=_writer, args=(svc.address, "w1", ns.names, ns.steps, ready, out))
            for _ in range(ns.writers)
        ]
        for pr in procs:
            pr.start()
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sampler() -> None:
            while not stop.wait(1.0):
                try:
                    v = scrape(svc.metrics_port, "steplog_ingest_points_total")
                except OSError:
                    continue
                samples.append((time.perf_counter(), v))

        ready.wait()
        t0 = time.perf_counter()
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        results = [out.get(timeout=1200) for _ in procs]
        elapsed = time.perf_counter() - t0
        stop.set()
        for pr in procs:
            pr.join()
        stored = int(sql(db, "SELECT count(*) FROM scalar_points"))  # type: ignore[call-overload]
        rate = total / elapsed
        ceiling = asyncio.run(_ceiling(db, total))
    log_rate = total / max(r[1] for r in results)
    # Rate over time: points accepted per second in the first and last fifth.
    trend = ""
    if len(samples) >= 10:
        fifth = max(1, len(samples) // 5)
        first = (samples[fifth][1] - samples[0][1]) / (samples[fifth][0] - samples[0][0])
        last = (samples[-1][1] - samples[-1 - fifth][1]) / (samples[-1][0] - samples[-1 - fifth][0])
        trend = (
            f" first_fifth_per_s={first:.0f} last_fifth_per_s={last:.0f}"
            f" change={last / first - 1:+.0%}"
        )
    print(
        f"W1 points_per_s={rate:.0f} ceiling_points_per_s={ceiling:.0f} ratio={rate / ceiling:.2f}"
        f" points={total} stored={stored} all_acked={all(r[3] for r in results)}"
        f" log_loop_points_per_s={log_rate:.0f}{trend} cpus={os.cpu_count()}"
    )
    if stored != total:
        raise SystemExit(f"stored {stored} != logged {total}")


if __name__ == "__main__":
    main()
