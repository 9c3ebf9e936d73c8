"""Rows: `run.log_row` with 10 columns in a plain loop, timed until every row
is acknowledged, against the same-run ceiling: the same rows, already encoded,
binary-COPYed by asyncpg into the same table (table_rows) on one connection,
as the service's one pipeline worker per writer does.

    python -m bench.bench_rows [--rows 1000000] [--repeat 3] [--numeric]

Uses the shared bench stack (.steplog/bench, a fresh database) and starts the
service as a subprocess. Prints one line per repetition and the medians:
`ROWS rows_per_s=... ceiling_rows_per_s=... ratio=...`, and where a row's
cost goes, as CPU time per row measured from /proc over the log_row phase
(so other work on the machine does not count): `client_cpu_us` (this
process: the training loop and the client's sender), `service_cpu_us` (the
service and its children), `postgres_cpu_us` (the stack's PostgreSQL, every
backend), and `loop_us` (wall time of the training loop alone, per call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

import asyncpg
import numpy as np

from bench.common import bench_stack, copy_ceiling, cpu_seconds, postmaster_pid, service
from ingest.core.tables import BOOL, DOUBLE, INT64, STRING
from ingest.store.copy import copy_payload
from ingest.store.tables import TABLE_ROW_COLUMNS, Cells, encode_table_rows

COPY_ROWS = 10_000  # rows per COPY (and commit) in the ceiling


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


def through_log_row(address: str, cols: dict[str, list[Any]]) -> tuple[float, float, str]:
    """rows/s through log_row, called with 10 keywords as a training loop
    calls it, until every row is acknowledged; seconds of the loop alone;
    and the run id."""
    from steplog import Experiment

    run = Experiment(f"bench-rows-{uuid.uuid4().hex[:8]}", url=address).start_logging()
    log_row = run.log_row
    epoch, batch, loss, acc, lr, grad, tokens, speed, c9, c10 = cols.values()
    n = len(epoch)
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


async def ceiling(database_url: str, cols: dict[str, list[Any]], series_id: int) -> float:
    """rows/s of binary COPY of the same rows (encoded beforehand) into
    table_rows, COPY_ROWS per COPY, each committed, on one connection."""
    n = len(next(iter(cols.values())))
    payloads = []
    for s in range(0, n, COPY_ROWS):
        part = [
            dict(zip(cols, v, strict=True))
            for v in zip(*(c[s : s + COPY_ROWS] for c in cols.values()), strict=True)
        ]
        m = len(part)
        body = encode_table_rows(
            np.full(m, time.time()), series_id, np.arange(s, s + m, dtype=np.int64), cells_of(part)
        )
        payloads.append(copy_payload([body]))
    elapsed = await copy_ceiling(database_url, "table_rows", TABLE_ROW_COLUMNS, payloads, 1)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--numeric", action="store_true", help="10 numeric columns, no string")
    args = parser.parse_args()

    cols = columns_of(args.rows, args.numeric)
    rates: list[float] = []
    ceilings: list[float] = []
    costs: list[tuple[float, float, float, float]] = []
    with bench_stack() as (stack, info, database_url), service(info, database_url) as svc:
        assert svc.proc is not None
        postgres = postmaster_pid(stack)
        for i in range(args.repeat):
            asyncio.run(fresh_table(database_url))
            ceil = asyncio.run(ceiling(database_url, cols, 900_000_000 + i))
            asyncio.run(fresh_table(database_url))
            before = (os.times(), cpu_seconds(svc.proc.pid), cpu_seconds(postgres))
            rate, loop, run_id = through_log_row(svc.address, cols)
            after = (os.times(), cpu_seconds(svc.proc.pid), cpu_seconds(postgres))
            stored = asyncio.run(stored_rows(database_url, run_id))
            if stored != args.rows:
                raise SystemExit(f"stored {stored} rows of {args.rows}")
            us = 1e6 / args.rows
            client = (after[0].user + after[0].system) - (before[0].user + before[0].system)
            cost = (
                client * us,
                (after[1] - before[1]) * us,
                (after[2] - before[2]) * us,
                loop * us,
            )
            rates.append(rate)
            ceilings.append(ceil)
            costs.append(cost)
            print(
                f"  rep {i + 1}: log_row {rate:,.0f} rows/s, ceiling {ceil:,.0f} rows/s, "
                f"ratio {rate / ceil:.2f} ({stored} rows stored); per row: "
                f"client_cpu_us={cost[0]:.2f} service_cpu_us={cost[1]:.2f} "
                f"postgres_cpu_us={cost[2]:.2f} loop_us={cost[3]:.2f}",
                flush=True,
            )
    rate, ceil = statistics.median(rates), statistics.median(ceilings)
    ratio = statistics.median([a / b for a, b in zip(rates, ceilings, strict=True)])
    client, svc_us, pg_us, loop_us = (statistics.median(c[k] for c in costs) for k in range(4))
    print(
        f"ROWS rows_per_s={rate:.0f} ceiling_rows_per_s={ceil:.0f} ratio={ratio:.2f}"
        f" ratios={','.join(f'{a / b:.2f}' for a, b in zip(rates, ceilings, strict=True))}"
        f" client_cpu_us={client:.2f} service_cpu_us={svc_us:.2f} postgres_cpu_us={pg_us:.2f}"
        f" loop_us={loop_us:.2f} rows={args.rows} repeats={args.repeat} cpus={os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
