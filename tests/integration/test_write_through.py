"""Write-through of the read cache (ingest/store/columns.py BlockCache,
STEPLOG_READ_CACHE_WRITE_THROUGH): the blocks a commit or a compaction
stores are put into the service's cache once committed, under the key a
read lists them by, (block_id, xmin). Checked through the real service:
the first chart read after writing sends no block (the cache's bytes,
steplog_query_block_cache_bytes, do not move: a block a read had to fetch
is put into the cache), and every answer equals, byte for byte, the answer
of a second service reading the same database with an empty cache; after
a rewind hides points inside cached blocks, after the service's
compaction replaced rows and small blocks, with NaN, -0.0 and both
infinities; and the cache stays within its bound."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import scrape
from steplog import Experiment
from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs
from tests.sql import fetch
from tests.support import ProtoClient, ServiceProcess, free_port
from tests.support import scalar_series as series

OOO = data_pb2.STEP_POLICY_OUT_OF_ORDER
CACHE = "steplog_query_block_cache_bytes"


def wave(steps: range | list[int]) -> list[float]:
    out = []
    for s in steps:
        v = math.sin(s / 23.0) * (1 + s % 7)
        if s % 101 == 3:
            v = math.nan
        elif s % 157 == 5:
            v = math.inf
        elif s % 199 == 7:
            v = -math.inf
        elif s % 233 == 9:
            v = -0.0
        out.append(v)
    return out


@contextmanager
def service(env: dict[str, str], log: Path, **extra: str) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(env | extra, metrics_port=free_port(), log_path=log).start()
    try:
        yield proc
    finally:
        proc.stop()


def answers(address: str, run_id: str, names: list[str], max_points: int) -> list[bytes]:
    """The chart (ReadCharts, every page) and each series whole (ReadSeries,
    every page), as encoded messages: what to compare byte for byte."""
    raw = ProtoClient(address, prefix="wt", strict=True)
    chart = qs.ReadChartsRequest(
        workspace="default",
        run_id=run_id,
        series=[qs.SeriesRef(name=n) for n in names],
        max_points=max_points,
    )
    out = [c.SerializeToString() for page in raw.pages("ReadCharts", chart) for c in page.series]
    for name in names:
        out += [page.series.scalars.SerializeToString() for page in raw.read_all(run_id, name)]
    return out


def cold(
    env: dict[str, str], log: Path, run_id: str, names: list[str], max_points: int
) -> list[bytes]:
    """The same reads on a service of its own: its cache empty, every block
    sent by PostgreSQL."""
    with service(env, log) as proc:
        assert scrape(proc.metrics_port, CACHE) == 0
        got = answers(proc.address, run_id, names, max_points)
        assert scrape(proc.metrics_port, CACHE) > 0
    return got


def test_the_first_read_after_writing_is_served_from_the_cache_and_equals_a_cold_read(
    service_env: dict[str, str], experiment_name: str, tmp_path: Path
) -> None:
    names = ["plain", "long", "ooo", "few"]
    with service(service_env, tmp_path / "a.log") as proc:
        run = Experiment(experiment_name, url=proc.address).start_logging()
        raw = ProtoClient(proc.address, prefix="wt", strict=True)
        for k in range(4):
            steps = range(700 * k, 700 * k + 700)
            raw.write(run.id, series("plain", list(steps), wave(steps)))
        # More than 4,096 points in one commit: a block a piece.
        steps = range(0, 9000)
        raw.write(run.id, series("long", list(steps), wave(steps)))
        # Out of order in one commit: stored steps, a step written twice
        # (the first hidden inside the new block).
        ooo = [40, 3, 17, 17, 90, 2, *range(100, 140)]
        raw.write(run.id, series("ooo", ooo, wave(ooo), step_policy=OOO))
        # Fewer than 16 points a commit: rows, beside a block.
        raw.write(run.id, series("few", list(range(50)), wave(range(50))))
        raw.write(run.id, series("few", [50, 51, 52], [math.nan, -0.0, math.inf]))
        held = scrape(proc.metrics_port, CACHE)
        assert held > 0  # put there by the commits; nothing read yet
        first = answers(proc.address, run.id, names, 120)
        # Every block came from the cache (a block fetched is put into it).
        assert scrape(proc.metrics_port, CACHE) == held
        assert answers(proc.address, run.id, names, 120) == first
        run.complete()
    assert cold(service_env, tmp_path / "b.log", run.id, names, 120) == first
    assert len(first) > len(names)


def test_a_rewind_inside_cached_blocks_then_more_points_read_like_a_cold_read(
    service_env: dict[str, str], experiment_name: str, tmp_path: Path
) -> None:
    """A rewind hides points inside blocks the commits cached (those rows
    are updated: a new xmin each); an out-of-order rewrite hides points of
    older blocks in the commit that stores the new one; then more points."""
    names = ["rw", "ooo"]
    with service(service_env, tmp_path / "a.log") as proc:
        run = Experiment(experiment_name, url=proc.address).start_logging()
        raw = ProtoClient(proc.address, prefix="wt", strict=True)
        for k in range(3):
            steps = range(1000 * k, 1000 * k + 1000)
            raw.write(run.id, series("rw", list(steps), wave(steps)))
        evens, odds = list(range(0, 2000, 2)), list(range(1, 2000, 2))
        raw.write(run.id, series("ooo", evens, wave(evens), step_policy=OOO))
        raw.write(run.id, series("ooo", odds, [-v for v in wave(odds)], step_policy=OOO))
        before = answers(proc.address, run.id, names, 90)
        assert run.rewind(1499, names=["rw"]) == 1500
        again = list(range(1500, 2300))
        raw.write(run.id, series("rw", again, [float(s) for s in again]))
        raw.write(run.id, series("ooo", list(range(300, 500)), [7.0] * 200, step_policy=OOO))
        after = answers(proc.address, run.id, names, 90)
        assert after != before
        assert run.get_series("rw")["steps"] == list(range(2300))
        run.complete()
    assert cold(service_env, tmp_path / "b.log", run.id, names, 90) == after


def _left_to_compact(database_url: str, run_id: str) -> int:
    rows = fetch(
        database_url,
        "SELECT (SELECT count(*) FROM scalar_rows r JOIN series s USING (series_id)"
        "        WHERE s.run_id = $1)"
        " + (SELECT count(*) FROM scalar_compact_candidates(0, 1000000) c"
        "    JOIN series s USING (series_id) WHERE s.run_id = $1) AS n",
        run_id,
    )
    return int(rows[0]["n"])


def test_blocks_the_service_compacts_are_served_from_the_cache(
    own_database: dict[str, str], experiment_name: str, tmp_path: Path
) -> None:
    """Small commits (rows) and small blocks, compacted by the service's own
    sweep into new blocks: the first read after it sends no block and equals
    a cold read."""
    service_env = own_database
    database_url = service_env["STEPLOG_DATABASE_URL"]
    names = [f"s{j}" for j in range(3)]
    with service(service_env, tmp_path / "a.log", STEPLOG_COMPACT_INTERVAL_S="0.1") as proc:
        run = Experiment(experiment_name, url=proc.address).start_logging()
        raw = ProtoClient(proc.address, prefix="wt", strict=True)
        step = 0
        for k in range(30):
            # Alternately a few points (rows) and a small block.
            n = 5 if k % 2 else 40
            steps = list(range(step, step + n))
            step += n
            raw.write(run.id, *(series(name, steps, wave(steps)) for name in names))
        until = time.monotonic() + 60
        while _left_to_compact(database_url, run.id) and time.monotonic() < until:
            time.sleep(0.1)
        assert _left_to_compact(database_url, run.id) == 0
        assert scrape(proc.metrics_port, "steplog_compaction_blocks_written_total") > 0
        time.sleep(0.3)  # a round under way ends
        held = scrape(proc.metrics_port, CACHE)
        first = answers(proc.address, run.id, names, 60)
        assert scrape(proc.metrics_port, CACHE) == held
        run.complete()
    assert cold(service_env, tmp_path / "b.log", run.id, names, 60) == first
    blocks = fetch(
        database_url,
        "SELECT count(*) AS n FROM scalar_blocks b JOIN series s USING (series_id)"
        " WHERE s.run_id = $1",
        run.id,
    )
    # 15 commits of blocks and 15 of rows each, merged into one small block
    # a series (two if the run straddled a 2,000-second cell).
    assert int(blocks[0]["n"]) <= 2 * len(names)


def test_written_blocks_stay_within_the_cache_bound_and_write_through_can_be_off(
    service_env: dict[str, str], experiment_name: str, tmp_path: Path
) -> None:
    names = [f"c{k}" for k in range(4)]
    steps = np.arange(20_000)
    for bound, through in ((300_000, "true"), (256 * 1024 * 1024, "false")):
        with service(
            service_env,
            tmp_path / f"a-{through}.log",
            STEPLOG_READ_CACHE_BYTES=str(bound),
            STEPLOG_READ_CACHE_WRITE_THROUGH=through,
        ) as proc:
            run = Experiment(f"{experiment_name}-{through}", url=proc.address).start_logging()
            run.log_batch({n: np.sin(steps / (k + 3.0)) for k, n in enumerate(names)}, steps=steps)
            assert run.flush(timeout=60)
            held = scrape(proc.metrics_port, CACHE)
            if through == "true":
                # 4 x 20,000 points are 1.3 MB decoded: only the last fit.
                assert 0 < held <= bound, held
            else:
                assert held == 0
            first = answers(proc.address, run.id, names, 600)
            assert 0 < scrape(proc.metrics_port, CACHE) <= bound
            run.complete()
        assert cold(service_env, tmp_path / f"b-{through}.log", run.id, names, 600) == first
