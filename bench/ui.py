"""UI: the compare page for 20 runs x 10 series x 100,000 points in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The runs and their series are created through the service (the SDK logs the
first point of each series); the other 99,999 points of each series go
straight into scalar_points with the binary COPY the service itself uses
(`ingest.store.copy.encode_scalar_copy`), so loading 20 million points
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
import subprocess
import sys
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

    def start(self, timeout: float = 30.0) -> UiProcess:
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

    from ingest.store.copy import SCALAR_COLUMNS, encode_scalar_copy
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
                payload = encode_scalar_copy(
                    times, np.full(steps.size, row["series_id"], dtype=np.int64), steps, values
                )
                await conn.copy_to_table(
                    "scalar_points",
                    source=io.BytesIO(payload),
                    columns=SCALAR_COLUMNS,
                    format="binary",
                )
            await conn.execute(
                "UPDATE series SET point_count = $2, last_step = $3, last_value = 0.05"
                " WHERE run_id = ANY($1::text[])",
                ids,
                points,
                points - 1,
            )
            await conn.execute("ANALYZE scalar_points")
        finally:
            await conn.close()

    asyncio.run(copy())
    return ids


def measure_query(ui: UiProcess, ids: list[str], repeats: int = 7) -> float:
    path = f"/api/chart?metric=metric_0&runs={','.join(ids)}&width=1200"
    ui.get(path)  # warm-up: connections, plans, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        status, body = ui.get(path)
        times.append((time.perf_counter() - start) * 1000)
        if status != 200 or not body["series"] or not body["series"][0]["downsampled"]:
            raise SystemExit(f"chart query failed: {status} {str(body)[:300]}")
    return median(times)


def measure_page(ui: UiProcess, ids: list[str], series: int, screenshot: Path | None) -> float:
    from playwright.sync_api import sync_playwright

    metrics = ",".join(f"metric_{k}" for k in range(series))
    url = f"{ui.url}#/compare?runs={','.join(ids)}&metrics={metrics}&exp=ui-bench"
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            for i in range(4):
                page = browser.new_page(viewport={"width": 1400, "height": 900}, bypass_csp=True)
                page.goto(url)
                page.wait_for_function(
                    "window.steplog && window.steplog.firstChartMs !== undefined", timeout=60_000
                )
                ms = page.evaluate("window.steplog.firstChartMs")
                if i:  # the first load warms the browser's and the server's caches
                    out.append(float(ms))
                if screenshot is not None and i == 3:
                    page.wait_for_function("window.steplog.ready === true", timeout=60_000)
                    page.screenshot(path=str(screenshot), full_page=False)
                page.close()
        finally:
            browser.close()
    return median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--points", type=int, default=100_000)
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
        with UiProcess(env, ROOT / ".steplog" / "bench-ui.log") as ui:
            query_ms = measure_query(ui, ids)
            shot = Path(args.screenshot) if args.screenshot else None
            first_ms = measure_page(ui, ids, args.series, shot)
    print(f"UI first_chart_ms={first_ms:.0f} query_ms={query_ms:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
