"""W1's workload through MLflow's client, for `python -m bench.peers`: W
writer processes, each with its own MLflow run, each logging K metric names
x S steps with `MlflowClient.log_batch`, 1,000 metrics per call (MLflow's
documented limit per batch: 1,000 metrics), timed from their common start
until the last call has returned (log_batch is synchronous: a returned call
is stored). Prints one JSON line: {"elapsed_s", "points", "run_ids"}.

Runs under the peers virtualenv (.steplog/peers-venv, `make bench-peers`),
which has MLflow and not steplog, so it imports nothing from this project:

    .steplog/peers-venv/bin/python bench/mlflow_w1.py --url http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for log_batch
WARMUP_CALLS = 8


def _writer(url: str, experiment_id: str, names: int, steps: int, ready: Any, out: Any) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run_id = client.create_run(experiment_id).info.run_id
    keys = [f"metric_{i:02d}" for i in range(names)]
    ready.wait()
    start = time.perf_counter()
    batch: list[Any] = []
    for step in range(steps):
        v = 1.0 / (step + 1)
        ts = int(time.time() * 1000)
        for k in keys:
            batch.append(Metric(k, v, ts, step))
            if len(batch) == MAX_METRICS_PER_BATCH:
                client.log_batch(run_id, metrics=batch)
                batch = []
    if batch:
        client.log_batch(run_id, metrics=batch)
    elapsed = time.perf_counter() - start
    client.set_terminated(run_id)
    out.put((run_id, elapsed))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--steps", type=int, default=5_000)
    ns = p.parse_args()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ns.url)
    # Every server worker opens its store on its first request: concurrent
    # requests before the clock, so that no logged batch pays for it.
    with ThreadPoolExecutor(WARMUP_CALLS) as pool:
        list(pool.map(lambda _: client.search_experiments(), range(4 * WARMUP_CALLS)))
    name = f"w1-{time.time_ns()}"
    try:
        experiment_id = client.create_experiment(name)
    except MlflowException as exc:
        # MLflow's client retries a create whose answer was slow; the retry
        # then finds the experiment the first attempt made.
        if "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
        experiment_id = client.get_experiment_by_name(name).experiment_id
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(ns.writers + 1)
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(ns.url, experiment_id, ns.names, ns.steps, ready, out))
        for _ in range(ns.writers)
    ]
    for pr in procs:
        pr.start()
    ready.wait(300)
    t0 = time.perf_counter()
    results = [out.get(timeout=3600) for _ in procs]
    elapsed = time.perf_counter() - t0
    for pr in procs:
        pr.join()
    points = ns.writers * ns.names * ns.steps
    print(
        json.dumps(
            {
                "elapsed_s": elapsed,
                "points": points,
                "run_ids": [r[0] for r in results],
                "each_writer_s": sorted(r[1] for r in results),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
