"""10,000 hostile messages against a real service (bench/hostile.py makes them).

The service runs as its own subprocess on the session database, so a crash
here fails this test only; a second process on the same database (the peer)
takes half of the mixed batches and one copy of each raced first batch.
Checked: no process dies, no call passes its deadline, a health check answers
SERVING within 2 s after every 250 messages, no error is UNKNOWN or INTERNAL
and each has a message, every rejection has a reason, the RSS stays under
1.5 GiB, and every valid point of the mixed batches is stored, once, by SQL.
The seed is fixed: a finding names the case that reproduces it
(`Fuzzer(seed=9)`, case N)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.hostile import STORED_SQL, Fuzzer, missing_and_doubled
from tests.sql import fetch
from tests.support import ServiceProcess

MESSAGES = 10_000
SEED = 9
RSS_BOUND_MB = 1536  # 1.5 GiB, the service process and its children
HEALTH_BOUND_S = 2.0
# Usually 50-80 s; a hard stop that a loaded machine stays inside (it took
# 154 s for half the messages while a benchmark shared the two cores).
TIME_LIMIT_S = 480.0


@pytest.mark.timeout(TIME_LIMIT_S + 120)
def test_ten_thousand_hostile_messages(
    service_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "service.log"
    svc = ServiceProcess(service_env, log_path=log).start()
    peer = ServiceProcess(service_env, log_path=tmp_path / "peer.log").start()
    assert svc.proc is not None and peer.proc is not None
    fuzzer = Fuzzer(
        svc.address,
        peer=peer.address,
        seed=SEED,
        pid=svc.proc.pid,
        threads=8,
        call_timeout=20.0,
        health_every=250,
        health_bound_s=HEALTH_BOUND_S,
        rss_kill_mb=RSS_BOUND_MB,
    )
    try:
        report = fuzzer.run(MESSAGES, time_limit_s=TIME_LIMIT_S)
        alive = svc.proc.poll() is None and peer.proc.poll() is None
        rows = [tuple(r) for r in fetch(database_url, STORED_SQL, fuzzer.ctx.valid_runs)]
    finally:
        fuzzer.close()
        svc.stop()
        peer.stop()
    missing, doubled = missing_and_doubled(fuzzer.valid, rows)
    summary = report.summary()
    print(summary)
    assert alive and report.crashes == 0, f"the service died (log: {log})\n{summary}"
    assert report.messages >= MESSAGES, f"only {report.messages} messages in time\n{summary}"
    assert report.hangs == 0, summary
    assert report.findings == [], summary
    assert report.max_rss_mb < RSS_BOUND_MB, summary
    assert report.valid_points > 1000, summary
    assert (missing, doubled) == (0, 0), f"valid points missing={missing} doubled={doubled}"
