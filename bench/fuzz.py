"""The long fuzz run: bench/hostile.py's generator at 100,000 messages (or
more) against the service on the bench stack (.steplog/bench, a fresh
database), with the same checks as tests/integration/test_fuzz.py.

    python -m bench.fuzz [--messages 100000] [--seed 9] [--threads 4]
                         [--rss-bound-mb 1536] [--only KIND,KIND]

Prints what went wrong (grouped, with the first case of each finding, which
reproduces with the same seed), then one line:

    FUZZ messages=... crashes=0 hangs=0 valid_lost=0 max_rss_mb=...

crashes: the service process died (or was killed for passing --rss-bound-mb,
so the machine survives a service that allocates without bound); hangs: calls
past their deadline plus health checks that did not answer SERVING within
2 s; valid_lost: valid points of mixed batches not stored, plus any stored
twice (checked by SQL). Exits 1 when any of them is not 0 or any call ended
UNKNOWN/INTERNAL, without a message, or against its expected status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import bench_stack, service
from bench.hostile import Fuzzer, Report, missing_and_doubled, stored_rows


def _progress(r: Report) -> None:
    print(
        f"... {r.messages} messages, {len(r.findings)} findings, max_rss_mb={r.max_rss_mb:.0f}",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--rss-bound-mb", type=float, default=1536.0)
    p.add_argument("--health-bound-s", type=float, default=2.0)
    p.add_argument("--only", default="", help="comma-separated case kinds (default: all)")
    ns = p.parse_args()
    kinds = None
    if ns.only:
        weights = dict(Fuzzer.KINDS)
        kinds = {k: weights[k] for k in ns.only.split(",")}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with bench_stack() as (_stack, info, db), service(info, db) as svc:
        assert svc.proc is not None
        fuzzer = Fuzzer(
            svc.address,
            seed=ns.seed,
            pid=svc.proc.pid,
            threads=ns.threads,
            health_bound_s=ns.health_bound_s,
            rss_kill_mb=ns.rss_bound_mb,
            kinds=kinds,
        )
        try:
            report = fuzzer.run(ns.messages, progress=_progress)
        finally:
            fuzzer.close()
        crashed = svc.proc.poll() is not None
        missing, doubled = missing_and_doubled(fuzzer.valid, stored_rows(db, fuzzer.ctx.valid_runs))
    crashes = max(report.crashes, int(crashed))
    print(f"started {started}, seed {ns.seed}, {os.cpu_count()} cpus")
    print(report.summary(limit=200))
    print(
        f"FUZZ messages={report.messages} crashes={crashes} hangs={report.hangs}"
        f" valid_lost={missing + doubled} max_rss_mb={report.max_rss_mb:.0f}"
        f" findings={len(report.findings)} valid_points={report.valid_points}"
        f" doubled={doubled} max_health_s={report.max_health_s:.3f}"
        f" elapsed_s={report.elapsed_s:.0f} seed={ns.seed}"
    )
    bad = crashes or report.hangs or missing or doubled or report.findings
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
