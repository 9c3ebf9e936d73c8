"""Faults at scale: real clients (`from steplog import Experiment`) in several
processes log through faults; SQL then counts what was stored.

    python -m bench.chaos [--scenario NAME ...] [--points 1000000] [--keep-stack]

Scenarios, each on its own fresh database:
- kill9_lb: two service replicas behind nginx (`grpc_pass` to an upstream of
  both, run as a plain process with a config under the stack folder, on free
  ports); 4 client processes, each with its own run, log --points in all
  (20 stepped and 5 unstepped series each), paced over --duration seconds;
  one replica is killed with SIGKILL 10 times (alternating), and restarted
  on the same port after each kill.
- sigterm_slow_db: the same shape; three times, another connection holds
  `LOCK TABLE writers IN ACCESS EXCLUSIVE MODE` for 5 s (every commit waits
  on it: the database is slow), and 1 s into the lock one replica gets SIGTERM;
  it is restarted after the lock is released.
- postgres_restart: the same shape; the stack's PostgreSQL is restarted
  (fast shutdown, start on the same port and data) twice during the run.
- s3_stop: one replica; 2 client processes log images (unique PNGs) and
  upload files (`upload_file(..., wait=False)`); the S3 server (SeaweedFS) is
  stopped for 20 s during it, then started again.

Each scenario prints one line:

    CHAOS scenario=... logged=... stored=... lost=... doubled=...

logged: points (or images + files) the clients logged, each with a unique
value; stored: rows in the database for the clients' runs; lost: logged
minus distinct stored; doubled: stored rows beyond the distinct ones. The
unstepped series are what shows a batch committed twice (a stepped repeat
is a duplicate by the step rules; an unstepped one gets a new index).

It runs on a stack of its own under .steplog/chaos (PostgreSQL and S3 are
restarted and stopped here, so never the shared test or bench stack), and
stops that stack at the end unless --keep-stack.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import ROOT, ServiceProcess, free_port
from ingest.devstack import LocalStack, StackInfo
from ingest.healthcheck import check

STACK_ROOT = ROOT / ".steplog" / "chaos"
STEPPED = [f"m{i:02d}" for i in range(20)]
UNSTEPPED = [f"u{i}" for i in range(5)]
CLIENT_ENV = {
    # Reconnect quickly after a fault; everything else is the client's default.
    "STEPLOG_BACKOFF_MAX": "2",
}


# ------------------------------------------------------------------ clients


def _pace(t0: float, done: int, total: int, duration: float) -> None:
    if duration > 0:
        ahead = t0 + duration * done / total - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def scalar_client(url: str, experiment: str, steps: int, duration: float, out: Any) -> None:
    """One training process: 20 stepped and 5 unstepped series, value = index."""
    os.environ.update(CLIENT_ENV)
    from steplog import Experiment

    run = Experiment(experiment, url=url).start_logging()
    t0 = time.monotonic()
    log = run.log
    for i in range(steps):
        v = float(i)
        for n in STEPPED:
            log(n, v, step=i)
        for n in UNSTEPPED:
            log(n, v)
        if i % 50 == 0:
            _pace(t0, i, steps, duration)
    ok = run.flush(900)
    out.put(_result(run, ok, 0))


def _result(run: Any, flushed: bool, failed_uploads: int) -> dict[str, Any]:
    """What a client saw: flush result, the writer's counters, complete()'s error."""
    stats = run.writer_stats()
    error = ""
    try:
        run.complete()
    except Exception as exc:  # recorded, not hidden: the scenario line shows it
        error = f"{type(exc).__name__}: {exc}"
    return {
        "run_id": run.id,
        "flushed": flushed,
        "rejected": stats.rejected + failed_uploads,
        "refused": stats.refused,
        "dropped": stats.dropped,
        "reconnects": stats.reconnects,
        "complete_error": error,
    }


def png(width: int, height: int, seed: int) -> bytes:
    """A valid, unique RGB PNG."""
    rows = b"".join(
        b"\x00" + bytes(((x * 7 + y * 13 + seed) % 256) for x in range(width * 3))
        for y in range(height)
    )
    rows = struct.pack(">I", seed) + rows[4:]  # unique even for equal patterns

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + (chunk(b"IEND", b""))
    )


def blob_client(
    url: str, experiment: str, images: int, files: int, duration: float, seed: int, out: Any
) -> None:
    """Images (one series, stepped) and files, interleaved, paced over duration."""
    os.environ.update(CLIENT_ENV)
    from steplog import Experiment

    run = Experiment(experiment, url=url).start_logging()
    t0 = time.monotonic()
    uploads = []
    every = max(1, images // max(1, files))
    for i in range(images):
        run.log_image("sample", png(32, 32, seed * 100_000 + i), step=i)
        if i % every == 0 and len(uploads) < files:
            data = os.urandom(64 * 1024) + str(i).encode()
            uploads.append(run.upload_file(f"files/{i}.bin", data, wait=False, timeout=600))
        _pace(t0, i, images, duration)
    while len(uploads) < files:
        uploads.append(
            run.upload_file(f"files/x{len(uploads)}.bin", os.urandom(1024), wait=False, timeout=600)
        )
    ok = run.flush(900)
    failed = 0
    for u in uploads:
        try:
            u.result()
        except Exception:
            failed += 1
    out.put(_result(run, ok, failed))


# ------------------------------------------------------------------ the stack


class Nginx:
    """nginx as a plain process: gRPC load balancer over the replicas."""

    def __init__(self, folder: Path, upstreams: list[str]) -> None:
        self.folder = folder
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / "tmp"
        temp.mkdir(exist_ok=True)
        servers = "\n".join(f"    server {u} max_fails=1 fail_timeout=1s;" for u in upstreams)
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf = folder / "nginx.conf"
        self.conf.write_text(
            f"""{user}
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  upstream steplog {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{self.port} http2;
    client_max_body_size 0;
    http2_max_concurrent_streams 1024;
    location / {{
      grpc_pass grpc://steplog;
      grpc_read_timeout 600s;
      grpc_send_timeout 600s;
      grpc_next_upstream error timeout;
    }}
  }}
}}
"""
        )

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf), "-p", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "stderr.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        while not check(self.address, timeout=1.0)[0]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx did not serve: {(self.folder / 'stderr.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Replica:
    """A service process that can be killed and started again on its port."""

    def __init__(self, info: StackInfo, database_url: str, log: Path) -> None:
        env = info.env()
        env["STEPLOG_DATABASE_URL"] = database_url
        self.env = env
        self.port = free_port()
        self.log = log
        self.proc = self._new()

    def _new(self) -> ServiceProcess:
        return ServiceProcess(self.env, port=self.port, log_path=self.log)

    def start(self) -> None:
        self.proc = self._new().start(timeout=120)

    @property
    def address(self) -> str:
        return self.proc.address


@dataclass
class Scenario:
    name: str
    logged: int
    stored: int
    distinct: int
    clients: list[dict[str, Any]]
    faults: int
    elapsed_s: float
    note: str = ""

    def line(self) -> str:
        lost = self.logged - self.distinct
        doubled = self.stored - self.distinct
        c = self.clients
        return (
            f"CHAOS scenario={self.name} logged={self.logged} stored={self.stored}"
            f" lost={lost} doubled={doubled} faults={self.faults}"
            f" flushed={all(x['flushed'] for x in c)}"
            f" client_rejected={sum(x['rejected'] for x in c)}"
            f" client_refused={sum(x['refused'] for x in c)}"
            f" client_dropped={sum(x['dropped'] for x in c)}"
            f" reconnects={sum(x['reconnects'] for x in c)}"
            f" complete_errors={sum(1 for x in c if x['complete_error'])}"
            f" elapsed_s={self.elapsed_s:.0f}{self.note}"
        )

    def client_errors(self) -> list[str]:
        return [f"  complete(): {x['complete_error']}" for x in self.clients if x["complete_error"]]

    @property
    def ok(self) -> bool:
        return (
            self.logged == self.distinct == self.stored
            and all(x["flushed"] and not x["refused"] and not x["dropped"] for x in self.clients)
            and not self.client_errors()
        )


async def _fetchrow(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()


def fetchrow(url: str, query: str, *args: Any) -> Any:
    return asyncio.run(_fetchrow(url, query, *args))


SCALARS_SQL = (
    "SELECT count(*), count(DISTINCT (p.series_id, p.value)) FROM scalar_points p"
    " JOIN series s USING (series_id) WHERE s.run_id = ANY($1::text[])"
)
IMAGES_SQL = (
    "SELECT count(*), count(DISTINCT (p.series_id, p.step)) FROM image_points p"
    " JOIN series s USING (series_id) WHERE s.run_id = ANY($1::text[])"
)
FILES_SQL = (
    "SELECT count(*), count(DISTINCT (run_id, path)) FROM artifacts WHERE run_id = ANY($1::text[])"
)


@contextmanager
def database(stack: LocalStack) -> Iterator[str]:
    name = f"chaos_{uuid.uuid4().hex[:8]}"
    url = stack.create_database(name)
    try:
        yield url
    finally:
        try:
            stack.drop_database(name)
        except Exception as exc:  # the stack may be mid-restart: say so, go on
            print(f"note: database {name} not dropped: {exc}")


def _spawn(target: Callable[..., None], argsets: list[tuple[Any, ...]]) -> tuple[list[Any], Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, out)) for a in argsets]
    for p in procs:
        p.start()
    return procs, out


def _collect(procs: list[Any], out: Any, timeout: float) -> list[dict[str, Any]]:
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(60)
    return results


def scalar_scenario(
    name: str,
    stack: LocalStack,
    info: StackInfo,
    points: int,
    clients: int,
    duration: float,
    fault: Callable[[list[Replica], threading.Event], int],
) -> Scenario:
    """Two replicas behind nginx, `clients` scalar clients, `fault` run beside them."""
    with database(stack) as db:
        log = STACK_ROOT / f"{name}.service.log"
        replicas = [Replica(info, db, log) for _ in range(2)]
        lb = Nginx(STACK_ROOT / "nginx" / name, [r.address for r in replicas])
        steps = points // clients // (len(STEPPED) + len(UNSTEPPED))
        logged = steps * (len(STEPPED) + len(UNSTEPPED)) * clients
        try:
            for r in replicas:
                r.start()
            lb.start()
            t0 = time.monotonic()
            procs, out = _spawn(
                scalar_client, [(lb.address, name, steps, duration) for _ in range(clients)]
            )
            done = threading.Event()
            faults: list[int] = []

            def inject() -> None:
                try:
                    faults.append(fault(replicas, done))
                except Exception as exc:  # the scenario goes on; its line says so
                    print(f"  fault injection failed: {type(exc).__name__}: {exc}", flush=True)

            th = threading.Thread(target=inject)
            th.start()
            try:
                results = _collect(procs, out, timeout=duration + 900)
            finally:
                done.set()
                th.join()
            elapsed = time.monotonic() - t0
        finally:
            lb.stop()
            for r in replicas:
                r.proc.stop()
        runs = [r["run_id"] for r in results]
        stored, distinct = fetchrow(db, SCALARS_SQL, runs)
    return Scenario(
        name, logged, int(stored), int(distinct), results, faults[0] if faults else 0, elapsed
    )


# ------------------------------------------------------------------ faults


def kill9_fault(count: int, duration: float) -> Callable[[list[Replica], threading.Event], int]:
    """`count` kills spread over the logging (alternating replicas), each
    followed by a restart on the same port; the schedule is absolute, so the
    restarts' own time does not push the last kills past the end."""

    def fault(replicas: list[Replica], done: threading.Event) -> int:
        kills = 0
        t0 = time.monotonic()
        first, last = 2.0, max(3.0, duration - 3.0)
        for i in range(count):
            at = t0 + first + (last - first) * i / max(1, count - 1)
            if done.wait(max(0.0, at - time.monotonic())):
                break  # only kills while the clients log count
            r = replicas[i % len(replicas)]
            r.proc.kill()
            kills += 1
            r.start()
        return kills

    return fault


def slow_db_sigterm_fault(
    times: int, lock_s: float
) -> Callable[[list[Replica], threading.Event], int]:
    def fault(replicas: list[Replica], done: threading.Event) -> int:
        url = replicas[0].env["STEPLOG_DATABASE_URL"]

        async def locked(stop: Callable[[], None]) -> None:
            conn = await asyncpg.connect(url)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE writers IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(1.0)
                    stopper = threading.Thread(target=stop)
                    stopper.start()
                    await asyncio.sleep(lock_s - 1.0)
                stopper.join()
            finally:
                await conn.close()

        n = 0
        if done.wait(3.0):
            return n
        for i in range(times):
            r = replicas[i % len(replicas)]
            asyncio.run(locked(lambda r=r: r.proc.stop(timeout=60)))  # type: ignore[misc]
            n += 1
            r.start()
            done.wait(3.0)
        return n

    return fault


def postgres_restart_fault(stack: LocalStack, times: int, duration: float) -> Callable[..., int]:
    def fault(replicas: list[Replica], done: threading.Event) -> int:
        n = 0
        gap = max(1.0, duration / (times + 1))
        for _ in range(times):
            done.wait(gap)
            stack.restart_postgres()
            n += 1
        return n

    return fault


# ------------------------------------------------------------------ scenarios


def run_s3_stop(stack: LocalStack, info: StackInfo, images: int, files: int) -> Scenario:
    name = "s3_stop"
    with database(stack) as db:
        replica = Replica(info, db, STACK_ROOT / f"{name}.service.log")
        duration = 40.0
        try:
            replica.start()
            t0 = time.monotonic()
            procs, out = _spawn(
                blob_client,
                [(replica.address, name, images, files, duration, seed) for seed in (1, 2)],
            )
            time.sleep(5.0)
            stack.stop_s3()
            time.sleep(20.0)
            stack.start_s3()
            results = _collect(procs, out, timeout=1200)
            elapsed = time.monotonic() - t0
        finally:
            replica.proc.stop()
        runs = [r["run_id"] for r in results]
        i_stored, i_distinct = fetchrow(db, IMAGES_SQL, runs)
        f_stored, f_distinct = fetchrow(db, FILES_SQL, runs)
    logged = 2 * (images + files)
    return Scenario(
        name,
        logged,
        int(i_stored) + int(f_stored),
        int(i_distinct) + int(f_distinct),
        results,
        1,
        elapsed,
        f" images={i_stored}/{2 * images} files={f_stored}/{2 * files} s3_down_s=20",
    )


SCENARIOS = ("kill9_lb", "sigterm_slow_db", "postgres_restart", "s3_stop")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", action="append", choices=SCENARIOS)
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=45.0, help="seconds the logging is paced over")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--images", type=int, default=300, help="per client (s3_stop)")
    p.add_argument("--files", type=int, default=30, help="per client (s3_stop)")
    p.add_argument("--keep-stack", action="store_true")
    ns = p.parse_args()
    chosen = ns.scenario or list(SCENARIOS)
    stack = LocalStack(STACK_ROOT)
    info = stack.start()
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cpus", flush=True)
    results: list[Scenario] = []
    try:
        for name in chosen:
            if name == "kill9_lb":
                fault = kill9_fault(ns.kills, ns.duration)
                s = scalar_scenario(name, stack, info, ns.points, ns.clients, ns.duration, fault)
            elif name == "sigterm_slow_db":
                fault = slow_db_sigterm_fault(times=3, lock_s=5.0)
                s = scalar_scenario(
                    name, stack, info, ns.points // 2, ns.clients, ns.duration / 2, fault
                )
            elif name == "postgres_restart":
                fault = postgres_restart_fault(stack, 2, ns.duration / 2)
                s = scalar_scenario(
                    name, stack, info, ns.points // 2, ns.clients, ns.duration / 2, fault
                )
            else:
                s = run_s3_stop(stack, info, ns.images, ns.files)
            for line in s.client_errors():
                print(line)
            print(s.line(), flush=True)
            results.append(s)
    finally:
        if not ns.keep_stack:
            stack.stop()
    raise SystemExit(0 if all(s.ok for s in results) else 1)


if __name__ == "__main__":
    main()
