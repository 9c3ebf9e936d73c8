"""`make bench`: every benchmark, one after the other, on the same machine.
`make bench-peers` (bench/peers.py, W1 against MLflow) is not in the list: it
needs MLflow's virtualenv and takes minutes more."""

from __future__ import annotations

import subprocess
import sys

BENCHES = [
    "bench.log_overhead",
    "bench.w1_firehose",  # W1 (fair ceiling) and STORAGE (blocks and rows)
    "bench.bulk_log",  # BULK (run.log_batch from numpy arrays)
    "bench.w2_streams",  # W2 (with W1 through the service as its reference)
    "bench.read_series",  # READ
    "bench.bench_rows",
    "bench.bench_blobs",
    "bench.delivery",
]


def main() -> None:
    failed = 0
    for module in BENCHES + sys.argv[1:]:
        print(f"== {module}", flush=True)
        failed += subprocess.call([sys.executable, "-m", module]) != 0
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
