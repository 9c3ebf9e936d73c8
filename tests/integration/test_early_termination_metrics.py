"""Early termination on /metrics: a service of its own (so its counters hold
only what this module did) with a small curve cache
(STEPLOG_SWEEP_CURVE_BYTES), scraped over HTTP the way Prometheus does.
One sweep is evaluated and cancels a child; the other's children's curves
exceed the cache bound, so it is skipped, and both show up by policy."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.write.sweeps import CURVE_POINT_BYTES
from steplog import Experiment, Run
from steplog.client import Client
from tests.support import ServiceProcess, free_port

BOUND_POINTS = 40  # cached intervals the service below has room for, all parents together
PREFIX = "steplog_early_termination_"


@pytest.fixture(scope="module")
def sweep_service(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("sweep-metrics") / "service.log"
    extra = {"STEPLOG_SWEEP_CURVE_BYTES": str(BOUND_POINTS * CURVE_POINT_BYTES)}
    proc = ServiceProcess(
        service_env, metrics_port=free_port(), log_path=log, extra_env=extra
    ).start()
    yield proc
    proc.stop()


def scrape(svc: ServiceProcess) -> dict[tuple[str, str], float]:
    """(sample name, policy label) -> value of every early-termination sample."""
    url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, s.labels.get("policy", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(PREFIX)
    }


def wait_for_sample(svc: ServiceProcess, name: str, policy: str, at_least: float) -> float:
    deadline = time.monotonic() + 15
    while True:
        value = scrape(svc).get((PREFIX + name, policy), 0.0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def child(parent: Run, name: str, values: list[float]) -> Run:
    run = parent.child_run(name)
    for step, value in enumerate(values):
        run.log("acc", value, step=step)
    assert run.flush(30)
    return run


def test_evaluations_cancellations_and_skips_are_counted(
    sweep_service: ServiceProcess, experiment_name: str
) -> None:
    from steplog.sweep import BanditPolicy, MedianStoppingPolicy

    before = scrape(sweep_service)
    # Every counter is there from the start, at 0, for every policy kind.
    for name in ("evaluations_total", "cancelled_total", "skipped_total"):
        for policy in ("bandit", "median_stopping", "truncation_selection"):
            assert before[(PREFIX + name, policy)] == 0.0
    client = Client(sweep_service.address, "default")

    # A bandit sweep well within the cache: 'far' falls behind at interval 2.
    parent = Experiment(experiment_name, _client=client).start_logging(display_name="a")
    parent.set_early_termination_policy(
        BanditPolicy(1, slack_factor=0.2, delay_evaluation=2), primary_metric="acc"
    )
    child(parent, "leader", [0.5, 0.6, 0.7, 0.8, 0.9])
    far = child(parent, "far", [0.3, 0.4, 0.5, 0.55, 0.6])
    deadline = time.monotonic() + 15
    while far.get_status() != "CancelRequested":
        assert time.monotonic() < deadline, "far was not cancelled"
        time.sleep(0.05)
    assert wait_for_sample(sweep_service, "cancelled_total", "bandit", 1) == 1
    # The leader at intervals 2..5 and far at 2 at least; each a decision.
    assert wait_for_sample(sweep_service, "evaluations_total", "bandit", 5) >= 5

    # A median-stopping sweep whose two children hold 60 intervals: more
    # than the 40 the cache has room for, so the second child's last
    # intervals (at least) are not judged.
    big = Experiment(experiment_name, _client=client).start_logging(display_name="b")
    big.set_early_termination_policy(MedianStoppingPolicy(1, 1), primary_metric="acc")
    child(big, "first", [0.5] * 30)  # 0.5: running averages exact
    behind = child(big, "second", [0.5] * 30)
    assert wait_for_sample(sweep_service, "skipped_total", "median_stopping", 1) >= 1

    after = scrape(sweep_service)
    assert behind.get_status() == "Running"
    assert after[(PREFIX + "cancelled_total", "median_stopping")] == 0
    assert after[(PREFIX + "skipped_total", "bandit")] == 0
    assert after[(PREFIX + "cancelled_total", "bandit")] == 1
    assert after[(PREFIX + "evaluations_total", "truncation_selection")] == 0
