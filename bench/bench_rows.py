"""Rows: `run.log_row` with 10 columns in a plain loop, timed until every row
is acknowledged, against the same-run ceiling: the same rows, already encoded
(before the clock starts), binary-COPYed by asyncpg into the same table
(table_rows) from 1, 2 and 4 connections (each printed, each on an empty
table); the best of them is the ceiling. The service writes one writer's
rows on one connection (its pipeline worker: batches commit in order, each
with the writer's high-water mark), so the counts above 1 are a way to do
the same work that the service's path cannot take.

    python -m bench.bench_rows [--rows 1000000] [--repeat 3] [--numeric]

Uses the shared bench stack (.steplog/bench, a fresh database) and starts the
service as a subprocess. Prints one line per repetition and the medians:
`ROWS rows_per_s=... ceiling_rows_per_s=... ratio=...`, and where a row's
cost goes, as CPU time per row measured from /proc over the log_row phase
(so other work on the machine does not count): `client_cpu_us` (this
process: the training loop and the client's sender), `service_cpu_us` (the
service and its children), `postgres_cpu_us` (the stack's PostgreSQL, every
backend), and `loop_us` (wall time of the training loop alone, per call).
Split further: `train_cpu_us` (the training thread alone: the loop and
`log_row`), `writer_cpu_us` (the client's writer thread: encoding rows,
cutting batches), `pg_own_cpu_us` (the PostgreSQL backends connected to
this run's database, which other work on the stack does not touch) and
`ceiling_pg_cpu_us` (the same for the best ceiling's COPY, its
connections sampled every 20 ms: their CPU per row into the same table).
`ceiling_connections` is the count that gave the best ceiling, and
`ceilings_1`, `ceilings_2`, `ceilings_4` the medians of each count.

Then, in each repetition, the same rows through `run.log_table` (Azure's
columns-as-lists shape), --table-chunk rows a call (1,000; 0: not run),
timed until acknowledged and counted by SQL, against the same ceiling:
`ROWS_TABLE rows_per_s=... ratio=... loop_us=...`, what a loop that
collects its rows and logs them as a table reaches, and the wall time a
row of its log_table calls alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
import uuid
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
from ingest.core.tables import BOOL, DOUBLE, INT64, STRING
from ingest.store.copy import copy_payload
from ingest.store.tables import TABLE_ROW_COLUMNS, Cells, encode_table_rows

COPY_ROWS = 10_000  # rows per COPY (and commit) in the ceiling
CEILING_CONNECTIONS = (1, 2, 4)
CEILING_SERIES_ID = 900_000_000  # the ceiling's rows' series (no such series exists)
_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    if native_id is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class DatabaseCpu:
    """Samples database_cpu(dbname) every 20 ms on a thread: the CPU of a
    connection that closes when its work ends (the ceiling's) is its last
    sample, at most 20 ms short."""

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.first = self.last = database_cpu(dbname)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.last = max(self.last, database_cpu(self.dbname))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.last - self.first


def writer_thread() -> int | None:
    """The native id of the client's writer thread (steplog-writer)."""
    from steplog._writer.sender import THREAD_NAME

    for t in threading.enumerate():
        if t.name == THREAD_NAME:
            return t.native_id
    return None


def columns_of(n: int, numeric: bool) -> dict[str, list[Any]]:
    """The 10 columns of n rows, as a training loop computes them."""
    rng = np.random.default_rng(0)
    loss = rng.random(n)
    i = np.arange(n)
    cols: dict[str, list[Any]] = {
        "epoch": (i // 1000).tolist(),
        "batch": (i % 1000).tolist(),
        "loss": loss.tolist(),
        "acc": (1.0 - loss).tolist(),
        "lr": [1e-3] * n,
        "grad_norm": (loss * 3.0).tolist(),
        "tokens": (i * 2048).tolist(),
        "throughput": (1000.0 + loss).tolist(),
    }
    if numeric:
        cols["mfu"] = (0.4 + loss / 10).tolist()
        cols["scale"] = [65536.0] * n
    else:
        cols["phase"] = ["train" if x % 10 else "eval" for x in range(n)]
        cols["finite"] = [True] * n
    return cols


def cells_of(rows: list[dict[str, Any]]) -> dict[int, Cells]:
    """The same rows as the service lays them out (slots in column order)."""
    names = list(rows[0])
    m = len(rows)
    kinds: dict[int, list[str]] = {}
    for name in names:
        v = rows[0][name]
        kind = (
            BOOL
            if isinstance(v, bool)
            else INT64
            if isinstance(v, int)
            else STRING
            if isinstance(v, str)
            else DOUBLE
        )
        kinds.setdefault(kind, []).append(name)
    out: dict[int, Cells] = {}
    for kind, cols in kinds.items():
        present = np.ones((m, len(cols)), dtype=np.bool_)
        if kind == STRING:
            out[kind] = Cells([[r[c] for r in rows] for c in cols], present)
        else:
            dtype = {DOUBLE: np.float64, INT64: np.int64, BOOL: np.bool_}[kind]
            out[kind] = Cells(np.array([[r[c] for c in cols] for r in rows], dtype=dtype), present)
    return out


def through_log_row(
    address: str, cols: dict[str, list[Any]]
) -> tuple[float, float, str, float, float]:
    """rows/s through log_row, called with 10 keywords as a training loop
    calls it, until every row is acknowledged; seconds of the loop alone;
    the run id; CPU seconds of the training thread and of the writer thread
    over the same span."""
    from steplog import Experiment

    run = Experiment(f"bench-rows-{uuid.uuid4().hex[:8]}", url=address).start_logging()
    log_row = run.log_row
    epoch, batch, loss, acc, lr, grad, tokens, speed, c9, c10 = cols.values()
    n = len(epoch)
    me = threading.get_native_id()
    train0 = thread_cpu(me)
    writer0 = thread_cpu(writer_thread())  # 0.0 if it starts with the first row
    start = time.perf_counter()
    if "phase" in cols:
        for i in range(n):
            log_row(
                "perf",
                epoch=epoch[i],
                batch=batch[i],
                loss=loss[i],
                acc=acc[i],
                lr=lr[i],
                grad_norm=grad[i],
                tokens=tokens[i],
                throughput=speed[i],
                phase=c9[i],
                finite=c10[i],
            )
    else:
        for i in range(n):
            log_row(
                "perf",
                epoch=epoch[i],
                batch=batch[i],
                loss=loss[i],
                acc=acc[i],
                lr=lr[i],
                grad_norm=grad[i],
                tokens=tokens[i],
                throughput=speed[i],
                mfu=c9[i],
                scale=c10[i],
            )
    loop = time.perf_counter() - start
    if not run.flush(600):
        raise SystemExit("rows were not acknowledged within 600 s")
    elapsed = time.perf_counter() - start
    train = thread_cpu(me) - train0
    writer = thread_cpu(writer_thread()) - writer0
    run.complete()
    return n / elapsed, loop, run.id, train, writer


def through_log_table(
    address: str, cols: dict[str, list[Any]], chunk: int
) -> tuple[float, float, str]:
    """rows/s through log_table, `chunk` rows a call (the columns as lists,
    Azure's shape), until every row is acknowledged; seconds of the loop
    alone; the run id."""
    from steplog import Experiment

    run = Experiment(f"bench-table-{uuid.uuid4().hex[:8]}", url=address).start_logging()
    n = len(next(iter(cols.values())))
    start = time.perf_counter()
    for s in range(0, n, chunk):
        run.log_table("perf", {k: v[s : s + chunk] for k, v in cols.items()})
    loop = time.perf_counter() - start
    if not run.flush(600):
        raise SystemExit("rows were not acknowledged within 600 s")
    elapsed = time.perf_counter() - start
    run.complete()
    return n / elapsed, loop, run.id


async def fresh_table(database_url: str) -> None:
    """Each phase starts alike: an empty table_rows and a fresh checkpoint, so
    neither pays for the other's rows or for a checkpoint it did not cause."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE table_rows")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def stored_rows(database_url: str, run_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM table_rows JOIN series USING (series_id) WHERE run_id = $1",
            run_id,
        )
        return int(n)
    finally:
        await conn.close()


def ceiling_payloads(cols: dict[str, list[Any]]) -> list[bytes]:
    """The ceiling's COPY bodies: the same rows, COPY_ROWS per COPY, encoded
    as the service encodes them (encode_table_rows), before any clock starts."""
    n = len(next(iter(cols.values())))
    payloads = []
    for s in range(0, n, COPY_ROWS):
        part = [
            dict(zip(cols, v, strict=True))
            for v in zip(*(c[s : s + COPY_ROWS] for c in cols.values()), strict=True)
        ]
        m = len(part)
        body = encode_table_rows(
            np.full(m, time.time()),
            CEILING_SERIES_ID,
            np.arange(s, s + m, dtype=np.int64),
            cells_of(part),
        )
        payloads.append(copy_payload([body]))
    return payloads


def ceilings(
    database_url: str, dbname: str, payloads: list[bytes], n: int
) -> dict[int, tuple[float, float]]:
    """{connections: (rows/s, PostgreSQL CPU seconds of the COPY)} of binary
    COPY of the payloads into an empty table_rows, each COPY committed, from
    each count of CEILING_CONNECTIONS; the rows stored are checked."""
    out: dict[int, tuple[float, float]] = {}
    for k in CEILING_CONNECTIONS:
        asyncio.run(fresh_table(database_url))
        sampler = DatabaseCpu(dbname)
        elapsed = asyncio.run(
            copy_ceiling(database_url, "table_rows", TABLE_ROW_COLUMNS, payloads, k)
        )
        cpu = sampler.stop()
        stored = int(  # type: ignore[call-overload]
            sql(
                database_url,
                f"SELECT count(*) FROM table_rows WHERE series_id = {CEILING_SERIES_ID}",
            )
        )
        if stored != n:
            raise SystemExit(f"the ceiling ({k} connections) stored {stored} rows of {n}")
        out[k] = (n / elapsed, cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--numeric", action="store_true", help="10 numeric columns, no string")
    parser.add_argument(
        "--table-chunk", type=int, default=1000, help="rows per log_table call (ROWS_TABLE)"
    )
    args = parser.parse_args()

    cols = columns_of(args.rows, args.numeric)
    rates: list[float] = []
    ceils: list[float] = []
    tables: list[float] = []
    table_loops: list[float] = []
    per_count: dict[int, list[float]] = {k: [] for k in CEILING_CONNECTIONS}
    bests: list[int] = []
    names = ("client", "service", "postgres", "loop", "train", "writer", "pg_own", "ceiling_pg")
    costs: list[dict[str, float]] = []
    with bench_stack() as (stack, info, database_url), service(info, database_url) as svc:
        assert svc.proc is not None
        postgres = postmaster_pid(stack)
        dbname = database_url.rsplit("/", 1)[1].split("?")[0]
        payloads = ceiling_payloads(cols)
        for i in range(args.repeat):
            found = ceilings(database_url, dbname, payloads, args.rows)
            best = max(found, key=lambda k: found[k][0])
            ceil, ceiling_pg = found[best]
            for k, (r, _) in found.items():
                per_count[k].append(r)
            bests.append(best)
            asyncio.run(fresh_table(database_url))
            before = (
                os.times(),
                cpu_seconds(svc.proc.pid),
                cpu_seconds(postgres),
                database_cpu(dbname),
            )
            rate, loop, run_id, train, writer = through_log_row(svc.address, cols)
            after = (
                os.times(),
                cpu_seconds(svc.proc.pid),
                cpu_seconds(postgres),
                database_cpu(dbname),
            )
            stored = asyncio.run(stored_rows(database_url, run_id))
            if stored != args.rows:
                raise SystemExit(f"stored {stored} rows of {args.rows}")
            us = 1e6 / args.rows
            client = (after[0].user + after[0].system) - (before[0].user + before[0].system)
            cost = dict(
                zip(
                    names,
                    (
                        client * us,
                        (after[1] - before[1]) * us,
                        (after[2] - before[2]) * us,
                        loop * us,
                        train * us,
                        writer * us,
                        (after[3] - before[3]) * us,
                        ceiling_pg * us,
                    ),
                    strict=True,
                )
            )
            rates.append(rate)
            ceils.append(ceil)
            costs.append(cost)
            print(
                f"  rep {i + 1}: log_row {rate:,.0f} rows/s, ceiling {ceil:,.0f} rows/s "
                f"({best} connections; "
                + ", ".join(f"{k}: {r:,.0f}" for k, (r, _) in found.items())
                + f"), ratio {rate / ceil:.2f} ({stored} rows stored); per row: "
                + " ".join(
                    f"{k}_cpu_us={v:.2f}" if k != "loop" else f"loop_us={v:.2f}"
                    for k, v in cost.items()
                ),
                flush=True,
            )
            if args.table_chunk > 0:
                asyncio.run(fresh_table(database_url))
                table_rate, table_loop, table_run = through_log_table(
                    svc.address, cols, args.table_chunk
                )
                stored = asyncio.run(stored_rows(database_url, table_run))
                if stored != args.rows:
                    raise SystemExit(f"log_table stored {stored} rows of {args.rows}")
                tables.append(table_rate)
                table_loops.append(table_loop * 1e6 / args.rows)
                print(
                    f"  rep {i + 1}: log_table ({args.table_chunk} rows a call)"
                    f" {table_rate:,.0f} rows/s, ratio {table_rate / ceil:.2f} to the same"
                    f" ceiling ({stored} rows stored); loop_us={table_loops[-1]:.2f} a row",
                    flush=True,
                )
    rate, ceil = statistics.median(rates), statistics.median(ceils)
    ratio = statistics.median([a / b for a, b in zip(rates, ceils, strict=True)])
    most = max(CEILING_CONNECTIONS, key=bests.count)
    med = {k: statistics.median(c[k] for c in costs) for k in names}
    print(
        f"ROWS rows_per_s={rate:.0f} ceiling_rows_per_s={ceil:.0f} ratio={ratio:.2f}"
        f" ratios={','.join(f'{a / b:.2f}' for a, b in zip(rates, ceils, strict=True))}"
        f" ceiling_connections={most}"
        + "".join(f" ceilings_{k}={statistics.median(v):.0f}" for k, v in per_count.items())
        + f" client_cpu_us={med['client']:.2f} service_cpu_us={med['service']:.2f}"
        f" postgres_cpu_us={med['postgres']:.2f} loop_us={med['loop']:.2f}"
        f" train_cpu_us={med['train']:.2f} writer_cpu_us={med['writer']:.2f}"
        f" pg_own_cpu_us={med['pg_own']:.2f} ceiling_pg_cpu_us={med['ceiling_pg']:.2f}"
        f" rows={args.rows} repeats={args.repeat} cpus={os.cpu_count()}"
    )
    if tables:
        print(
            f"ROWS_TABLE rows_per_s={statistics.median(tables):.0f}"
            f" ceiling_rows_per_s={ceil:.0f}"
            f" ratio={statistics.median([a / b for a, b in zip(tables, ceils, strict=True)]):.2f}"
            f" ratios={','.join(f'{a / b:.2f}' for a, b in zip(tables, ceils, strict=True))}"
            f" loop_us={statistics.median(table_loops):.2f}"
            f" chunk={args.table_chunk} rows={args.rows} repeats={args.repeat}"
        )


if __name__ == "__main__":
    main()
