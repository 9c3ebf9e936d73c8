"""The system-metrics sampler beside its boundaries: a fake NVML (this
machine has no GPU) and a recorder in place of the Run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest

from steplog.errors import InvalidArgumentError
from steplog.integrations import system
from steplog.integrations.system import NvmlSource, SystemMetrics, _visible, default_sources


class Recorder:
    """What the sampler calls of a Run."""

    def __init__(self) -> None:
        self.points: list[tuple[str, float, dict[str, str]]] = []
        self.lock = threading.Lock()

    def log(
        self,
        name: str,
        value: float | int | str | bool,
        description: str = "",
        step: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        assert step is None  # system series are unstepped
        with self.lock:
            self.points.append((name, float(value), dict(labels or {})))

    def by(self, name: str) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return [(v, labels) for n, v, labels in self.points if n == name]


class NVMLError(Exception):
    pass


class FakeNvml:
    """pynvml's calls the sampler makes; GPU 1 cannot report power."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int = 2, fail_init: bool = False) -> None:
        self.count = count
        self.fail_init = fail_init
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}aaa-{h}"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=40 + h, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=(h + 1) * 2**30, total=8 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise NVMLError("Not Supported")
        return 123_500  # milliwatts

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 60 + h


def test_every_gpu_reading_with_node_and_gpu_labels(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml()
    run = Recorder()
    sampler = SystemMetrics(run, interval=1, node="n1", sources=[NvmlSource(nvml)])
    with caplog.at_level(logging.INFO, logger="steplog.system"):
        sampler.sample()
        sampler.sample()
    g0, g1 = {"node": "n1", "gpu": "0"}, {"node": "n1", "gpu": "1"}
    assert run.by("system/gpu_utilization_percent")[:2] == [(40.0, g0), (41.0, g1)]
    assert run.by("system/gpu_memory_used_bytes")[:2] == [(2.0**30, g0), (2.0**31, g1)]
    assert run.by("system/gpu_memory_utilization_percent")[:2] == [(12.5, g0), (25.0, g1)]
    assert run.by("system/gpu_temperature_celsius")[:2] == [(60.0, g0), (61.0, g1)]
    # Watts from NVML's milliwatts; GPU 1 has none, said once, not an error.
    assert run.by("system/gpu_power_watts") == [(123.5, g0), (123.5, g0)]
    said = [r.getMessage() for r in caplog.records if "power" in r.getMessage()]
    assert said == ["steplog system metrics: no power for GPU 1 (Not Supported)"]


def test_cuda_visible_devices_limits_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    uuid_of = FakeNvml(4).nvmlDeviceGetUUID
    assert _visible(4, None, uuid_of) == [0, 1, 2, 3]
    assert _visible(4, "2,0", uuid_of) == [2, 0]
    assert _visible(4, "GPU-3", uuid_of) == [3]
    assert _visible(4, "1,7,2", uuid_of) == [1]  # CUDA stops at an invalid entry
    assert _visible(4, "", uuid_of) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [gpu for gpu, _ in NvmlSource(FakeNvml(4)).handles] == ["1"]


def test_missing_libraries_and_gpus_degrade_with_one_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with caplog.at_level(logging.INFO, logger="steplog.system"):
        assert default_sources(psutil=None, nvml=FakeNvml(fail_init=True)) == []
    assert [r.getMessage() for r in caplog.records] == [
        "steplog system metrics: no GPU metrics (NVML: NVML Shared Library Not Found)"
    ]
    caplog.clear()
    no_gpu = FakeNvml(count=0)
    with caplog.at_level(logging.INFO, logger="steplog.system"):
        assert default_sources(psutil=None, nvml=no_gpu) == []
    assert len(caplog.records) == 1 and "sees no GPU" in caplog.records[0].getMessage()
    assert no_gpu.shutdowns == 1
    # Nothing to sample: start() starts no thread, stop() is fine.
    sampler = SystemMetrics(Recorder(), interval=1, sources=[]).start()
    assert sampler._thread is None
    sampler.stop()


def test_psutil_readings_are_plausible() -> None:
    import psutil

    run = Recorder()
    source = system.PsutilSource(psutil)
    time.sleep(0.05)
    SystemMetrics(run, interval=1, node="n1", sources=[source]).sample()
    names = {n for n, _, _ in run.points}
    assert names == {
        "system/cpu_utilization_percent",
        "system/memory_used_bytes",
        "system/memory_available_bytes",
        "system/memory_utilization_percent",
        "system/process_memory_rss_bytes",
        "system/disk_used_bytes",
        "system/disk_utilization_percent",
        "system/disk_read_bytes_per_second",
        "system/disk_write_bytes_per_second",
        "system/network_received_bytes_per_second",
        "system/network_sent_bytes_per_second",
    }
    total = psutil.virtual_memory().total
    assert 0 <= run.by("system/cpu_utilization_percent")[0][0] <= 100
    assert 0 < run.by("system/memory_used_bytes")[0][0] < total
    assert 0 < run.by("system/process_memory_rss_bytes")[0][0] < total
    assert all(v >= 0 for n, v, _ in run.points if n.endswith("_per_second"))
    assert all(labels == {"node": "n1"} for _, _, labels in run.points)


class Broken:
    name = "broken"
    closed = False

    def sample(self) -> list[system.Reading]:
        raise OSError("gone")

    def close(self) -> None:
        self.closed = True


def test_a_failing_source_is_dropped_and_the_rest_go_on(caplog: pytest.LogCaptureFixture) -> None:
    run = Recorder()
    broken = Broken()
    sampler = SystemMetrics(run, interval=1, node="n", sources=[broken, NvmlSource(FakeNvml(1))])
    with caplog.at_level(logging.WARNING, logger="steplog.system"):
        sampler.sample()
        sampler.sample()
    assert broken.closed and sampler.sources == ["nvml"]
    assert len(run.by("system/gpu_utilization_percent")) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "steplog system metrics: broken stopped (gone)"
    ]


def test_the_thread_samples_every_interval_and_stop_takes_a_last_sample() -> None:
    run = Recorder()
    nvml = FakeNvml(1)
    sampler = SystemMetrics(run, interval=0.1, node="n", sources=[NvmlSource(nvml)]).start()
    deadline = time.monotonic() + 10
    while sampler.samples < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sampler.samples >= 2
    before = sampler.samples
    sampler.stop()
    assert sampler.samples == before + 1 or sampler.samples == before + 2
    assert sampler._thread is not None and not sampler._thread.is_alive()
    assert nvml.shutdowns == 1
    count = sampler.samples
    sampler.stop()  # twice is fine
    assert sampler.samples == count


def test_start_once_per_run_and_the_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLOG_SYSTEM_METRICS_INTERVAL", "0.5")
    assert system.interval_from_env() == 0.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("STEPLOG_SYSTEM_METRICS_INTERVAL", bad)
        with pytest.raises(InvalidArgumentError) as err:
            system.interval_from_env()
        assert err.value.field == "STEPLOG_SYSTEM_METRICS_INTERVAL"
    monkeypatch.delenv("STEPLOG_SYSTEM_METRICS_INTERVAL")
    assert system.interval_from_env() == 10.0
    with pytest.raises(InvalidArgumentError):
        SystemMetrics(Recorder(), interval=0, sources=[])

    run = Recorder()
    first = system.start(run)
    try:
        assert system.start(run) is first
    finally:
        first.stop(timeout=5)
