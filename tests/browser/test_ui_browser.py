"""The web UI in a real headless Chromium (Debian's /usr/bin/chromium driven
by Playwright; nothing is downloaded by the browser tooling), against the
real service, database and S3. Values are read from the page's own data
(window.steplog), not from pixels. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from bench.ui import CHROMIUM, UiProcess
from ingest.store import tokens
from steplog import Experiment
from steplog.evaluation import confusion_matrix
from tests.imagegen import png
from tests.sql import copy_series_tail_async

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DOC_SCREENSHOT = ROOT / "deploy" / "ui" / "compare.png"
LONG = 80_000
TIMEOUT_MS = 60_000


def run_async(coro: Any) -> Any:
    """Run a coroutine on a thread of its own: Playwright's sync API keeps an
    event loop running in the test's thread."""
    out: list[Any] = []

    def target() -> None:
        out.append(asyncio.run(coro))

    t = threading.Thread(target=target)
    t.start()
    t.join(120)
    return out[0]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    # bypass_csp: Playwright evaluates its waits as strings, which the page's CSP forbids.
    pg = browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    pg.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def logged(url: str, database_url: str) -> dict[str, Any]:
    name = f"browser-{uuid.uuid4().hex[:8]}"
    exp = Experiment(name, url=url)
    parent = exp.start_logging(display_name="sweep")
    runs = []
    for i, lr in enumerate((0.1, 0.03, 0.01)):
        run = parent.child_run(name=f"lr={lr}")
        run.tag("lr", str(lr))
        run.tag("arch", "a" if i < 2 else "b")
        for step in range(500):
            run.log("loss", 2.0 * math.exp(-step * lr / 10) + 0.01 * i, step=step)
            run.log("accuracy", 1 - math.exp(-step * lr / 10), step=step)
        run.log("grad_norm", 1.0, step=0)
        run.log_confusion_matrix(
            "confusion", confusion_matrix([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1], labels=[0, 1, 2])
        )
        run.log_image("sample", png(16, 12, seed=i), step=10)
        run.log_image("sample", png(16, 12, seed=i + 10), step=20)
        run.upload_file("outputs/config.json", b'{"lr": 1}')
        for step in (0, 1):
            run.log_histogram("weights", edges=[0.0, 1.0, 2.0], counts=[step + 1, 5], step=step)
        run.flush()
        run.complete()
        runs.append(run.id)
    parent.complete()
    v = 1.0 + np.random.default_rng(3).normal(0, 0.01, LONG)
    v[0] = 1.0
    v[21_111] = math.nan
    v[55_555] = 80.0
    run_async(copy_series_tail_async(database_url, runs[0], "grad_norm", v))
    return {"experiment": name, "parent": parent.id, "runs": runs}


@pytest.fixture(scope="module")
def ui(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UiProcess]:
    env = {**service_env, "STEPLOG_UI_CACHE_DIR": str(tmp_path_factory.mktemp("ui-cache"))}
    with UiProcess(env, tmp_path_factory.mktemp("ui-browser") / "ui.log") as proc:
        yield proc


async def _stored(url: str, run_id: str, name: str) -> tuple[list[int], list[float]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT p.step, p.value FROM scalar_points p JOIN series s USING (series_id)"
            " WHERE s.run_id = $1 AND s.name = $2 AND NOT p.hidden ORDER BY p.step",
            run_id,
            name,
        )
        return [r["step"] for r in rows], [r["value"] for r in rows]
    finally:
        await conn.close()


def chart_of(page: Page, metric: str) -> dict[str, Any]:
    page.wait_for_function(
        f"window.steplog && window.steplog.charts && window.steplog.charts[{metric!r}]"
        " && window.steplog.charts[" + repr(metric) + "].drawnAt",
        timeout=TIMEOUT_MS,
    )
    # NaN does not survive JSON: the page's values are sent as strings where not finite.
    got: dict[str, Any] = page.evaluate(
        f"""() => {{
        const c = window.steplog.charts[{metric!r}];
        return {{ series: c.series.map(s => ({{ run_id: s.run_id, labels: s.labels,
            steps: s.steps, downsampled: s.downsampled,
            values: s.values.map(v => Number.isFinite(v) ? v : String(v)) }})),
            drawn_x: c.drawn[0], drawn: c.drawn.slice(1), labels: c.labels,
            updates: c.updates, marks: c.marks }};
    }}"""
    )
    return got


def test_runs_table_select_two_and_compare_draws_the_stored_series(
    page: Page, ui: UiProcess, logged: dict[str, Any], database_url: str
) -> None:
    page.goto(f"{ui.url}#/runs?exp={logged['experiment']}&metrics=loss")
    first, second = logged["runs"][0], logged["runs"][1]
    page.wait_for_selector(f'tr[data-run="{first}"]', timeout=TIMEOUT_MS)
    # The child runs sit under their parent (the tree), with the metric column.
    assert page.locator(f'tr[data-run="{logged["parent"]}"]').count() == 1
    cell = page.locator(f'tr[data-run="{first}"] td.metric[data-metric="loss"]').inner_text()
    assert cell != ""
    page.check(f'input.pick[data-run="{first}"]')
    page.check(f'input.pick[data-run="{second}"]')
    assert "sel=" in page.url  # the selection is in the URL
    page.click("a.compare")
    got = chart_of(page, "loss")
    assert {s["run_id"] for s in got["series"]} == {first, second}
    for s in got["series"]:
        steps, values = run_async(_stored(database_url, s["run_id"], "loss"))
        assert not s["downsampled"]
        assert s["steps"] == steps and s["values"] == values
    # What uPlot was handed: the x of both runs and each run's values at its steps.
    assert got["drawn_x"] == list(range(500))
    for i, s in enumerate(got["series"]):
        assert got["drawn"][i] == s["values"]
    # The compare page's state is in its URL: a reload shows the same.
    url = page.url
    page.reload()
    assert {s["run_id"] for s in chart_of(page, "loss")["series"]} == {first, second}
    assert page.url == url
    page.wait_for_function("window.steplog.ready === true", timeout=TIMEOUT_MS)
    page.screenshot(path=str(ARTIFACTS / "compare.png"))


def test_compare_groups_by_tag_as_mean_with_a_band(
    page: Page, ui: UiProcess, logged: dict[str, Any]
) -> None:
    ids = ",".join(logged["runs"])
    page.goto(f"{ui.url}#/compare?runs={ids}&metrics=loss,accuracy&group=arch&smooth=0.5")
    page.wait_for_function("window.steplog.ready === true", timeout=TIMEOUT_MS)
    groups = page.evaluate("window.steplog.charts['loss'].groups")
    by = {g["key"]: g for g in groups}
    assert set(by) == {"arch=a", "arch=b"} and by["arch=a"]["members"] == 2
    a = by["arch=a"]
    assert a["lo"][0] <= a["mean"][0] <= a["hi"][0] and a["lo"][0] < a["hi"][0]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare-grouped.png"))
    # The README's screenshot is this one; a run refreshes the committed copy
    # only when asked (STEPLOG_UPDATE_SCREENSHOT=1), so `make test` leaves the
    # tree as it found it.
    if os.environ.get("STEPLOG_UPDATE_SCREENSHOT") == "1":
        DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / "compare-grouped.png", DOC_SCREENSHOT)


def test_a_nan_and_a_spike_in_a_long_series_survive_downsampling(
    page: Page, ui: UiProcess, logged: dict[str, Any]
) -> None:
    run = logged["runs"][0]
    page.goto(f"{ui.url}#/compare?runs={run}&metrics=grad_norm")
    got = chart_of(page, "grad_norm")
    (s,) = got["series"]
    assert s["downsampled"] and len(s["steps"]) < LONG / 10
    values = dict(zip(s["steps"], s["values"], strict=True))
    assert values[21_111] == "NaN" and values[55_555] == 80.0
    assert [21_111, "NaN"] in got["marks"]  # drawn as a NaN mark
    assert 80.0 in got["drawn"][0]
    # Zoom (as a drag would): the range is re-queried at full resolution.
    page.goto(f"{ui.url}#/compare?runs={run}&metrics=grad_norm&range=55000,55999")
    zoomed = chart_of(page, "grad_norm")["series"][0]
    assert not zoomed["downsampled"] and zoomed["steps"] == list(range(55_000, 56_000))


def test_the_live_chart_grows_while_a_run_logs(
    page: Page, ui: UiProcess, url: str, logged: dict[str, Any]
) -> None:
    run = Experiment(logged["experiment"], url=url).start_logging(display_name="live")
    for step in range(5):
        run.log("loss", 1.0 / (step + 1), step=step)
    run.flush()
    stop = threading.Event()

    def keep_logging() -> None:
        step = 5
        while not stop.is_set() and step < 2000:
            run.log("loss", 1.0 / (step + 1), step=step)
            run.flush()
            step += 1
            stop.wait(0.05)

    worker = threading.Thread(target=keep_logging, daemon=True)
    try:
        page.goto(f"{ui.url}#/compare?runs={run.id}&metrics=loss")
        before = len(chart_of(page, "loss")["series"][0]["steps"])
        worker.start()
        page.wait_for_function(
            f"window.steplog.charts.loss.series[0].steps.length > {before + 10}",
            timeout=TIMEOUT_MS,
        )
        grown = chart_of(page, "loss")
        assert grown["updates"] >= 2 and len(grown["series"][0]["steps"]) > before + 10
    finally:
        stop.set()
        worker.join(30)
        run.complete()


def test_run_page_renders_the_confusion_matrix_and_the_image(
    page: Page, ui: UiProcess, logged: dict[str, Any]
) -> None:
    run = logged["runs"][1]
    page.goto(f"{ui.url}#/run?id={run}")
    page.wait_for_function("window.steplog.ready === true", timeout=TIMEOUT_MS)
    matrix = page.evaluate("window.steplog.confusion.confusion")
    assert matrix == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]
    cells = page.locator("table.confusion td").all_inner_texts()
    assert cells == ["1", "0", "0", "0", "1", "1", "0", "1", "2"]
    page.wait_for_function(
        "() => { const i = document.querySelector('.image-series img');"
        " return i && i.complete && i.naturalWidth === 16 && i.naturalHeight === 12; }",
        timeout=TIMEOUT_MS,
    )
    assert "step 20" in page.locator(".image-series .muted").inner_text()
    page.locator(".image-series input.step-slider").fill("0")
    page.wait_for_function(
        "document.querySelector('.image-series .muted').textContent.includes('step 10')",
        timeout=TIMEOUT_MS,
    )
    assert page.locator("table.files a").inner_text() == "outputs/config.json"
    assert page.locator('.chart[data-metric="loss"] canvas').count() == 1
    # Histograms over steps: the latest at first, as bars; the slider goes back.
    hist = page.locator('.histogram-series[data-name="weights"]')
    assert hist.locator("canvas").count() == 1 and "step 1 · 2 bins" in hist.inner_text()
    hist.locator("input.step-slider").fill("0")
    assert "step 0" in hist.locator(".muted").inner_text()


PEPPER = "browser-pepper"


@pytest.fixture(scope="module")
def secured(
    service_env: dict[str, str], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UiProcess, str]]:
    token = run_async(tokens.create_token(database_url, "default", "reader", pepper=PEPPER))
    env = {**service_env, "STEPLOG_AUTH": "token", "STEPLOG_TOKEN_PEPPER": PEPPER}
    with UiProcess(env, tmp_path_factory.mktemp("ui-browser-auth") / "ui.log") as proc:
        yield proc, token


def test_without_a_token_the_page_is_refused_when_auth_is_on(
    page: Page, secured: tuple[UiProcess, str], logged: dict[str, Any]
) -> None:
    ui, token = secured
    page.goto(f"{ui.url}#/runs?exp={logged['experiment']}")
    page.wait_for_function("window.steplog && window.steplog.refused", timeout=TIMEOUT_MS)
    assert "missing token" in page.evaluate("window.steplog.refused")
    assert page.locator("tr[data-run]").count() == 0  # no data shown
    page.screenshot(path=str(ARTIFACTS / "refused.png"))
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_selector(f'tr[data-run="{logged["runs"][0]}"]', timeout=TIMEOUT_MS)
