"""What every benchmark shares: the local stack under .steplog/bench, a fresh
database, the service as a subprocess (`python -m ingest serve`, its public
entry point), the binary COPY ceiling, and statistics helpers.

Only public entry points of the packages are used here (no `tests.*`, no
private names), so bench/ runs from an installed checkout without the tests.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import asyncpg

from ingest.devstack import LocalStack, StackInfo
from ingest.healthcheck import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
# `make stop` stops it, `make clean` removes it. STEPLOG_BENCH_STACK names
# another (the benchmarks' smoke test runs them on the test session's stack).
BENCH_STACK = Path(os.environ.get("STEPLOG_BENCH_STACK") or ROOT / ".steplog" / "bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain(stream: IO[bytes]) -> None:
    while stream.read(65536):
        pass


class ServiceProcess:
    """`python -m ingest serve` with the given environment, healthy when
    `start()` returns (grpc.health.v1 SERVING, `ingest.healthcheck.wait_healthy`)."""

    def __init__(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        metrics_port: int = 0,
        log_path: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        # A port picked here may be taken before the service binds it: a first
        # start then retries on another (a restart keeps the address clients know).
        self._auto_port = port is None
        self.port = port or free_port()
        self.metrics_port = metrics_port
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update(env)
        self.env["STEPLOG_LISTEN"] = self.address
        self.env["STEPLOG_METRICS_PORT"] = str(metrics_port)
        self.env.setdefault("STEPLOG_SHUTDOWN_GRACE_S", "2")
        if extra_env:
            self.env.update(extra_env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        may_move = self._auto_port and self.proc is None
        for attempt in range(3):
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab") if self.log_path else subprocess.PIPE  # noqa: SIM115
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            if not isinstance(out, int):
                out.close()
            try:
                wait_healthy(self.address, timeout, self.proc)
            except (RuntimeError, TimeoutError) as exc:
                said = self._output()
                if may_move and attempt < 2 and "in use" in said:
                    self.port = free_port()
                    self.address = f"127.0.0.1:{self.port}"
                    self.env["STEPLOG_LISTEN"] = self.address
                    continue
                self.kill()
                raise RuntimeError(f"{exc}; it said: {said[-2000:]}") from None
            if self.proc.stdout is not None:
                # Keep the pipe drained so a chatty service never blocks on it.
                threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True).start()
            return self
        raise AssertionError("unreachable")

    def _output(self) -> str:
        if self.proc is not None and self.proc.stdout is not None and self.proc.poll() is not None:
            return self.proc.stdout.read().decode(errors="replace")
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful drain), SIGKILL after `timeout` s."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def bench_stack() -> Iterator[tuple[LocalStack, StackInfo, str]]:
    """The stack (left running for the next benchmark) and a fresh database."""
    stack = LocalStack(BENCH_STACK)
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


async def copy_ceiling(
    url: str, table: str, columns: Sequence[str], payloads: Sequence[bytes], connections: int
) -> float:
    """Seconds to send `payloads` (complete binary COPY bodies, built before
    the clock starts) with asyncpg's binary `copy_to_table` into `table`, each
    payload one COPY in its own transaction, spread round-robin over
    `connections` connections working at the same time."""
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:

        async def one(conn: asyncpg.Connection, mine: Sequence[bytes]) -> None:
            for payload in mine:
                await conn.copy_to_table(
                    table, source=io.BytesIO(payload), columns=list(columns), format="binary"
                )

        start = time.perf_counter()
        await asyncio.gather(*(one(c, payloads[i::connections]) for i, c in enumerate(conns)))
        return time.perf_counter() - start
    finally:
        for c in conns:
            await c.close()


def png(width: int, height: int, seed: int, level: int = 1) -> bytes:
    """An RGB PNG of random pixels: they do not compress, so 148x148 is
    about 64 KiB."""
    rng = random.Random(seed)
    rows = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, level))
        + chunk(b"IEND", b"")
    )


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


async def settle_compaction(url: str, timeout_s: float = 300.0) -> bool:
    """Wait (at most timeout_s) until the service's compaction (migration 011)
    has nothing left to do, then VACUUM the point tables as autovacuum would
    (the space of the rows and blocks it replaced becomes reusable, the files
    keep their size). True when it settled in time."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            left = await conn.fetchval("SELECT count(*) FROM scalar_compact_candidates(0, 1)")
            if not left:
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
        await conn.execute("VACUUM (ANALYZE) scalar_blocks, scalar_rows")
        return True
    finally:
        await conn.close()


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


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # after the name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based
    ticks = sum(int(x) for x in fields[11:15])
    return int(fields[1]), ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds(root_pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants, live
    or reaped, from /proc: what that process tree has cost the machine so
    far, whatever else runs on it."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)], cpu[int(entry)] = _stat(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


@dataclass(frozen=True)
class CpuMark:
    """CPU seconds so far of the service's and PostgreSQL's process trees
    (cpu_seconds), and their pids: a mark taken before a workload and
    `per_point` after it give where its cost went on the server side."""

    service_pid: int
    postgres_pid: int
    service: float
    postgres: float

    @classmethod
    def now(cls, service_pid: int, postgres_pid: int) -> CpuMark:
        return cls(service_pid, postgres_pid, cpu_seconds(service_pid), cpu_seconds(postgres_pid))

    def per_point(self, points: int) -> str:
        """`service_cpu_us_per_point=... postgres_cpu_us_per_point=...` from
        this mark until now."""
        later = CpuMark.now(self.service_pid, self.postgres_pid)
        return (
            f"service_cpu_us_per_point={(later.service - self.service) / points * 1e6:.2f}"
            f" postgres_cpu_us_per_point={(later.postgres - self.postgres) / points * 1e6:.2f}"
        )


def postmaster_pid(stack: LocalStack) -> int:
    """The pid of the stack's PostgreSQL server (first line of postmaster.pid)."""
    return int((stack.pg_data / "postmaster.pid").read_text().split()[0])


def database_cpu(database: str) -> float:
    """CPU seconds (user + system) of the live PostgreSQL backends connected to
    `database`, from /proc (their process title is "postgres: <user> <database> ...")."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").split()
            if len(title) < 3 or title[0] != "postgres:" or title[2] != database:
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
