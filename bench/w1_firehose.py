"""W1 "scalar firehose": W writer processes, each with its own run, each
logging K metric names x S steps through the public client API in a plain
loop, timed until every point is acknowledged; the stored count verified by
SQL. In the same invocation, after the service has stopped, the ceiling: the
same rows, encoded before the clock starts with the service's own encoder
(`ingest.store.copy.encode_scalar_copy`), sent straight into the row layout's
empty hypertable (`scalar_rows`: one row per point, what `scalar_points` was
before the block layout of migration 010) with asyncpg's binary
`copy_to_table` from 1, 2 and 4 connections (each printed); the best of the
three is the ceiling.

    python -m bench.w1_firehose [--writers 4] [--names 50] [--steps 25000]

Prints `STORAGE bytes_per_point=... layout=blocks` (W1's data as the service
stored it) and `STORAGE ... layout=row_per_point` (the ceiling's rows, the
same points), `W1 points_per_s=... ceiling_points_per_s=... ratio=...` and the rate
over time (first fifth vs last fifth of the run), from the service's
accepted-points counter scraped every 0.25 s. STORAGE is TimescaleDB's
hypertable_detailed_size (table, indexes, TOAST) per stored point.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

from bench.common import (
    CpuMark,
    ServiceProcess,
    bench_stack,
    copy_ceiling,
    postmaster_pid,
    scrape,
    service,
    settle_compaction,
    sql,
)
from ingest.store.copy import SCALAR_COLUMNS, encode_scalar_copy

# How often the rate over time is sampled (the service's accepted-points counter):
# a 20M-point run of about 10 s still gives the fifths enough samples.
SAMPLE_S = 0.25


def _writer(url: str, experiment: str, names: int, steps: int, ready: Any, out: Any) -> None:
    from steplog import Experiment

    run = Experiment(experiment, url=url).start_logging()
    keys = [f"metric_{i:02d}" for i in range(names)]
    ready.wait()
    start = time.perf_counter()
    cpu0 = time.process_time()
    log = run.log
    for step in range(steps):
        v = 1.0 / (step + 1)
        for k in keys:
            log(k, v, step=step)
    logged = time.perf_counter() - start
    ok = run.flush(600)
    acked = time.perf_counter() - start
    out.put((run.id, logged, acked, ok, time.process_time() - cpu0))
    run.complete()


CEILING_CONNECTIONS = (1, 2, 4)
COPY_ROWS = 50_000  # rows per COPY (one transaction each) in the ceiling


def ceiling_payloads(writers: int, names: int, steps: int) -> list[bytes]:
    """W1's rows (writers x names series, `steps` steps each, now as their
    time) as binary COPY payloads for scalar_points, built with the encoder
    the service uses (`encode_scalar_copy`), each series' rows contiguous as
    in the service's COPY; about COPY_ROWS rows per payload."""
    series = np.arange(writers * names, dtype=np.int64) + 999_000_000
    per = max(1, COPY_ROWS // series.size)  # steps per payload
    now = time.time()
    out = []
    for s in range(0, steps, per):
        step = np.arange(s, min(steps, s + per), dtype=np.int64)
        n = series.size * step.size
        out.append(
            encode_scalar_copy(
                np.full(n, now),
                np.repeat(series, step.size),
                np.tile(step, series.size),
                np.tile(1.0 / (step + 1), series.size),
            )
        )
    return out


async def fresh_table(url: str) -> None:
    """An empty scalar_points and a fresh checkpoint, as the service's run
    started: no attempt pays for another's rows or checkpoint."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE scalar_rows, scalar_blocks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def ceiling(url: str, payloads: list[bytes], total: int) -> dict[int, float]:
    """points/s of the pre-encoded payloads sent with binary copy_to_table
    into the row table from 1, 2 and 4 connections (each attempt on an empty
    table), checked by SQL; after the last attempt, the row layout's STORAGE
    line (the same points, one row each)."""
    rates: dict[int, float] = {}
    for n in CEILING_CONNECTIONS:
        asyncio.run(fresh_table(url))
        elapsed = asyncio.run(copy_ceiling(url, "scalar_rows", SCALAR_COLUMNS, payloads, n))
        stored = int(sql(url, "SELECT count(*) FROM scalar_rows"))  # type: ignore[call-overload]
        if stored != total:
            raise SystemExit(f"ceiling stored {stored} rows of {total}")
        rates[n] = total / elapsed
        print(
            f"  ceiling connections={n} points_per_s={rates[n]:.0f} stored={stored}",
            flush=True,
        )
    print(asyncio.run(storage(url, total, "scalar_rows", "row_per_point")), flush=True)
    asyncio.run(fresh_table(url))
    return rates


@dataclass
class Firehose:
    """What one W1 workload through the service measured."""

    points: int
    elapsed: float  # from the writers' start until every point is acknowledged
    stored: int  # rows of these runs in scalar_points, by SQL
    # (run id, loop s, acked s, flushed, the writer process's CPU s until flushed)
    results: list[tuple[str, float, float, bool, float]]
    samples: list[tuple[float, float]]  # (perf_counter, accepted-points counter)
    server_cpu: str  # CpuMark.per_point over the window, "" without PostgreSQL's pid

    @property
    def cpu(self) -> str:
        """Where the window's CPU went, per point: the writer processes (the
        training loop and the client's background writer, from their start
        until their flush returned), the service, PostgreSQL."""
        client = sum(r[4] for r in self.results) / self.points * 1e6
        return f"client_cpu_us_per_point={client:.2f} {self.server_cpu}".rstrip()

    @property
    def rate(self) -> float:
        return self.points / self.elapsed


async def stored_points(url: str, run_ids: list[str]) -> int:
    """Rows of scalar_points that belong to these runs (by SQL)."""
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM scalar_points p JOIN series s USING (series_id)"
                " WHERE s.run_id = ANY($1::text[])",
                run_ids,
            )
        )
    finally:
        await conn.close()


def firehose(
    svc: ServiceProcess,
    db: str,
    writers: int,
    names: int,
    steps: int,
    postgres_pid: int | None = None,
) -> Firehose:
    """W1 through the running service `svc` (database `db`): `writers`
    spawned processes, each its own run logging `names` x `steps` points in a
    plain `run.log` loop, timed from their common start until each has
    flushed; the stored count checked by SQL. With `postgres_pid` (the
    stack's postmaster), the service's and PostgreSQL's CPU over that window
    too (Firehose.cpu)."""
    total = writers * names * steps
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(writers + 1)
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(svc.address, "w1", names, steps, ready, out))
        for _ in range(writers)
    ]
    for pr in procs:
        pr.start()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(SAMPLE_S):
            try:
                v = scrape(svc.metrics_port, "steplog_ingest_points_total")
            except OSError:
                continue
            samples.append((time.perf_counter(), v))

    assert svc.proc is not None
    mark = CpuMark.now(svc.proc.pid, postgres_pid) if postgres_pid else None
    ready.wait()
    t0 = time.perf_counter()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    results = [out.get(timeout=1200) for _ in procs]
    elapsed = time.perf_counter() - t0
    server_cpu = "" if mark is None else mark.per_point(total)
    stop.set()
    for pr in procs:
        pr.join()
    stored = asyncio.run(stored_points(db, [r[0] for r in results]))
    return Firehose(total, elapsed, stored, results, samples, server_cpu)


async def storage(
    url: str, points: int, table_name: str = "scalar_blocks", layout: str = "blocks"
) -> str:
    """The STORAGE line: a points hypertable on disk (TimescaleDB's
    hypertable_detailed_size: every chunk's table, indexes and TOAST) per
    stored point; for the blocks, also how many blocks and points per block."""
    conn = await asyncpg.connect(url)
    try:
        # The block layout's points are blocks and (for series with few points
        # in a commit, until compaction moves them) rows: both are counted.
        tables = [table_name, "scalar_rows"] if table_name == "scalar_blocks" else [table_name]
        table = index = toast = total = chunks = 0
        for name in tables:
            row = await conn.fetchrow(
                "SELECT table_bytes, index_bytes, toast_bytes, total_bytes"
                f" FROM hypertable_detailed_size('{name}')"
            )
            assert row is not None
            table, index, toast, total = (
                a + int(row[k] or 0) for k, a in enumerate((table, index, toast, total))
            )
            chunks += int(await conn.fetchval(f"SELECT count(*) FROM show_chunks('{name}')"))
        blocks = ""
        if table_name == "scalar_blocks":
            n = int(await conn.fetchval("SELECT count(*) FROM scalar_blocks"))
            rows = int(await conn.fetchval("SELECT count(*) FROM scalar_rows"))
            blocks = f" blocks={n} points_per_block={(points - rows) / max(n, 1):.0f} rows={rows}"
    finally:
        await conn.close()
    return (
        f"STORAGE bytes_per_point={total / points:.1f} table_bytes_per_point={table / points:.1f}"
        f" index_bytes_per_point={index / points:.1f} toast_bytes_per_point={toast / points:.1f}"
        f" total_bytes={total} points={points} chunks={chunks}{blocks} layout={layout}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--steps", type=int, default=25_000)
    ns = p.parse_args()
    total = ns.writers * ns.names * ns.steps
    with bench_stack() as (stack, info, db), service(info, db) as svc:
        w1 = firehose(svc, db, ns.writers, ns.names, ns.steps, postmaster_pid(stack))
        if w1.stored != total:
            raise SystemExit(f"stored {w1.stored} != logged {total}")
        # W1's data is all there is in scalar_blocks (and scalar_rows): its
        # size on disk per point, once the service's compaction is done.
        compacted = asyncio.run(settle_compaction(db))
        svc.stop()
        line = asyncio.run(storage(db, w1.stored))
        print(f"{line} compacted={compacted}", flush=True)
        ceilings = ceiling(db, ceiling_payloads(ns.writers, ns.names, ns.steps), total)
    best = max(ceilings, key=lambda n: ceilings[n])
    ceil = ceilings[best]
    results, samples, rate, stored = w1.results, w1.samples, w1.rate, w1.stored
    # Each loop's own rate (its points over its own logging time), and all
    # loops together (every point over the slowest loop's time).
    loops = sorted(ns.names * ns.steps / r[1] for r in results)
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
        f"W1 points_per_s={rate:.0f} ceiling_points_per_s={ceil:.0f} ratio={rate / ceil:.2f}"
        f" ceiling_connections={best} points={total} stored={stored}"
        f" all_acked={all(r[3] for r in results)}"
        f" log_loops_points_per_s={log_rate:.0f}"
        f" each_loop_points_per_s={','.join(f'{x:.0f}' for x in loops)}{trend}"
        f" {w1.cpu} cpus={os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
