"""Client delivery across a kill -9, a resume on another host and an S3
outage: real training scripts (public API only: `steplog.Run`,
`steplog.Experiment`, the `steplog sync` command), the service as a process
on the bench stack (.steplog/bench), and SQL to count what was stored.

    python -m bench.delivery [--scenario NAME ...]

Each scenario prints one line:

    DELIVERY scenario=... logged=... stored=... lost=... doubled=...

logged: points (and images) the scripts logged (a call that returned), each
with a value unique in its series; stored: rows in the database for the run;
lost: logged minus distinct stored; doubled: stored rows beyond the distinct
ones. Every series' values are unique, so a batch stored twice shows in
`doubled` also for the unstepped series.

- kill9_spool: a script logs 8 stepped and 2 unstepped series (paced, about
  50,000 points/s) with STEPLOG_ON_FULL=spool against the service; 1.5 s in
  the service is killed (-9: the batches in flight are never acknowledged),
  1-2 s later the script is killed with SIGKILL; the service is started
  again and `steplog sync` sends the script's spool (twice). The
  stated bound: at most the points of the last flush interval (0.2 s) may be
  lost; `in_last_interval` says how many were logged inside it.
- resume_host_desc / resume_host_asc: two scripts on two "hosts" (the host
  part of the writer id: socket.gethostname), offline, one after the other on
  the same run; the first is killed -9 (after its last flush interval), the
  second continues at the next step and exits normally; one `steplog sync`
  of both spools, then a second one (nothing more may be stored). desc: the
  second host's name sorts first (what lost 39% of a run before).
- s3_outage: one run logs scalars (5 stepped, 1 unstepped series, 600/s) and
  images (unique PNGs, 10/s) for 40 s; the bench stack's S3 server is
  stopped from 5 s to 25 s. `scalars_in_outage` compares the scalars stored
  by 24 s (S3 still down) with those logged by 23 s: they keep flowing.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import ROOT, ServiceProcess, bench_stack, service
from bench.log_overhead import png

FLUSH_INTERVAL = 0.2
COUNT_SQL = (
    "SELECT count(*), count(DISTINCT (p.series_id, p.value)) FROM scalar_points p"
    " JOIN series s USING (series_id) WHERE s.run_id = $1"
)
IMAGES_SQL = (
    "SELECT count(*), count(DISTINCT (p.series_id, p.step)) FROM image_points p"
    " JOIN series s USING (series_id) WHERE s.run_id = $1"
)


async def _fetchrow(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()


def counts(url: str, query: str, run_id: str) -> tuple[int, int]:
    row = asyncio.run(_fetchrow(url, query, run_id))
    return int(row[0]), int(row[1])


def sync(spool: Path, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steplog.cli", "sync", str(spool), "--url", address],
        capture_output=True,
        text=True,
        timeout=600,
    )


def client_env(run_id: str, spool: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "STEPLOG_RUN_ID": run_id,
            "STEPLOG_SPOOL_DIR": str(spool),
            "STEPLOG_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
        }
    )
    env.update(extra)
    return env


def line(scenario: str, logged: int, stored: int, distinct: int, extra: str = "") -> str:
    return (
        f"DELIVERY scenario={scenario} logged={logged} stored={stored}"
        f" lost={logged - distinct} doubled={stored - distinct}{extra}"
    )


# ---------------------------------------------------------------- kill -9

KILL9_SCRIPT = """
import mmap, sys, time
from steplog import Run
f = open(sys.argv[1], "r+b")
shared = memoryview(mmap.mmap(f.fileno(), 0)).cast("q")  # [0] points, [1 + step] time_ns
steps, rate = int(sys.argv[2]), float(sys.argv[3])
run = Run.get_context()
log = run.log
stepped = [f"m{i}" for i in range(8)]
n = 0
t0 = time.monotonic()
for step in range(steps):
    v = float(step)
    for name in stepped:
        log(name, v, step=step)
        n += 1
        shared[0] = n
    log("u0", v)
    n += 1
    shared[0] = n
    log("u1", v)
    n += 1
    shared[0] = n
    shared[1 + step] = time.time_ns()
    if step % 50 == 0:
        ahead = t0 + n / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
time.sleep(600)
"""


def kill9_spool(info: Any, db: str, work: Path) -> str:
    from steplog import Experiment

    svc_env = info.env()
    svc_env["STEPLOG_DATABASE_URL"] = db
    log = ROOT / ".steplog" / "bench.log"
    svc = ServiceProcess(svc_env, log_path=log).start()
    address = svc.address
    run = Experiment("delivery-kill9", url=address).start_logging()
    spool = work / "kill9-spool"
    steps = 1_000_000
    shared_path = work / "kill9.shared"
    shared_path.write_bytes(b"\0" * 8 * (steps + 1))
    with open(shared_path, "r+b") as f:
        shared = memoryview(mmap.mmap(f.fileno(), 0)).cast("q")
    env = client_env(run.id, spool, STEPLOG_URL=address, STEPLOG_ON_FULL="spool")
    child = subprocess.Popen(
        [sys.executable, "-c", KILL9_SCRIPT, str(shared_path), str(steps), "50000"], env=env
    )
    deadline = time.monotonic() + 120
    while shared[0] == 0 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    time.sleep(1.5)
    svc.kill()  # batches in flight: their acks never come; the client spools
    time.sleep(random.uniform(1.0, 2.0))
    kill_ns = time.time_ns()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    svc = ServiceProcess(svc_env, port=svc.port, log_path=log).start()
    logged = int(shared[0])
    step_times = shared[1 : 1 + logged // 10 + 1].tolist()
    cutoff = kill_ns - int(FLUSH_INTERVAL * 1e9)
    done_steps = sum(1 for t in step_times if t)
    late_steps = sum(1 for t in step_times if t and t >= cutoff)
    in_last = late_steps * 10 + (logged - done_steps * 10)  # the partial step too
    before, _ = counts(db, COUNT_SQL, run.id)
    out = sync(spool, address)
    stored, _ = counts(db, COUNT_SQL, run.id)
    again = sync(spool, address)
    stored2, distinct2 = counts(db, COUNT_SQL, run.id)
    run.complete()
    svc.stop()
    return line(
        "kill9_spool",
        logged,
        stored2,
        distinct2,
        f" in_last_interval={in_last} stored_before_sync={before}"
        f" sync_rc={out.returncode} second_sync_rc={again.returncode}"
        f" second_sync_added={stored2 - stored}",
    )


# ---------------------------------------------------------- resume on a host

RESUME_SCRIPT = """
import os, signal, socket, sys, time
socket.gethostname = lambda: sys.argv[1]  # the host part of the writer id
from steplog import Run
start, stop, kill = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "kill"
run = Run.get_context()
for step in range(start, stop):
    for i in range(10):
        run.log(f"m{i}", float(step), step=step)
if kill:  # the first node dies: no close, no flush; after its last interval
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def resume_host(address: str, db: str, work: Path, hosts: tuple[str, str], name: str) -> str:
    from steplog import Experiment

    run = Experiment("delivery-resume", url=address).start_logging()
    spool = work / f"{name}-spool"
    env = client_env(run.id, spool, STEPLOG_OFFLINE="true")
    env.pop("STEPLOG_URL", None)
    half = 20_000
    codes = []
    for host, start, stop, kill in ((hosts[0], 0, half, "kill"), (hosts[1], half, 2 * half, "")):
        args = [sys.executable, "-c", RESUME_SCRIPT, host, str(start), str(stop), kill or "-"]
        codes.append(subprocess.run(args, env=env, timeout=600).returncode)
    first = sync(spool, address)
    stored, _ = counts(db, COUNT_SQL, run.id)
    second = sync(spool, address)
    stored2, distinct2 = counts(db, COUNT_SQL, run.id)
    run.complete()
    return line(
        name,
        2 * half * 10,
        stored2,
        distinct2,
        f" hosts={hosts[0]},{hosts[1]} exit_codes={codes[0]},{codes[1]}"
        f" sync_rc={first.returncode},{second.returncode} second_sync_added={stored2 - stored}",
    )


# ---------------------------------------------------------------- S3 outage


def s3_outage(stack: Any, address: str, db: str) -> str:
    from steplog import Experiment

    run = Experiment("delivery-s3", url=address).start_logging()
    duration, down_at, up_at = 40.0, 5.0, 25.0
    state: dict[str, Any] = {}
    logged_scalars = [0]

    def fault(t0: float) -> None:
        time.sleep(max(0.0, t0 + down_at - time.monotonic()))
        stack.stop_s3()
        time.sleep(max(0.0, t0 + up_at - 2.0 - time.monotonic()))
        state["logged_by"] = logged_scalars[0]
        time.sleep(max(0.0, t0 + up_at - 1.0 - time.monotonic()))
        state["stored_by"] = counts(db, COUNT_SQL, run.id)[1]
        time.sleep(max(0.0, t0 + up_at - time.monotonic()))
        stack.start_s3()

    t0 = time.monotonic()
    thread = threading.Thread(target=fault, args=(t0,), daemon=True)
    thread.start()
    images = 0
    tick = 0
    try:
        while time.monotonic() < t0 + duration:
            for i in range(5):
                run.log(f"m{i}", float(tick), step=tick)
            run.log("u0", float(tick))
            logged_scalars[0] += 6
            if tick % 10 == 0:
                run.log_image("sample", png(images), step=images)
                images += 1
            tick += 1
            ahead = t0 + tick * 0.01 - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    finally:
        thread.join()
    flushed = run.flush(600)
    s_stored, s_distinct = counts(db, COUNT_SQL, run.id)
    i_stored, i_distinct = counts(db, IMAGES_SQL, run.id)
    stats = run.writer_stats()
    run.complete()
    return line(
        "s3_outage",
        logged_scalars[0] + images,
        s_stored + i_stored,
        s_distinct + i_distinct,
        f" scalars={s_distinct}/{logged_scalars[0]} images={i_distinct}/{images}"
        f" scalars_in_outage={state.get('stored_by')}/{state.get('logged_by')}"
        f" s3_down_s={up_at - down_at:.0f} flushed={flushed} rejected={stats.rejected}",
    )


SCENARIOS = ("kill9_spool", "resume_host_desc", "resume_host_asc", "s3_outage")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", action="append", choices=SCENARIOS)
    ns = p.parse_args()
    chosen = ns.scenario or list(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="steplog-bench-delivery-"))
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cpus", flush=True)
    failed = False
    try:
        with bench_stack() as (stack, info, db), service(info, db) as svc:
            for name in chosen:
                if name == "kill9_spool":
                    out = kill9_spool(info, db, work)
                elif name == "resume_host_desc":
                    out = resume_host(svc.address, db, work, ("zz-node", "aa-node"), name)
                elif name == "resume_host_asc":
                    out = resume_host(svc.address, db, work, ("aa-node", "zz-node"), name)
                else:
                    out = s3_outage(stack, svc.address, db)
                print(out, flush=True)
                fields = dict(f.split("=", 1) for f in out.split()[1:] if "=" in f)
                allowed = int(fields.get("in_last_interval", "0"))  # kill -9's stated bound
                failed |= int(fields["doubled"]) != 0 or int(fields["lost"]) > allowed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
