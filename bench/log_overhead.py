"""Client overhead: the time `run.log()` takes on the training thread, with
the service up and with it down (until the memory bound).

    python -m bench.log_overhead [--calls 200000]

Prints `LOG_OVERHEAD median_us=... p99_us=... down_median_us=... down_p99_us=...`.
Each call is timed with perf_counter_ns around it; the timer's own cost
(measured on an empty call) is subtracted.
"""

from __future__ import annotations

import argparse
import gc
import time

from bench.common import bench_stack, median, percentile, service
from tests.support import free_port


def _measure(run: object, calls: int) -> list[float]:
    log = run.log  # type: ignore[attr-defined]
    clock = time.perf_counter_ns
    out = [0.0] * calls
    names = [f"m{i % 10}" for i in range(10)]
    gc.disable()
    try:
        for i in range(calls):
            name = names[i % 10]
            t = clock()
            log(name, 0.5, step=i)
            out[i] = (clock() - t) / 1000.0
    finally:
        gc.enable()
    return out


def _timer_cost(n: int = 100_000) -> float:
    clock = time.perf_counter_ns
    xs = []
    for _ in range(n):
        t = clock()
        xs.append(clock() - t)
    return median([x / 1000.0 for x in xs])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200_000)
    ns = p.parse_args()
    from steplog import Experiment
    from steplog.client import Client
    from steplog.run import Run

    cost = _timer_cost()
    with bench_stack() as (_s, info, db), service(info, db) as svc:
        run = Experiment("overhead", url=svc.address).start_logging()
        _measure(run, 20_000)  # warm up
        up = _measure(run, ns.calls)
        run.flush(120)
        run.complete()
    # Service down: a client pointed at a port nobody listens on.
    down_client = Client(f"127.0.0.1:{free_port()}", "default")
    from steplog.v1 import common_pb2

    fake = common_pb2.Run(run_id="offline-bench", status=common_pb2.RUN_STATUS_RUNNING)
    down_run = Run(_proto=fake, _client=down_client)
    down = _measure(down_run, ns.calls)
    up_us = [max(0.0, x - cost) for x in up]
    down_us = [max(0.0, x - cost) for x in down]
    print(
        f"LOG_OVERHEAD median_us={median(up_us):.2f} p99_us={percentile(up_us, 0.99):.2f}"
        f" down_median_us={median(down_us):.2f} down_p99_us={percentile(down_us, 0.99):.2f}"
        f" calls={ns.calls} timer_cost_us={cost:.3f}"
    )


if __name__ == "__main__":
    main()
