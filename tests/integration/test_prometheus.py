"""Prometheus end to end: a real Prometheus server (Debian's package) scrapes a
real service; a run logged through the client shows up in Prometheus's query
API with its latest loss and step, next to the service's ingest and RPC
counters. Also: promtool on the live exposition and on deploy/prometheus, and
the progress reads against the real database."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from ingest.core.batch import REASON_NAMES
from ingest.observe.progress import ProgressStore
from ingest.store import db
from steplog import Experiment, Run
from steplog.client import Client
from steplog.v1 import data_pb2, run_service_pb2
from steplog.v1 import ingest_service_pb2 as ipb
from tests.support import ROOT, ServiceProcess, free_port

DEPLOY = ROOT / "deploy" / "prometheus"
WAIT_S = 90.0


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed: `make setup` installs Debian's prometheus package")
    return path


def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        pause.wait(0.2)


class Prometheus:
    """A Prometheus server as a subprocess, with a client for its HTTP API."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # JSON is YAML: the config needs no YAML library here. The rules are
        # the shipped ones, so they must load and evaluate on real data too.
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "alerts.yml")],
            "scrape_configs": [{"job_name": "steplog", "static_configs": [{"targets": targets}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        wait_until(self._ready, "Prometheus to be ready", 60)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["result"]
        return result

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)]

    def wait_value(self, expr: str, expected: float, timeout: float = WAIT_S) -> None:
        def matches() -> bool:
            got = self.values(expr)
            if math.isnan(expected):
                return len(got) == 1 and math.isnan(got[0])
            return got == [pytest.approx(expected)]

        wait_until(matches, f"{expr} == {expected} (now {self.values(expr)})", timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def metrics_service(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A service of its own, so its counters hold exactly what this module sent."""
    log = tmp_path_factory.mktemp("metrics-service") / "service.log"
    proc = ServiceProcess(service_env, metrics_port=free_port(), log_path=log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def prometheus(
    metrics_service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    server = Prometheus(
        tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{metrics_service.metrics_port}"]
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(metrics_service: ServiceProcess) -> Client:
    return Client(metrics_service.address, "default")


def scalars(
    name: str,
    steps: list[int],
    values: list[float],
    labels: dict[str, str] | None = None,
) -> data_pb2.SeriesData:
    return data_pb2.SeriesData(
        name=name, labels=labels or {}, scalars=data_pb2.ScalarColumns(steps=steps, values=values)
    )


def write(client: Client, run_id: str, *series: data_pb2.SeriesData) -> ipb.WriteResponse:
    """One batch through the unary IngestService.Write, as its own writer."""
    request = ipb.WriteRequest(
        workspace=client.workspace,
        batch=ipb.Batch(
            writer_id=f"prom-test-{uuid.uuid4().hex}",
            sequence=1,
            sent_time=time.time(),
            series=[ipb.RunSeries(run_id=run_id, series=s) for s in series],
        ),
    )
    reply: ipb.WriteResponse = client.ingest.Write(request, timeout=30)
    return reply


# What the run logs: name -> (labels, steps, values).
LOGGED: dict[str, tuple[dict[str, str], list[int], list[float]]] = {
    "loss": ({}, list(range(1, 21)), [1.0 / s for s in range(1, 21)]),
    "loss@rank1": ({"rank": "1"}, [1, 2, 3], [0.3, 0.2, 0.1]),
    "accuracy": ({}, list(range(1, 21)), [s / 20 for s in range(1, 21)]),
    "val_loss": ({}, [1, 2, 3, 4, 5], [0.9, 0.8, 0.7, 0.6, math.nan]),
    "grad_norm": ({}, [1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0]),  # not allow-listed
}


@dataclass
class Logged:
    run: Run
    accepted: int
    rejected: int
    reason: str


def _log_with_client(run: Run) -> None:
    for key, (labels, steps, values) in LOGGED.items():
        name = key.split("@")[0]
        for step, value in zip(steps, values, strict=True):
            run.log(name, value, step=step, labels=labels or None)
    assert run.flush(60), "the client did not get every point acknowledged"


@pytest.fixture(scope="module")
def logged(metrics_service: ServiceProcess, client: Client) -> Logged:
    """A Running run with known series, logged through the client: `run.log`
    when the background writer is there, else the unary Write call."""
    run = Experiment(f"prom-{uuid.uuid4().hex[:10]}", url=metrics_service.address).start_logging(
        display_name="prometheus"
    )
    if importlib.util.find_spec("steplog._writer") is not None:
        _log_with_client(run)
    else:
        reply = write(
            client,
            run.id,
            *(scalars(k.split("@")[0], s, v, lab) for k, (lab, s, v) in LOGGED.items()),
        )
        assert reply.result.rejected == 0
    accepted = sum(len(steps) for _, steps, _ in LOGGED.values())
    # A step going backwards: rejected, and counted by reason.
    reply = write(client, run.id, scalars("loss", [5], [9.0]))
    assert reply.result.rejected == 1
    reason = REASON_NAMES[reply.result.reject_counts[0].reason]
    # One RPC that fails with NOT_FOUND, for the status-code counter.
    with pytest.raises(grpc.RpcError) as err:
        client.runs.GetRun(
            run_service_pb2.GetRunRequest(workspace="default", run_id="no-such-run"), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    return Logged(run, accepted, 1, reason)


def test_prometheus_sees_progress_and_ingest_counters(
    prometheus: Prometheus, logged: Logged
) -> None:
    run = f'run="{logged.run.id}"'
    value = f"steplog_run_series_last_value{{{run}"
    step = f"steplog_run_series_last_step{{{run}"
    # The latest loss and its step (series_labels="" matches "no such label").
    prometheus.wait_value(f'{value},series="loss",series_labels=""}}', 1.0 / 20)
    prometheus.wait_value(f'{step},series="loss",series_labels=""}}', 20)
    prometheus.wait_value(f'{value},series="loss",series_labels="rank=1"}}', 0.1)
    prometheus.wait_value(f'{step},series="loss",series_labels="rank=1"}}', 3)
    prometheus.wait_value(f'{value},series="accuracy"}}', 1.0)
    prometheus.wait_value(f'{value},series="val_loss"}}', math.nan)
    assert prometheus.query(f'{value},series="grad_norm"}}') == []
    exported = {r["metric"]["series"] for r in prometheus.query(f"{value}}}")}
    assert exported == {"loss", "accuracy", "val_loss"}
    sample = prometheus.query(f'{value},series="loss",series_labels=""}}')[0]["metric"]
    assert sample["experiment"] == logged.run.experiment.name
    assert sample["workspace"] == "default"
    prometheus.wait_value(f'steplog_run_status{{{run},status="Running"}}', 1)
    prometheus.wait_value(f"steplog_run_points{{{run}}}", logged.accepted)
    age = prometheus.values(f"steplog_run_last_point_age_seconds{{{run}}}")
    assert len(age) == 1 and 0 <= age[0] < WAIT_S * 2

    # The service's own counters: exactly what this module sent.
    prometheus.wait_value(
        'sum(steplog_ingest_points_total{kind="scalar",outcome="accepted"})', logged.accepted
    )
    prometheus.wait_value(
        'sum(steplog_ingest_points_total{kind="scalar",outcome="rejected"})', logged.rejected
    )
    prometheus.wait_value(
        f'sum(steplog_ingest_rejected_points_total{{reason="{logged.reason}"}})', logged.rejected
    )
    committed = prometheus.values('sum(steplog_ingest_batches_total{outcome="committed"})')
    assert committed and committed[0] >= 2
    prometheus.wait_value(
        'steplog_grpc_server_handled_total{grpc_method="GetRun",grpc_code="NOT_FOUND",'
        'grpc_service="steplog.v1.RunService",grpc_type="unary"}',
        1,
    )
    created = prometheus.values(
        'steplog_grpc_server_handling_seconds_count{grpc_method="CreateRun"}'
    )
    assert created and created[0] >= 1
    assert prometheus.values("sum(steplog_ingest_commit_duration_seconds_count)")[0] >= 2

    # The shipped NaN-loss rule matches the real exposition (pending: its `for`
    # is a minute), and every shipped rule evaluates without error.
    wait_until(
        lambda: prometheus.query(f'ALERTS{{alertname="SteplogNaNLoss",{run},series="val_loss"}}'),
        "the NaN-loss alert to be pending",
    )

    def rules_healthy() -> bool:
        rules = [r for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]]
        return len(rules) >= 4 and all(r["health"] == "ok" for r in rules)

    wait_until(rules_healthy, "every alert rule to evaluate")


def test_runs_that_end_drop_out(
    prometheus: Prometheus, metrics_service: ServiceProcess, client: Client
) -> None:
    run = Experiment(f"prom-{uuid.uuid4().hex[:10]}", url=metrics_service.address).start_logging()
    write(client, run.id, scalars("loss", [1, 2], [0.5, 0.25]))
    selector = f'{{run="{run.id}"}}'
    prometheus.wait_value(f"steplog_run_series_last_value{selector}", 0.25)
    run.complete()
    wait_until(
        lambda: (
            prometheus.query(f"steplog_run_series_last_value{selector}") == []
            and prometheus.query(f"steplog_run_status{selector}") == []
        ),
        "the completed run to drop out",
    )


def test_exposition_passes_promtool_check_metrics(
    metrics_service: ServiceProcess, logged: Logged
) -> None:
    url = f"http://127.0.0.1:{metrics_service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read()
    assert f'run="{logged.run.id}"'.encode() in text  # progress samples are in it
    assert b"steplog_grpc_server_handling_seconds_bucket" in text
    assert b"steplog_s3_operation_duration_seconds" in text
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"", result.stdout  # no lint findings either


def test_promtool_checks_the_shipped_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "alerts.yml")],
        ["test", "rules", str(DEPLOY / "alerts_test.yml")],
    ):
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_alert_has_a_rule_test_that_fires_it() -> None:
    alerts = [
        line.split(":", 1)[1].strip()
        for line in (DEPLOY / "alerts.yml").read_text().splitlines()
        if line.strip().startswith("- alert:")
    ]
    assert len(alerts) >= 4
    tests = (DEPLOY / "alerts_test.yml").read_text()
    for name in alerts:
        # Each alert has a case whose expected alerts are not empty.
        blocks = tests.split(f"alertname: {name}\n")[1:]
        assert any(
            b.lstrip().startswith("exp_alerts:\n") and "exp_labels:" in b.split("- eval_time")[0]
            for b in blocks
        ), f"no rule test fires {name}"


async def test_progress_reads_cap_filter_and_status(
    metrics_service: ServiceProcess, client: Client, database_url: str
) -> None:
    """ProgressStore against the real schema: newest runs first, the cap on
    runs and series, globs with LIKE's wildcards taken literally, numeric
    scalar series only, ended runs out, NotResponding derived from last_seen."""
    exp = Experiment(f"prom-{uuid.uuid4().hex[:10]}", url=metrics_service.address)
    ended, older, newest = (exp.start_logging() for _ in range(3))
    for r in (ended, older):
        write(client, r.id, scalars("loss", [1], [1.0]))
    write(
        client,
        newest.id,
        scalars("loss", [1, 2], [1.0, 0.5]),
        scalars("loss_aux", [1], [2.0]),
        scalars("top_1%", [1], [0.7]),
        scalars("topX1%", [1], [0.6]),
        scalars("lr", [1], [0.1]),
        data_pb2.SeriesData(
            name="loss_note", scalars=data_pb2.ScalarColumns(steps=[1], text_values=["ok"])
        ),
    )
    ended.complete()
    pool = await db.connect_pool(database_url, 2)
    try:
        everything = await ProgressStore(pool, 300).snapshot(("loss*", "top_1%"), 10_000)
        ids = [r.run_id for r in everything.runs]
        assert ended.id not in ids
        assert ids.index(newest.id) < ids.index(older.id)
        mine = {s.name: s for s in everything.series if s.run_id == newest.id}
        assert set(mine) == {"loss", "loss_aux", "top_1%"}
        assert (mine["loss"].last_step, mine["loss"].last_value) == (2, 0.5)
        status = {r.run_id: r.status for r in everything.runs}
        assert status[newest.id] == "Running"
        point_count = {r.run_id: r.points for r in everything.runs}
        assert point_count[newest.id] == 7

        capped = await ProgressStore(pool, 300).snapshot(("loss*", "top_1%"), 2)
        assert [r.run_id for r in capped.runs] == [newest.id, older.id]
        assert [(s.run_id, s.name) for s in capped.series] == [
            (newest.id, "loss"),
            (newest.id, "loss_aux"),
        ]
        assert capped.runs_omitted == len(everything.runs) - 2
        assert capped.series_omitted == len(everything.series) - 2 >= 2

        # With a heartbeat timeout of a microsecond every Running run is silent.
        silent = await ProgressStore(pool, 1e-6).snapshot(("loss",), 10)
        assert {r.status for r in silent.runs} == {"NotResponding"}
    finally:
        await pool.close()
