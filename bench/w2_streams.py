"""W2 "many writers": one run, R ranks (default 200), each rank a writer of
its own (`run.new_stream`: its own writer id, sequence, stream and buffers,
its series labelled `rank=<n>`) logging 10 series x S steps, all at once; in the
same invocation and on the same service, W1 (bench/w1_firehose.py's
`firehose`, the same number of points) as the reference.

    python -m bench.w2_streams [--ranks 200] [--series 10] [--steps 2500] [--processes 4]

A 200-GPU job has 200 processes, one per rank. This machine has 2 cores, so
the ranks run in a pool of P spawned processes (default 4, as many as W1's
writer processes), R/P ranks in each: one training thread per process logs
every rank's step s, rank after rank (data-parallel ranks move in lock step),
with `run.log(name, value, step=s)`, while each rank's writer sends its
batches on its own stream. Each process attaches to the one run as a rank of
a distributed job does (`Run.get`) and takes a handle per rank with
`run.new_stream(labels={"rank": r})`: its own writer (writer id, sequence,
stream, buffers) on the process's gRPC channel, all of a process's streams
driven by one background thread.

Prints

    STORAGE_W2 bytes_per_point=... points_per_block=... compacted=True
    W2 points_per_s=... ratio_to_w1=... ack_p99_ms=... ack_p50_ms=...

timed from the common start until every rank has flushed, the stored count
by SQL; `client_cpu_us_per_point`: the CPU the rank processes spent from the
start until their flush returned (training loop, writers, the monitor), per
point; `batches`: batches acknowledged, all ranks; `writer_threads`: the
client's writer threads (`steplog-writer*`) alive at the end, all processes.
Ack latency: a monitor thread in each process reads the acknowledged-points
counter (`run.writer_stats().points_acked`) of every `--latency-every`-th
rank of the process (default 10: 5 of its 50, 20 of the 200 ranks; the
ranks are alike, all logging in lock step) every `--poll-ms` (default 20
ms). Each `writer_stats()` is a snapshot taken under its stream's lock:
polling all 200 ranks every 20 ms (10,000 snapshots a second) was a
visible share of the rank processes' CPU in an ad hoc profile, work W1,
which has no monitor, does not do. A point's latency is from the moment
the training thread logged the step it belongs to until the first poll
that finds its rank's acknowledged count at or past it (so it is rounded up
to the poll interval), over every step of every sampled rank.
scalar_points is emptied between W1 and W2 (neither pays for the other's
rows). STORAGE_W2 is W2's size on disk once the service's
compaction has nothing left to do (`settle_compaction`, then VACUUM, as
bench.w1_firehose measures W1's), measured after the W2 line's clock stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import threading
import time
from typing import Any

import asyncpg
import numpy as np

from bench.common import CpuMark, bench_stack, postmaster_pid, service, settle_compaction
from bench.w1_firehose import firehose, fresh_table, storage, stored_points

POLL_MS = 20
LATENCY_EVERY = 10


def _ranks(
    url: str,
    run_id: str,
    ranks: list[int],
    series: int,
    steps: int,
    poll_s: float,
    every: int,
    ready: Any,
    out: Any,
) -> None:
    from steplog import Run

    run = Run.get(run_id, url=url)
    runs = [run.new_stream(labels={"rank": str(r)}) for r in ranks]
    names = [f"metric_{i:02d}" for i in range(series)]
    logged_at = np.zeros((steps, len(runs)))  # perf_counter after rank j logged step s
    polls: list[tuple[float, list[int]]] = []
    done = threading.Event()

    sampled = runs[::every]

    def monitor() -> None:
        while not done.is_set():
            acked = [r.writer_stats().points_acked for r in sampled]
            polls.append((time.perf_counter(), acked))
            time.sleep(poll_s)

    logs = [r.log for r in runs]
    # writer_stats() starts each writer, as W1's do; the monitor's base is
    # its sampled ranks' counts.
    base = [r.writer_stats().points_acked for r in runs][::every]
    th = threading.Thread(target=monitor, daemon=True)
    th.start()
    ready.wait()
    start = time.perf_counter()
    cpu0 = time.process_time()
    clock = time.perf_counter
    for step in range(steps):
        v = 1.0 / (step + 1)
        for j, log in enumerate(logs):
            for k in names:
                log(k, v, step=step)
            logged_at[step, j] = clock()
    logged = clock() - start
    ok = all(r.flush(600) for r in runs)
    acked = clock() - start
    cpu = time.process_time() - cpu0
    time.sleep(2 * poll_s)
    done.set()
    th.join()
    # Latency of each (step, rank): first poll whose acked count covers it.
    times = np.array([t for t, _ in polls])
    counts = np.array([a for _, a in polls]) - np.array(base)
    lat: list[np.ndarray] = []
    need = (np.arange(steps) + 1) * series
    for j in range(len(sampled)):
        idx = np.searchsorted(counts[:, j], need, side="left")  # counts never decrease
        idx = np.minimum(idx, len(times) - 1)
        lat.append(times[idx] - logged_at[:, j * every])
    stats = [r.writer_stats() for r in runs]
    out.put(
        (
            logged,
            acked,
            ok,
            np.concatenate(lat),
            sum(s.rejected + s.dropped + s.refused for s in stats),
            len({s.writer_id for s in stats}),
            cpu,
            sum(s.batches_acked for s in stats),
            len([t for t in threading.enumerate() if t.name.startswith("steplog-writer")]),
        )
    )


def many_writers(
    address: str,
    run_id: str,
    ranks: int,
    series: int,
    steps: int,
    processes: int,
    poll_s: float = POLL_MS / 1e3,
    pids: tuple[int, int] | None = None,
    every: int = LATENCY_EVERY,
) -> tuple[float, list[Any], str]:
    """Seconds from the common start until every rank has flushed, each
    process's result, and with `pids` (the service's, the postmaster's) the
    service's and PostgreSQL's CPU over that window (CpuMark.per_point)."""
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(processes + 1)
    out: Any = ctx.Queue()
    groups = [list(range(ranks))[i::processes] for i in range(processes)]
    procs = [
        ctx.Process(
            target=_ranks,
            args=(address, run_id, g, series, steps, poll_s, every, ready, out),
        )
        for g in groups
    ]
    for pr in procs:
        pr.start()
    mark = CpuMark.now(*pids) if pids else None
    ready.wait(600)
    t0 = time.perf_counter()
    results = [out.get(timeout=1800) for _ in procs]
    elapsed = time.perf_counter() - t0
    server_cpu = "" if mark is None else mark.per_point(ranks * series * steps)
    for pr in procs:
        pr.join()
    return elapsed, results, server_cpu


async def _count_writers(url: str, run_id: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(DISTINCT labels->>'rank') FROM series WHERE run_id = $1", run_id
            )
        )
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=200)
    p.add_argument("--series", type=int, default=10)
    p.add_argument("--steps", type=int, default=2_500)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--w1-writers", type=int, default=4)
    p.add_argument("--w1-names", type=int, default=50)
    p.add_argument(
        "--poll-ms",
        type=float,
        default=POLL_MS,
        help="the ack monitor's interval (latency resolution)",
    )
    p.add_argument(
        "--latency-every",
        type=int,
        default=LATENCY_EVERY,
        help="the monitor reads every n-th rank of a process (1: all of them)",
    )
    ns = p.parse_args()
    total = ns.ranks * ns.series * ns.steps
    w1_steps = max(1, total // (ns.w1_writers * ns.w1_names))
    with bench_stack() as (stack, info, db), service(info, db) as svc:
        from steplog import Experiment

        assert svc.proc is not None
        pids = (svc.proc.pid, postmaster_pid(stack))
        w1 = firehose(svc, db, ns.w1_writers, ns.w1_names, w1_steps, pids[1])
        if w1.stored != w1.points:
            raise SystemExit(f"W1 stored {w1.stored} != logged {w1.points}")
        asyncio.run(fresh_table(db))
        run = Experiment("w2", url=svc.address).start_logging()
        elapsed, results, server_cpu = many_writers(
            svc.address,
            run.id,
            ns.ranks,
            ns.series,
            ns.steps,
            ns.processes,
            ns.poll_ms / 1e3,
            pids,
            max(1, ns.latency_every),
        )
        run.complete()
        stored = asyncio.run(stored_points(db, [run.id]))
        ranks_stored = asyncio.run(_count_writers(db, run.id))
        # W2's blocks are all there is in scalar_blocks (emptied after W1):
        # what many small writers' commits cost on disk, once compacted.
        compacted = asyncio.run(settle_compaction(db))
        line = asyncio.run(storage(db, stored, layout="blocks_w2")).replace("STORAGE", "STORAGE_W2")
        print(f"{line} compacted={compacted}", flush=True)
    rate = total / elapsed
    lat = np.concatenate([r[3] for r in results]) * 1e3
    print(
        f"W2 points_per_s={rate:.0f} ratio_to_w1={rate / w1.rate:.2f}"
        f" ack_p99_ms={np.percentile(lat, 99):.0f} ack_p50_ms={np.percentile(lat, 50):.0f}"
        f" ack_max_ms={lat.max():.0f} w1_points_per_s={w1.rate:.0f} w1_points={w1.points}"
        f" ranks={ns.ranks} writers={sum(r[5] for r in results)} ranks_stored={ranks_stored}"
        f" series_per_rank={ns.series} points={total} stored={stored}"
        f" all_acked={all(r[2] for r in results)} not_stored={sum(r[4] for r in results)}"
        f" processes={ns.processes} loops_points_per_s={total / max(r[0] for r in results):.0f}"
        f" client_cpu_us_per_point={sum(r[6] for r in results) / total * 1e6:.2f}"
        f" {server_cpu} batches={sum(r[7] for r in results)}"
        f" writer_threads={sum(r[8] for r in results)}"
        f" poll_ms={ns.poll_ms:g} latency_every={max(1, ns.latency_every)}"
        f" w1_{w1.cpu.replace(' ', ' w1_')} cpus={os.cpu_count()}",
        flush=True,
    )
    if stored != total:
        raise SystemExit(f"W2 stored {stored} != logged {total}")


if __name__ == "__main__":
    main()
