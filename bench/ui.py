"""UI: the compare page for 20 runs x 10 series x 100,000 points in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The runs and their series are created through the service (the SDK logs the
first point of each series); the other 99,999 points of each series go
straight into scalar_blocks with the binary COPY the service itself uses
(`ingest.store.blocks.encode_blocks_copy`, blocks of 1,000 points), so loading 20 million points
takes seconds. Each series holds a NaN and a spike. Then, against a fresh
`steplog-ingest ui`:

- query_ms: one downsampled chart request (one metric, 20 runs, 2,000,000
  points, 1,200 px wide) over HTTP, median of 7 after a warm-up;
- first_chart_ms: from navigation start to the first chart drawn on the
  compare page of the 20 runs and 10 metrics (performance.now() at the
  first uPlot draw, as the page records it in window.steplog.firstChartMs),
  median of 3 page loads.

Prints `UI first_chart_ms=... query_ms=...` (targets: 1500 and 200).

    python -m bench.ui [--runs 20] [--series 10] [--points 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.common import ROOT, bench_stack, free_port, median, service

CHROMIUM = "/usr/bin/chromium"


class UiProcess:
    """`python -m ingest ui` on a free loopback port, ready when /healthz answers."""

    def __init__(self, env: Mapping[str, str], log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = dict(os.environ)
        self.env.update(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> UiProcess:
        out: IO[bytes] | int = (
            open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "ui", "--listen", f"127.0.0.1:{self.port}"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        if not isinstance(out, int):
            out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                said = self.log_path.read_text()[-2000:] if self.log_path else ""
                raise RuntimeError(f"ui exited with code {self.proc.returncode}: {said}")
            try:
                with urllib.request.urlopen(self.url + "healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ui did not answer on {self.url} within {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.url.rstrip("/") + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def __enter__(self) -> UiProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def series_values(points: int, seed: int) -> np.ndarray[Any, Any]:
    """A loss-like curve with noise, one NaN and one spike (x50) in the middle."""
    rng = np.random.default_rng(seed)
    steps = np.arange(points, dtype=np.float64)
    v = 2.5 * np.exp(-steps / (points / 4)) + 0.05 + rng.normal(0, 0.01, points)
    v[points // 3] = np.nan
    v[2 * points // 3] = 50.0
    return v


def load(grpc_url: str, database_url: str, runs: int, series: int, points: int) -> list[str]:
    """Runs through the service, then the points by binary COPY; the run ids."""
    import asyncpg

    from ingest.store.blocks import BLOCK_COLUMNS, Block, encode_blocks_copy, to_pg_us
    from steplog import Experiment

    exp = Experiment("ui-bench", url=grpc_url)
    ids = []
    for r in range(runs):
        run = exp.start_logging(display_name=f"run-{r:02d}")
        run.tag("lr", str([0.1, 0.01][r % 2]))
        for k in range(series):
            run.log(f"metric_{k}", 0.0, step=0)
        run.flush()
        run.complete()
        ids.append(run.id)

    async def copy() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT series_id, run_id, name FROM series WHERE run_id = ANY($1::text[])", ids
            )
            now = time.time()
            for i, row in enumerate(rows):
                steps = np.arange(1, points, dtype=np.int64)
                values = series_values(points, i)[1:]
                times = now - points + steps.astype(np.float64)
                # As the service stores them (migration 010): blocks, here of
                # 1,000 points each (a commit's worth of one series).
                blocks = [
                    Block(
                        row["series_id"],
                        to_pg_us(times[k : k + 1000]),
                        steps[k : k + 1000],
                        values[k : k + 1000],
                    )
                    for k in range(0, steps.size, 1000)
                ]
                payload, _ = encode_blocks_copy(blocks)
                await conn.copy_to_table(
                    "scalar_blocks",
                    source=io.BytesIO(payload),
                    columns=BLOCK_COLUMNS,
                    format="binary",
                )
            await conn.execute(
                "UPDATE series SET point_count = $2, last_step = $3, last_value = 0.05"
                " WHERE run_id = ANY($1::text[])",
                ids,
                points,
                points - 1,
            )
            await conn.execute("ANALYZE scalar_blocks")
        finally:
            await conn.close()

    asyncio.run(copy())
    return ids


def chart_path(ids: list[str], fmt: str) -> str:
    return f"/api/chart?metric=metric_0&runs={','.join(ids)}&width=1200&format={fmt}"


def get_chart(ui: UiProcess, ids: list[str], fmt: str) -> dict[str, Any]:
    """One chart request; its answer's JSON part (the binary body's header)."""
    with urllib.request.urlopen(ui.url.rstrip("/") + chart_path(ids, fmt), timeout=120) as r:
        body = r.read()
        status = r.status
    if fmt == "binary":
        (n,) = struct.unpack_from("<I", body)
        got: dict[str, Any] = json.loads(body[4 : 4 + n])
    else:
        got = json.loads(body)
    if status != 200 or not got["series"] or not got["series"][0]["downsampled"]:
        raise SystemExit(f"chart query failed: {status} {str(got)[:300]}")
    return got


def measure_query(ui: UiProcess, ids: list[str], fmt: str, repeats: int = 7) -> float:
    """Median ms of one chart request over HTTP, after a warm-up."""
    get_chart(ui, ids, fmt)  # warm-up: connections, plans, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        get_chart(ui, ids, fmt)
        times.append((time.perf_counter() - start) * 1000)
    return median(times)


class Browser:
    """Headless Chromium; each page load in a new page (no shared HTTP cache)."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        self.last: dict[str, float] = {}

    def first_chart_ms(
        self, url: str, screenshot: Path | None = None, wait_all: bool = False
    ) -> float:
        """Navigation start to the first chart drawn (window.steplog.firstChartMs)."""
        page = self.browser.new_page(viewport={"width": 1400, "height": 900}, bypass_csp=True)
        try:
            page.goto(url)
            page.wait_for_function(
                "window.steplog && window.steplog.firstChartMs !== undefined", timeout=120_000
            )
            ms = float(page.evaluate("window.steplog.firstChartMs"))
            self.last = page.evaluate(
                "(({ms, fetchMs, buildMs, drawMs}) => ({ms, fetchMs, buildMs, drawMs}))"
                "(Object.values(window.steplog.charts)[0] || {})"
            )
            if wait_all or screenshot is not None:
                page.wait_for_function("window.steplog.ready === true", timeout=600_000)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=False)
            return ms
        finally:
            page.close()

    def warm_up(self, url: str) -> None:
        """A page of the UI that draws no chart: Chromium's own start is not counted."""
        page = self.browser.new_page(bypass_csp=True)
        try:
            page.goto(url)
            page.wait_for_load_state("networkidle")
        finally:
            page.close()

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--screenshot", default="")
    args = ap.parse_args()
    with bench_stack() as (_stack, info, url), service(info, url) as svc:
        started = time.perf_counter()
        ids = load(svc.address, url, args.runs, args.series, args.points)
        loaded = time.perf_counter() - started
        total = args.runs * args.series * args.points
        print(f"  loaded runs={args.runs} series={args.series} points={total} in {loaded:.1f} s")
        env = info.env()
        env["STEPLOG_DATABASE_URL"] = url
        metrics = ",".join(f"metric_{k}" for k in range(args.series))
        page = f"#/compare?runs={','.join(ids)}&metrics={metrics}&exp=ui-bench"
        log_path = ROOT / ".steplog" / "bench-ui.log"
        browser = Browser()
        with tempfile.TemporaryDirectory(prefix="steplog-ui-cache-") as cache_dir:
            env["STEPLOG_UI_CACHE_DIR"] = cache_dir
            try:
                with UiProcess(env, log_path) as ui:
                    # The first view ever: every summary computed from the database.
                    browser.warm_up(ui.url)
                    first_ms = browser.first_chart_ms(ui.url + page, wait_all=True)
                    query_ms = measure_query(ui, ids, "binary")
                    query_json_ms = measure_query(ui, ids, "json")
                    shot = Path(args.screenshot) if args.screenshot else None
                    # Each load waits for all its charts (the next starts on an idle
                    # server) and, as after a restart, follows the home page (the
                    # browser is not still tearing down the last ten charts).
                    warm = []
                    for i in range(3):
                        browser.warm_up(ui.url)
                        warm.append(
                            browser.first_chart_ms(ui.url + page, shot if i == 2 else None, True)
                        )
                # A restarted UI process: its summaries from its cache files.
                cold = []
                for _ in range(args.restarts):
                    with UiProcess(env, log_path) as ui:
                        browser.warm_up(ui.url)
                        cold.append(browser.first_chart_ms(ui.url + page))
            finally:
                browser.close()
    print(
        f"  first_chart warm={[round(v) for v in warm]} cold={[round(v) for v in cold]}"
        f" first_view={first_ms:.0f} query_json_ms={query_json_ms:.0f}"
    )
    print(
        f"UI first_chart_ms={median(warm):.0f} first_chart_cold_ms={median(cold):.0f}"
        f" first_view_ms={first_ms:.0f} query_ms={query_ms:.0f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
