"""System metrics on this machine (no GPU) against the real service:
`start_logging(log_system_metrics=True)` and the Lightning logger's flag
store CPU and memory series under system/ with the node label, with
plausible values; completing the run stops the sampler."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from steplog import Experiment, Run
from steplog.integrations.lightning import SteplogLogger
from steplog.integrations.system import SystemMetrics, node_name
from tests.integration import lightning_job


def test_start_logging_samples_cpu_and_memory_until_the_run_completes(
    url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEPLOG_SYSTEM_METRICS_INTERVAL", "0.2")
    run = Experiment(experiment_name, url=url).start_logging(log_system_metrics=True)
    sampler = run._system_metrics
    assert isinstance(sampler, SystemMetrics) and "psutil" in sampler.sources
    deadline = time.monotonic() + 30
    while sampler.samples < 3 and time.monotonic() < deadline:
        sum(i * i for i in range(100_000))  # some CPU to measure
    assert sampler.samples >= 3
    run.complete()
    assert sampler._thread is not None and not sampler._thread.is_alive()
    after = sampler.samples

    node = {"node": node_name()}
    cpu = run.get_series("system/cpu_utilization_percent", labels=node)["values"]
    memory = run.get_series("system/memory_used_bytes", labels=node)["values"]
    assert len(cpu) == after and len(memory) == after  # the last sample too
    assert all(0.0 <= v <= 100.0 for v in cpu)
    total = psutil.virtual_memory().total
    assert all(0 < v < total for v in memory)
    rss = run.get_series("system/process_memory_rss_bytes", labels=node)["values"]
    assert all(0 < v < total for v in rss)
    assert run.get_status() == "Completed"
    assert not run.rejections()


def test_lightning_logger_flag_logs_system_metrics(
    url: str, experiment_name: str, tmp_path: Path
) -> None:
    logger = SteplogLogger(experiment_name, url=url, log_system_metrics=True)
    lightning_job.train(logger, tmp_path, epochs=1)
    run = Run.get(logger.run_id, url=url)
    assert run.status == "Completed"
    names = set(run.get_metrics())
    node = node_name()
    assert f"system/cpu_utilization_percent{{node={node}}}" in names
    assert f"system/memory_utilization_percent{{node={node}}}" in names
    memory = run.get_series("system/memory_utilization_percent", labels={"node": node})
    assert memory["values"] and all(0 < v <= 100 for v in memory["values"])
