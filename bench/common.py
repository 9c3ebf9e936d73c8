"""What every benchmark shares: the local stack under .steplog/bench, a fresh
database, the service as a subprocess, and statistics helpers."""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from ingest.devstack import LocalStack, StackInfo
from tests.support import ROOT, ServiceProcess, free_port


@contextmanager
def bench_stack() -> Iterator[tuple[LocalStack, StackInfo, str]]:
    """The stack (left running for the next benchmark) and a fresh database."""
    stack = LocalStack(Path(ROOT / ".steplog" / "bench"))
    info = stack.start()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    url = stack.create_database(name)
    try:
        yield stack, info, url
    finally:
        stack.drop_database(name)


@contextmanager
def service(info: StackInfo, database_url: str, **env: str) -> Iterator[ServiceProcess]:
    e = info.env()
    e["STEPLOG_DATABASE_URL"] = database_url
    e.update(env)
    proc = ServiceProcess(e, metrics_port=free_port(), log_path=ROOT / ".steplog" / "bench.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def scrape(metrics_port: int, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


async def fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def sql(url: str, query: str) -> object:
    return asyncio.run(fetchval(url, query))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
