"""The benchmarks of issue 13 run at a tiny size and print their lines (a
smoke test of the scripts, not a measurement: no figure is checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ingest.devstack import LocalStack
from tests.support import ROOT

CASES = [
    (
        ["bench.w1_firehose", "--writers", "1", "--names", "2", "--steps", "200"],
        [
            "STORAGE bytes_per_point=",
            "layout=blocks",
            "layout=row_per_point",
            "W1 points_per_s=",
            "postgres_cpu_us_per_point=",
        ],
    ),
    (
        ["bench.bulk_log", "--series", "3", "--steps", "2000", "--chunk", "500"],
        ["BULK points_per_s=", "stored=6000 "],
    ),
    (
        [
            "bench.w2_streams",
            "--ranks", "6", "--series", "2", "--steps", "50", "--processes", "2",
            "--w1-writers", "1", "--w1-names", "2",
        ],
        [
            "W2 points_per_s=",
            "ranks_stored=6 ",
            "stored=600 ",
            "service_cpu_us_per_point=",
            "w1_client_cpu_us_per_point=",
            "STORAGE_W2 bytes_per_point=",
        ],
    ),
    (
        [
            "bench.read_series",
            "--long", "3000", "--series", "3", "--points", "2000", "--repeat", "1",
        ],
        ["READ full_ms=", "nan_kept=True inf_kept=True neg_inf_kept=True", "layout=row_per_point"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[c[0][0] for c in CASES])
def test_bench_script_prints_its_line(
    stack: LocalStack, args: list[str], expected: list[str]
) -> None:
    env = dict(os.environ, STEPLOG_BENCH_STACK=str(stack.root))
    res = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for text in expected:
        assert text in res.stdout, res.stdout
