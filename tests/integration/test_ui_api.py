"""The web UI's HTTP API (`steplog-ingest ui`) as a real process against the
session's database and S3: what it answers equals what was stored, bounds,
downsampling keeps NaN, spikes, each bucket's min, max and last, and tokens
work as for gRPC."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from bench.ui import UiProcess
from ingest.store import tokens
from ingest.store.view_blocks import reduce_buckets
from steplog import Experiment
from steplog.evaluation import confusion_matrix
from tests.imagegen import png as png_bytes
from tests.sql import copy_series_tail

pytestmark = pytest.mark.integration

LONG = 60_000


def values_of(body: dict[str, Any]) -> list[float]:
    return [float(v) for v in body["values"]]


async def _stored(url: str, run_id: str, name: str) -> tuple[list[int], list[float]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT p.step, p.value FROM scalar_points p JOIN series s USING (series_id)"
            " WHERE s.run_id = $1 AND s.name = $2 AND s.labels_key = '' AND NOT p.hidden"
            " ORDER BY p.step",
            run_id,
            name,
        )
        return [r["step"] for r in rows], [r["value"] for r in rows]
    finally:
        await conn.close()


def stored(url: str, run_id: str, name: str) -> tuple[list[int], list[float]]:
    return asyncio.run(_stored(url, run_id, name))


def long_values() -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(7)
    v = 1.0 + rng.normal(0, 0.01, LONG)
    v[0] = 1.0
    v[12_345] = math.nan
    v[40_000] = 1000.0  # the spike
    v[50_000] = -math.inf
    return v


@pytest.fixture(scope="module")
def logged(url: str, database_url: str) -> dict[str, Any]:
    exp_name = f"ui-{uuid.uuid4().hex[:8]}"
    exp = Experiment(exp_name, url=url)
    exp.tag("team", "vision")
    parent = exp.start_logging(display_name="sweep")
    runs = []
    for i, lr in enumerate((0.1, 0.01)):
        child = parent.child_run(name=f"lr={lr}")
        child.tag("lr", str(lr))
        child.add_properties({"seed": str(i)})
        for step in range(300):
            child.log("loss", 1.0 / (step + 1 + i), step=step)
            child.log("loss", 2.0 / (step + 1), step=step, labels={"rank": "1"})
        child.log("note", "done")
        child.log_row("eval", step=0, acc=0.5 + i, label="a")
        child.log_row("eval", step=1, acc=0.75, label="b")
        child.log_confusion_matrix(
            "confusion", confusion_matrix([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1], labels=[0, 1, 2])
        )
        child.log_image("sample", png_bytes(8, 6), step=3)
        child.upload_file("outputs/config.json", b'{"lr": 1}')
        child.log("long", 1.0, step=0)
        child.flush()
        runs.append(child)
    parent.flush()
    for r in runs:
        r.complete()
    parent.complete()
    copy_series_tail(database_url, runs[0].id, "long", long_values())
    return {"experiment": exp_name, "parent": parent.id, "runs": [r.id for r in runs]}


@pytest.fixture(scope="module")
def ui(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UiProcess]:
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    env = {**service_env, "STEPLOG_UI_CACHE_DIR": str(tmp_path_factory.mktemp("ui-cache"))}
    with UiProcess(env, log) as proc:
        yield proc


def get_binary(ui: UiProcess, path: str) -> dict[str, Any]:
    """A chart in the page's binary form, decoded as the page does."""
    with urllib.request.urlopen(ui.url.rstrip("/") + path + "&format=binary") as r:
        assert r.headers["Content-Type"] == "application/octet-stream"
        body = r.read()
    n = int.from_bytes(body[:4], "little")
    got: dict[str, Any] = json.loads(body[4 : 4 + n])
    at = 4 + n
    assert at % 8 == 0
    for s in got["series"]:
        for key in ("steps", "values") + (("times",) if got["times"] else ()):
            s[key] = np.frombuffer(body, "<f8", s["n"], at)
            at += 8 * s["n"]
    assert at == len(body)
    return got


def test_home_lists_the_experiment_with_its_recent_runs(
    ui: UiProcess, logged: dict[str, Any]
) -> None:
    status, body = ui.get("/api/experiments")
    assert status == 200
    exp = next(e for e in body["experiments"] if e["name"] == logged["experiment"])
    assert exp["tags"] == {"team": "vision"}
    assert {r["run_id"] for r in exp["recent_runs"]} == {logged["parent"], *logged["runs"]}
    assert logged["runs"][1] in {r["run_id"] for r in body["recent_runs"]}


def test_runs_table_has_the_tree_tags_properties_and_latest_metric_values(
    ui: UiProcess, logged: dict[str, Any]
) -> None:
    status, body = ui.get(f"/api/runs?experiment={logged['experiment']}&metrics=loss,note")
    assert status == 200
    by_id = {r["run_id"]: r for r in body["runs"]}
    first, second = (by_id[r] for r in logged["runs"])
    assert first["parent_run_id"] == logged["parent"] == second["parent_run_id"]
    assert by_id[logged["parent"]]["parent_run_id"] is None
    assert first["tags"] == {"lr": "0.1"} and first["properties"]["seed"] == "0"
    assert first["status"] == "Completed" and first["duration_s"] > 0
    assert first["metrics"] == {"loss": 1.0 / 300, "note": "done"}
    assert second["metrics"]["loss"] == pytest.approx(1.0 / 301)
    assert {"loss", "long", "note"} <= set(body["metric_names"])
    status, body = ui.get("/api/runs?experiment=no-such-experiment")
    assert status == 404 and "no-such-experiment" in body["error"]


def test_chart_at_full_resolution_equals_the_stored_series(
    ui: UiProcess, logged: dict[str, Any], database_url: str
) -> None:
    ids = logged["runs"]
    status, body = ui.get(f"/api/chart?metric=loss&runs={','.join(ids)}&width=800")
    assert status == 200
    # two runs x (no labels, rank=1)
    assert len(body["series"]) == 4
    for run_id in ids:
        s = next(x for x in body["series"] if x["run_id"] == run_id and not x["labels"])
        assert not s["downsampled"]
        steps, values = stored(database_url, run_id, "loss")
        assert s["steps"] == steps and values_of(s) == values and len(steps) == 300
    ranked = [x for x in body["series"] if x["labels"] == {"rank": "1"}]
    assert len(ranked) == 2 and values_of(ranked[0])[:3] == [2.0, 1.0, 2.0 / 3]


def test_downsampling_keeps_min_max_last_and_nan_of_every_bucket(
    ui: UiProcess, logged: dict[str, Any], database_url: str
) -> None:
    run_id = logged["runs"][0]
    width = 500
    status, body = ui.get(f"/api/chart?metric=long&runs={run_id}&width={width}")
    assert status == 200
    (s,) = body["series"]
    assert s["downsampled"] and s["points_in_range"] == LONG
    assert len(s["steps"]) <= 4 * width
    got = dict(zip(s["steps"], values_of(s), strict=True))
    assert math.isnan(got[12_345]) and got[40_000] == 1000.0 and got[50_000] == -math.inf
    # Exactly what the buckets keep, computed here from the stored points.
    steps, values = (np.array(a) for a in stored(database_url, run_id, "long"))
    lo, hi = body["start"], body["end"]
    assert (lo, hi) == (0, LONG - 1)
    bucket = np.minimum(width - 1, np.floor((steps - lo) * width / (hi - lo + 1))).astype(np.int64)
    expected_max = {int(b): float(np.nanmax(values[bucket == b])) for b in np.unique(bucket)}
    drawn_max: dict[int, float] = {}
    for st, v in got.items():
        b = min(width - 1, (st - lo) * width // (hi - lo + 1))
        if not math.isnan(v):
            drawn_max[b] = max(drawn_max.get(b, -math.inf), v)
    assert drawn_max == expected_max  # every bucket's maximum is drawn, nothing else above it
    assert s["steps"][-1] == LONG - 1  # the line ends where the data ends
    # A zoom into 1,000 steps comes at full resolution.
    status, zoom = ui.get(
        f"/api/chart?metric=long&runs={run_id}&width={width}&start=39500&end=40499"
    )
    (z,) = zoom["series"]
    assert not z["downsampled"] and z["steps"] == list(range(39_500, 40_500))
    assert values_of(z) == [float(v) for v in values[39_500:40_500]]


def test_a_wide_zoom_keeps_every_extreme_and_counts_exactly(
    ui: UiProcess, logged: dict[str, Any], database_url: str
) -> None:
    # Wide enough for the block cache; its ends cut blocks, read from the database.
    run_id, lo, hi = logged["runs"][0], 10_007, 50_003
    status, body = ui.get(f"/api/chart?metric=long&runs={run_id}&width=500&start={lo}&end={hi}")
    assert status == 200
    (s,) = body["series"]
    assert s["downsampled"] and s["points_in_range"] == hi - lo + 1
    assert lo <= s["steps"][0] and s["steps"][-1] == hi and len(s["steps"]) <= 4 * 500
    got = dict(zip(s["steps"], values_of(s), strict=True))
    assert math.isnan(got[12_345]) and got[40_000] == 1000.0 and got[50_000] == -math.inf
    steps, values = (np.array(a) for a in stored(database_url, run_id, "long"))
    inside = values[(steps >= lo) & (steps <= hi)]
    finite = inside[np.isfinite(inside)]
    drawn = np.array(values_of(s))
    assert finite.min() in drawn and finite.max() in drawn
    # Every drawn point is a stored one.
    assert all(
        values[st] == v or (math.isnan(v) and math.isnan(values[st])) for st, v in got.items()
    )


@pytest.mark.parametrize("metric", ["loss", "long"])
def test_the_binary_chart_equals_the_json_one(
    ui: UiProcess, logged: dict[str, Any], metric: str
) -> None:
    path = f"/api/chart?metric={metric}&runs={','.join(logged['runs'])}&width=500"
    status, js = ui.get(path)
    assert status == 200
    got = get_binary(ui, path)
    assert got["times"] is False and len(got["series"]) == len(js["series"]) >= 2
    assert any(s["downsampled"] for s in js["series"]) == (metric == "long")
    for b, j in zip(got["series"], js["series"], strict=True):
        assert (b["run_id"], b["labels"], b["points_in_range"]) == (
            j["run_id"],
            j["labels"],
            j["points_in_range"],
        )
        assert b["steps"].tolist() == j["steps"]
        np.testing.assert_array_equal(b["values"], np.array(values_of(j)))
    timed = get_binary(ui, path + "&x=time")
    assert timed["times"] is True and timed["series"][0]["times"].size == timed["series"][0]["n"]


def test_a_restarted_ui_draws_long_series_from_its_cache_files(
    url: str, database_url: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    exp = Experiment(f"ui-cache-{uuid.uuid4().hex[:8]}", url=url)
    run = exp.start_logging()
    run.log("long", 1.0, step=0)
    run.flush()
    run.complete()
    copy_series_tail(database_url, run.id, "long", long_values())
    env = {**service_env, "STEPLOG_UI_CACHE_DIR": str(tmp_path / "cache")}
    path = f"/api/chart?metric=long&runs={run.id}&width=500"
    with UiProcess(env, tmp_path / "ui1.log") as first:
        status, before = first.get(path)
    assert status == 200 and before["series"][0]["downsampled"]
    assert len(list((tmp_path / "cache").glob("*.blocks"))) == 1

    # The spike changed behind the cache's back (the count and last step
    # stay): an answer that still shows it came from the file, not the database.
    async def hide_spike() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE scalar_points p SET value = 1.0 FROM series s WHERE s.series_id ="
                " p.series_id AND s.run_id = $1 AND p.step = 40000",
                run.id,
            )
        finally:
            await conn.close()

    asyncio.run(hide_spike())
    with UiProcess(env, tmp_path / "ui2.log") as second:
        status, after = second.get(path)
    assert status == 200 and after["series"] == before["series"]
    kept = dict(zip(after["series"][0]["steps"], values_of(after["series"][0]), strict=True))
    assert kept[40_000] == 1000.0
    # Without the files a new process reads the database.
    with UiProcess({**env, "STEPLOG_UI_CACHE_DIR": ""}, tmp_path / "ui3.log") as third:
        status, fresh = third.get(path)
    assert status == 200 and 1000.0 not in values_of(fresh["series"][0])


def test_reduce_buckets_picks_extremes_last_and_first_nan() -> None:
    bucket = np.array([0, 0, 0, 0, 1, 1, 1])
    steps = np.arange(7)
    values = np.array([3.0, math.nan, 9.0, 5.0, 1.0, math.nan, math.nan])
    assert reduce_buckets(bucket, steps, values).tolist() == [0, 1, 2, 3, 4, 5, 6]
    values = np.array([3.0, 1.0, 9.0, 5.0, 1.0, 2.0, 0.5])
    assert reduce_buckets(bucket, steps, values).tolist() == [1, 2, 3, 5, 6]


def test_chart_by_wall_time(ui: UiProcess, logged: dict[str, Any]) -> None:
    status, body = ui.get(f"/api/chart?metric=loss&runs={logged['runs'][0]}&width=400&x=time")
    assert status == 200 and body["x"] == "time"
    s = next(x for x in body["series"] if not x["labels"])
    assert len(s["times"]) == 300 and s["times"] == sorted(s["times"])
    assert body["start"] <= s["times"][0] and s["times"][-1] <= body["end"]


def test_bounds_are_refused_with_the_field(ui: UiProcess, logged: dict[str, Any]) -> None:
    run = logged["runs"][0]
    status, body = ui.get(f"/api/chart?metric=loss&runs={run}&width=100000")
    assert status == 400 and "width" in body["error"]
    many = ",".join(f"r{i}" for i in range(300))
    status, body = ui.get(f"/api/chart?metric=loss&runs={many}")
    assert status == 400 and "runs" in body["error"]
    status, body = ui.get(f"/api/chart?metric=loss&runs={run}&x=banana")
    assert status == 400 and "x:" in body["error"]
    status, body = ui.get("/api/table?run=x")
    assert status == 400 and "name" in body["error"]


def test_run_page_reads_tables_evaluations_images_and_files(
    ui: UiProcess, logged: dict[str, Any]
) -> None:
    run = logged["runs"][0]
    status, body = ui.get(f"/api/run?id={run}")
    assert status == 200 and body["parent_run_id"] == logged["parent"]
    kinds = {s["name"]: s["kind"] for s in body["series"]}
    assert kinds["eval"] == "table" and kinds["confusion"] == "confusion_matrix"
    assert kinds["sample"] == "image" and kinds["note"] == "text" and kinds["loss"] == "scalar"
    status, table = ui.get(f"/api/table?run={run}&name=eval")
    assert table["columns"] == ["step", "acc", "label"]  # log_row's keywords are its columns
    assert [r["cells"] for r in table["rows"]] == [[0, 0.5, "a"], [1, 0.75, "b"]]
    status, ev = ui.get(f"/api/evaluation?run={run}&name=confusion")
    assert ev["latest"]["schema_type"] == "confusion_matrix"
    assert ev["latest"]["document"]["data"]["matrix"] == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]
    status, images = ui.get(f"/api/images?run={run}&name=sample")
    (im,) = images["images"]
    assert (im["step"], im["width"], im["height"]) == (3, 8, 6)
    with urllib.request.urlopen(ui.url.rstrip("/") + im["url"], timeout=30) as r:
        assert r.read() == png_bytes(8, 6) and r.headers["Content-Type"] == "image/png"
    status, files = ui.get(f"/api/files?run={run}")
    (f,) = files["files"]
    assert f["path"] == "outputs/config.json" and f["size"] == 9
    with urllib.request.urlopen(ui.url.rstrip("/") + f["url"], timeout=30) as r:
        assert r.read() == b'{"lr": 1}'
        assert "attachment" in r.headers["Content-Disposition"]
    tampered = f["url"].replace("&s=", "&s=0")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(ui.url.rstrip("/") + tampered, timeout=30)
    assert err.value.code == 403


def test_workspaces_are_separate_without_auth(ui: UiProcess, logged: dict[str, Any]) -> None:
    status, body = ui.get("/api/experiments?workspace=someone-else")
    assert status == 200 and body["experiments"] == []
    status, body = ui.get(f"/api/run?id={logged['runs'][0]}&workspace=someone-else")
    assert status == 404


def test_auth_none_refuses_a_non_loopback_address(service_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ingest", "ui", "--listen", "0.0.0.0:0"],
        env={**service_env, "STEPLOG_AUTH": "none", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0:0 without authentication" in out.stdout + out.stderr


PEPPER = "ui-test-pepper"


@pytest.fixture(scope="module")
def secured(
    service_env: dict[str, str], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UiProcess, dict[str, str]]]:
    async def make() -> dict[str, str]:
        return {
            "reader": await tokens.create_token(database_url, "default", "reader", pepper=PEPPER),
            "other": await tokens.create_token(database_url, "ws-other", "reader", pepper=PEPPER),
        }

    toks = asyncio.run(make())
    env = {**service_env, "STEPLOG_AUTH": "token", "STEPLOG_TOKEN_PEPPER": PEPPER}
    with UiProcess(env, tmp_path_factory.mktemp("ui-auth") / "ui.log") as proc:
        yield proc, toks


def test_auth_token_needs_a_token_of_the_workspace(
    secured: tuple[UiProcess, dict[str, str]], logged: dict[str, Any]
) -> None:
    ui, toks = secured
    status, body = ui.get("/api/experiments")
    assert status == 401 and "missing token" in body["error"]
    status, body = ui.get("/api/experiments", token="stl_nope_nope")
    assert status == 401
    status, body = ui.get("/api/experiments", token=toks["reader"])
    assert status == 200 and logged["experiment"] in {e["name"] for e in body["experiments"]}
    status, body = ui.get("/api/experiments?workspace=ws-other", token=toks["reader"])
    assert status == 403 and "default" in body["error"]
    status, body = ui.get("/api/experiments", token=toks["other"])
    assert status == 200 and body["workspace"] == "ws-other" and body["experiments"] == []
    status, body = ui.get(f"/api/run?id={logged['runs'][0]}", token=toks["other"])
    assert status == 404
    # The page itself (no data) loads; it asks for a token.
    with urllib.request.urlopen(ui.url, timeout=30) as r:
        assert b"steplog" in r.read()
