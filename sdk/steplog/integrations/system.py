"""System metrics: what the machine was doing while a run trained.

Every `interval` seconds (STEPLOG_SYSTEM_METRICS_INTERVAL, 10 by default)
a sampler logs, as unstepped series under ``system/`` with a ``node`` label
(the host name), this machine's CPU, memory, disk and network (psutil) and
every GPU the process can see (NVML through nvidia-ml-py; a ``gpu`` label
with the device's NVML index, CUDA_VISIBLE_DEVICES honoured). What is
missing (psutil, the NVML library, a GPU, one reading a device does not
support) is skipped with one log line, never an error.

The sampler runs on its own small daemon thread, not on the writer's:
psutil and NVML calls can block (a wedged NVML driver answers in seconds),
and nothing that waits on them may hold up delivery. Logging from it is the
same non-blocking `run.log` the training loop calls. It stops when the run
completes, fails or is canceled (taking one last sample, so a run shorter
than the interval still has one) and at process exit; a forked child
(a data-loader worker) does not sample.

    with exp.start_logging(log_system_metrics=True) as run: ...
    sampler = SystemMetrics(run, interval=5).start()   # by hand
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, Protocol

from steplog.errors import InvalidArgumentError

log = logging.getLogger("steplog.system")

PREFIX = "system/"
DEFAULT_INTERVAL = 10.0
MIN_INTERVAL = 0.1
# How long stop() waits for the sampler's last sample (a blocked NVML call
# must not hold up run.complete()).
STOP_TIMEOUT = 5.0

# One reading: (series name without the prefix, value, extra labels).
Reading = tuple[str, float, Mapping[str, str]]


class _Logs(Protocol):
    """What the sampler needs of a Run."""

    def log(
        self,
        name: str,
        value: float | int | str | bool,
        description: str = "",
        step: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None: ...


class Source(Protocol):
    """One kind of readings (psutil's, NVML's)."""

    name: str

    def sample(self) -> list[Reading]: ...

    def close(self) -> None: ...


def interval_from_env() -> float:
    """STEPLOG_SYSTEM_METRICS_INTERVAL in seconds (>= 0.1), else 10."""
    raw = os.environ.get("STEPLOG_SYSTEM_METRICS_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= MIN_INTERVAL or value == float("inf"):
        raise InvalidArgumentError(
            f"STEPLOG_SYSTEM_METRICS_INTERVAL={raw!r}: seconds between samples, a number "
            f">= {MIN_INTERVAL}",
            field="STEPLOG_SYSTEM_METRICS_INTERVAL",
        )
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def node_name() -> str:
    """The host name, as a label value can carry it (256 characters, no
    control characters)."""
    name = _CONTROL.sub("_", socket.gethostname())[:256]
    return name or "unknown"


class PsutilSource:
    """CPU, memory, disk (usage of one path, read/write rates) and network
    rates of this machine, and this process's resident memory."""

    name = "psutil"

    def __init__(self, psutil: Any, disk_path: str = "/") -> None:
        self._ps = psutil
        self._disk_path = disk_path
        self._process = psutil.Process()
        self._broken: set[str] = set()
        # cpu_percent(None) compares with the previous call: prime it, and the
        # I/O counters the rates are computed from.
        psutil.cpu_percent(interval=None)
        self._last_time = time.monotonic()
        self._last_disk = self._counters("disk", psutil.disk_io_counters)
        self._last_net = self._counters("network", psutil.net_io_counters)

    def _counters(self, what: str, read: Callable[[], Any]) -> tuple[float, float] | None:
        if what in self._broken:
            return None
        try:
            counters = read()
        except Exception as exc:  # a container without /proc/diskstats, ...
            self._give_up(what, exc)
            return None
        if counters is None:
            self._give_up(what, "no counters on this machine")
            return None
        if what == "disk":
            return float(counters.read_bytes), float(counters.write_bytes)
        return float(counters.bytes_recv), float(counters.bytes_sent)

    def _give_up(self, what: str, why: object) -> None:
        if what not in self._broken:
            self._broken.add(what)
            log.info("steplog system metrics: no %s readings (%s)", what, why)

    def sample(self) -> list[Reading]:
        ps = self._ps
        out: list[Reading] = []
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-6)
        self._last_time = now
        if "cpu" not in self._broken:
            try:
                out.append(("cpu_utilization_percent", float(ps.cpu_percent(interval=None)), {}))
            except Exception as exc:
                self._give_up("cpu", exc)
        if "memory" not in self._broken:
            try:
                mem = ps.virtual_memory()
                out.append(("memory_used_bytes", float(mem.total - mem.available), {}))
                out.append(("memory_available_bytes", float(mem.available), {}))
                out.append(("memory_utilization_percent", float(mem.percent), {}))
                out.append(("process_memory_rss_bytes", float(self._process.memory_info().rss), {}))
            except Exception as exc:
                self._give_up("memory", exc)
        if "disk usage" not in self._broken:
            try:
                usage = ps.disk_usage(self._disk_path)
                out.append(("disk_used_bytes", float(usage.used), {}))
                out.append(("disk_utilization_percent", float(usage.percent), {}))
            except Exception as exc:
                self._give_up("disk usage", exc)
        for what, read, names, attr in (
            (
                "disk",
                ps.disk_io_counters,
                ("disk_read_bytes_per_second", "disk_write_bytes_per_second"),
                "_last_disk",
            ),
            (
                "network",
                ps.net_io_counters,
                ("network_received_bytes_per_second", "network_sent_bytes_per_second"),
                "_last_net",
            ),
        ):
            last = getattr(self, attr)
            current = self._counters(what, read)
            setattr(self, attr, current)
            if last is None or current is None:
                continue
            for name, before, after in zip(names, last, current, strict=True):
                # A counter that wrapped or was reset reads as 0, not negative.
                out.append((name, max(after - before, 0.0) / elapsed, {}))
        return out

    def close(self) -> None:
        pass


def _visible(count: int, env: str | None, uuid_of: Callable[[int], str]) -> list[int]:
    """The NVML indices CUDA_VISIBLE_DEVICES lets the process see: integers
    or (prefixes of) UUIDs; unset, every device; an entry that names no
    device ends the list, as in CUDA."""
    if env is None:
        return list(range(count))
    out: list[int] = []
    uuids: list[str] | None = None
    for entry in (e.strip() for e in env.split(",")):
        if not entry:
            break
        if entry.isdigit():
            index = int(entry)
            if index >= count:
                break
            out.append(index)
            continue
        if uuids is None:
            uuids = [uuid_of(i) for i in range(count)]
        match = [i for i, u in enumerate(uuids) if u.startswith(entry)]
        if len(match) != 1:
            break
        out.append(match[0])
    return out


class NvmlSource:
    """Utilization, memory, power and temperature of every visible GPU."""

    name = "nvml"

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        nvml.nvmlInit()  # raises NVMLError when there is no driver or library
        try:
            count = int(nvml.nvmlDeviceGetCount())

            def uuid_of(i: int) -> str:
                value = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
                return value.decode() if isinstance(value, bytes) else str(value)

            indices = _visible(count, os.environ.get("CUDA_VISIBLE_DEVICES"), uuid_of)
            self.handles = [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        except Exception:
            nvml.nvmlShutdown()
            raise
        # (gpu, reading) pairs a device does not support: skipped from then on.
        self._unsupported: set[tuple[str, str]] = set()

    def _read(self, gpu: str, what: str, fn: Callable[[Any], Any], handle: Any) -> Any:
        if (gpu, what) in self._unsupported:
            return None
        try:
            return fn(handle)
        except Exception as exc:  # NVMLError_NotSupported, a lost device, ...
            self._unsupported.add((gpu, what))
            log.info("steplog system metrics: no %s for GPU %s (%s)", what, gpu, exc)
            return None

    def _temperature(self, handle: Any) -> float:
        return float(self._nvml.nvmlDeviceGetTemperature(handle, self._nvml.NVML_TEMPERATURE_GPU))

    def sample(self) -> list[Reading]:
        nvml = self._nvml
        out: list[Reading] = []
        for gpu, handle in self.handles:
            labels = {"gpu": gpu}
            rates = self._read(gpu, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
            if rates is not None:
                out.append(("gpu_utilization_percent", float(rates.gpu), labels))
            mem = self._read(gpu, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
            if mem is not None:
                used, total = float(mem.used), float(mem.total)
                out.append(("gpu_memory_used_bytes", used, labels))
                if total > 0:
                    out.append(("gpu_memory_utilization_percent", 100.0 * used / total, labels))
            milliwatts = self._read(gpu, "power", nvml.nvmlDeviceGetPowerUsage, handle)
            if milliwatts is not None:
                out.append(("gpu_power_watts", float(milliwatts) / 1000.0, labels))
            celsius = self._read(gpu, "temperature", self._temperature, handle)
            if celsius is not None:
                out.append(("gpu_temperature_celsius", celsius, labels))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def _import(name: str) -> ModuleType | None:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def default_sources(
    disk_path: str = "/",
    *,
    psutil: Any = True,
    nvml: Any = True,
) -> list[Source]:
    """psutil's and NVML's sources, each only where it can work; what is
    missing is said once on the log. `psutil` / `nvml`: the module to use
    (a fake in tests), True to import it, None for none."""
    sources: list[Source] = []
    ps = _import("psutil") if psutil is True else psutil or None
    if ps is None:
        if psutil is True:
            log.info(
                "steplog system metrics: psutil is not installed, so no CPU, memory, disk or "
                "network metrics (pip install steplog[system])"
            )
    else:
        sources.append(PsutilSource(ps, disk_path))
    nv = _import("pynvml") if nvml is True else nvml or None
    if nv is None:
        if nvml is True:
            log.info(
                "steplog system metrics: nvidia-ml-py is not installed, so no GPU metrics "
                "(pip install steplog[system])"
            )
        return sources
    try:
        gpus = NvmlSource(nv)
    except Exception as exc:  # no driver, no library, no device
        log.info("steplog system metrics: no GPU metrics (NVML: %s)", exc)
        return sources
    if gpus.handles:
        sources.append(gpus)
    else:
        log.info("steplog system metrics: NVML sees no GPU this process may use")
        gpus.close()
    return sources


try:  # the client's one exit/fork registry, where there is one
    from steplog import _lifecycle as _registry
except ImportError:  # pragma: no cover - an older client layout
    _registry = None  # type: ignore[assignment]

# Samplers still running, ended at process exit without a last sample (the
# writer may already be closing then).
_live: weakref.WeakSet[SystemMetrics] = weakref.WeakSet()


def _stop_all() -> None:
    for sampler in list(_live):
        sampler.close_at_exit(0.0)


if _registry is None:  # pragma: no cover
    atexit.register(_stop_all)


class SystemMetrics:
    """Samples `sources` every `interval` seconds into `run` on a daemon
    thread. `start()` returns self; `stop()` takes one last sample and ends
    the thread (safe to call twice, and from a forked child, where it does
    nothing)."""

    def __init__(
        self,
        run: _Logs,
        interval: float | None = None,
        *,
        node: str | None = None,
        sources: Iterable[Source] | None = None,
        disk_path: str = "/",
    ) -> None:
        self.interval = interval_from_env() if interval is None else float(interval)
        if not self.interval >= MIN_INTERVAL:
            raise InvalidArgumentError(
                f"interval must be >= {MIN_INTERVAL} seconds, not {interval!r}", field="interval"
            )
        self._run = run
        self._node = node or node_name()
        self._sources = list(default_sources(disk_path) if sources is None else sources)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = False
        self._final = True  # take a last sample when stopped
        self.samples = 0

    @property
    def sources(self) -> list[str]:
        return [s.name for s in self._sources]

    def start(self) -> SystemMetrics:
        if self._thread is not None or not self._sources:
            return self
        self._thread = threading.Thread(target=self._loop, name="steplog-system", daemon=True)
        self._thread.start()
        _live.add(self)
        if _registry is not None:
            _registry.register(self)
        return self

    # steplog._lifecycle.Worker: at exit, end the thread without a last
    # sample; in a forked child, there is no thread to end.
    def close_at_exit(self, timeout: float) -> None:
        self._final = False
        self.stop(timeout=min(timeout, 1.0))

    def after_fork_in_child(self) -> None:
        self._stopped = True

    def sample(self) -> int:
        """Take one sample now (on the calling thread); how many values it logged."""
        labels = {"node": self._node}
        logged = 0
        for source in list(self._sources):
            try:
                readings = source.sample()
            except Exception as exc:
                log.warning("steplog system metrics: %s stopped (%s)", source.name, exc)
                self._sources.remove(source)
                source.close()
                continue
            for name, value, extra in readings:
                self._run.log(PREFIX + name, value, labels={**labels, **extra})
                logged += 1
        self.samples += 1
        return logged

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
        if self._final:  # a run shorter than the interval has a sample too
            self.sample()
        for source in self._sources:
            source.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._stopped or os.getpid() != self._pid:
            return
        self._stopped = True
        _live.discard(self)
        if _registry is not None:
            _registry.unregister(self)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "steplog system metrics: the last sample did not finish within %.0f s", timeout
                )


def start(run: Any, interval: float | None = None) -> SystemMetrics:
    """Start sampling for `run` (once per run: a second call returns the
    first sampler); `run.complete()` / `fail()` / `cancel()` stop it."""
    current = getattr(run, "_system_metrics", None)
    if isinstance(current, SystemMetrics):
        return current
    sampler = SystemMetrics(run, interval).start()
    run._system_metrics = sampler
    return sampler
