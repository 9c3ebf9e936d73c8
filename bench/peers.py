"""W1 against a peer in the same invocation: MLflow's tracking server on the
same PostgreSQL, fed W1's workload through `MlflowClient.log_batch`.

    make bench-peers          (installs MLflow into .steplog/peers-venv first)
    python -m bench.peers [--writers 4] [--names 50] [--steps 1500] [--workers 4]

Both on the bench stack (.steplog/bench), each in a fresh database of its
own, one after the other (never at the same time):

1. steplog: bench/w1_firehose.py's `firehose` (W writer processes, each its
   own run, K names x S steps through `run.log` in a plain loop, until every
   point is acknowledged), the stored count by SQL.
2. MLflow (the peers virtualenv's `mlflow server`, as MLflow documents a
   shared tracking server: `--backend-store-uri postgresql://...` on the
   same PostgreSQL server, `--workers 4`, its default; artifacts proxied to
   a local folder under .steplog/peers, which this metrics-only workload
   never touches): the same W x K x S points from W writer processes
   through `MlflowClient.log_batch`, 1,000 metrics per call
   (bench/mlflow_w1.py), until the last call returned; the stored count by
   SQL on MLflow's `metrics` table.

Prints

    W1_PEER mlflow_points_per_s=... steplog_points_per_s=... speedup=...

The default size (4 x 50 x 1,500 = 300,000 points, 6% of W1's 5,000,000)
lets MLflow finish in about three minutes on a shared 2-core machine (it
stored about 1,600 points/s there); both systems log the same points, so
steplog's figure here includes more of its start-up than W1's does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from typing import Any

from bench.common import (
    ROOT,
    bench_stack,
    cpu_seconds,
    free_port,
    postmaster_pid,
    service,
    sql,
)
from bench.w1_firehose import firehose

PEERS_VENV = ROOT / ".steplog" / "peers-venv"
PEERS_DIR = ROOT / ".steplog" / "peers"
HEALTHCHECK_S = 120  # uvicorn --timeout-worker-healthcheck for MLflow's workers


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to the server's process group (it and its workers), SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def mlflow_w1(
    database_url: str, postgres: int, writers: int, names: int, steps: int, workers: int
) -> dict[str, Any]:
    """MLflow's server on `database_url`, W1's workload through it; its
    result (bench/mlflow_w1.py's JSON) with the stored count added."""
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = PEERS_DIR / "mlartifacts"
    log = open(PEERS_DIR / "mlflow-server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(PEERS_VENV / "bin" / "mlflow"),
            "server",
            "--backend-store-uri",
            # psycopg2 named: SQLAlchemy 2.1 takes psycopg (3) for plain postgresql://
            database_url.replace("postgresql://", "postgresql+psycopg2://", 1),
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            # uvicorn kills a worker that does not answer its health check
            # within 5 s (its default); on a loaded 2-core machine MLflow's
            # workers take longer to start, and were killed in a loop.
            "--uvicorn-opts",
            f"--timeout-worker-healthcheck {HEALTHCHECK_S}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=PEERS_DIR,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, 300)
        before = (cpu_seconds(proc.pid), cpu_seconds(postgres))
        res = subprocess.run(
            [
                str(PEERS_VENV / "bin" / "python"),
                str(ROOT / "bench" / "mlflow_w1.py"),
                "--url",
                url,
                "--writers",
                str(writers),
                "--names",
                str(names),
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
        )
        if res.returncode != 0:
            raise SystemExit(f"bench/mlflow_w1.py failed: {res.stderr[-3000:]}")
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        out["server_cpu_s"] = cpu_seconds(proc.pid) - before[0]
        out["postgres_cpu_s"] = cpu_seconds(postgres) - before[1]
    finally:
        stop_group(proc)
    ids = ",".join(f"'{r}'" for r in out["run_ids"])
    out["stored"] = int(
        sql(database_url, f"SELECT count(*) FROM metrics WHERE run_uuid IN ({ids})")
    )  # type: ignore[call-overload]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--steps", type=int, default=1_500)
    p.add_argument("--workers", type=int, default=4, help="mlflow server --workers")
    ns = p.parse_args()
    if not (PEERS_VENV / "bin" / "mlflow").exists():
        raise SystemExit(f"no MLflow in {PEERS_VENV}: `make bench-peers` installs it")
    total = ns.writers * ns.names * ns.steps
    with bench_stack() as (stack, info, db):
        postgres = postmaster_pid(stack)
        with service(info, db) as svc:
            assert svc.proc is not None
            before = (cpu_seconds(svc.proc.pid), cpu_seconds(postgres))
            w1 = firehose(svc, db, ns.writers, ns.names, ns.steps)
            cpu = (cpu_seconds(svc.proc.pid) - before[0], cpu_seconds(postgres) - before[1])
        name = f"bench_mlflow_{uuid.uuid4().hex[:8]}"
        mdb = stack.create_database(name)
        try:
            m = mlflow_w1(mdb, postgres, ns.writers, ns.names, ns.steps, ns.workers)
        finally:
            stack.drop_database(name)
    mrate = m["points"] / m["elapsed_s"]
    version = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), "-c", "import mlflow; print(mlflow.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        f"W1_PEER mlflow_points_per_s={mrate:.0f} steplog_points_per_s={w1.rate:.0f}"
        f" speedup={w1.rate / mrate:.1f} points={total} mlflow_stored={m['stored']}"
        f" steplog_stored={w1.stored} mlflow_elapsed_s={m['elapsed_s']:.1f}"
        f" steplog_elapsed_s={w1.elapsed:.1f} writers={ns.writers} mlflow_workers={ns.workers}"
        f" mlflow_server_cpu_us_per_point={m['server_cpu_s'] * 1e6 / total:.1f}"
        f" mlflow_postgres_cpu_us_per_point={m['postgres_cpu_s'] * 1e6 / total:.1f}"
        f" steplog_service_cpu_us_per_point={cpu[0] * 1e6 / total:.2f}"
        f" steplog_postgres_cpu_us_per_point={cpu[1] * 1e6 / total:.2f}"
        f" mlflow_version={version} cpus={os.cpu_count()}",
        flush=True,
    )
    if m["stored"] != total or w1.stored != total:
        raise SystemExit(f"stored mlflow={m['stored']} steplog={w1.stored}, logged {total}")


if __name__ == "__main__":
    main()
