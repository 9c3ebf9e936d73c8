"""The live-progress collector with a stand-in source: what it exports, its
cache, rates, caps, and that a slow or failing database never hangs a scrape.
The collector is read from this (scraper) thread while its source runs on an
event loop in another thread, as in the service."""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ingest import config
from ingest.observe import progress
from ingest.observe.metrics import Metrics
from ingest.observe.progress import (
    ProgressCollector,
    RunProgress,
    SeriesProgress,
    Snapshot,
    flatten_labels,
    glob_to_like,
)

RUN = {"workspace": "default", "experiment": "mnist", "run": "mnist_1"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Hands out queued snapshots; can be made to hang or fail."""

    def __init__(self, *snapshots: Snapshot) -> None:
        self.snapshots = list(snapshots)
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        self.asked: tuple[Sequence[str], int] | None = None

    async def snapshot(self, patterns: Sequence[str], max_series: int) -> Snapshot:
        self.reads += 1
        self.asked = (patterns, max_series)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]


def run(
    points: int = 10, last: float | None = 995.0, run_id: str = "mnist_1", status: str = "Running"
) -> RunProgress:
    return RunProgress("default", "mnist", run_id, status, points, last, 900.0)


def series(
    name: str = "loss", value: float = 0.5, step: int = 7, labels: dict[str, str] | None = None
) -> SeriesProgress:
    return SeriesProgress("mnist_1", name, labels or {}, step, value, "default")


def make(
    source: Source, loop: asyncio.AbstractEventLoop, clock: Clock, **kw: object
) -> tuple[ProgressCollector, CollectorRegistry, Metrics]:
    metrics = Metrics(CollectorRegistry(), process=False)
    collector = ProgressCollector(
        source,
        loop,
        metrics=metrics,
        clock=clock,
        cache_s=2.0,
        timeout_s=5.0,
        **kw,  # type: ignore[arg-type]
    )
    metrics.registry.register(collector)
    return collector, metrics.registry, metrics


def value(registry: CollectorRegistry, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value("steplog_run_series_last_value", labels)


def test_exports_values_steps_status_and_ages(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    snap = Snapshot(
        db_now=1000.0,
        runs=[run(points=42, last=990.0)],
        series=[
            series("loss", 0.25, 7),
            series("loss", math.nan, 7, {"rank": "3"}),
            series("val_loss", math.inf, 2),
        ],
    )
    source = Source(snap)
    _, registry, _ = make(source, loop, clock, patterns=("loss", "*_loss"), max_series=9)
    assert registry.get_sample_value("steplog_run_status", {**RUN, "status": "Running"}) == 1
    assert registry.get_sample_value("steplog_run_points", RUN) == 42
    assert registry.get_sample_value("steplog_run_last_point_age_seconds", RUN) == 10
    assert registry.get_sample_value("steplog_run_last_point_timestamp_seconds", RUN) == 990
    loss = {**RUN, "series": "loss", "series_labels": ""}
    assert value(registry, loss) == 0.25
    assert registry.get_sample_value("steplog_run_series_last_step", loss) == 7
    nan = value(registry, {**loss, "series_labels": "rank=3"})
    assert nan is not None and math.isnan(nan)
    assert value(registry, {**RUN, "series": "val_loss", "series_labels": ""}) == math.inf
    assert source.asked == (("loss", "*_loss"), 9)
    # The exposition carries NaN as NaN, which the NaN-loss alert relies on.
    text = generate_latest(registry).decode()
    assert 'series="loss",series_labels="rank=3",workspace="default"} NaN' in text
    # Ages keep counting between database reads (by the collector's clock).
    clock.now += 1.5
    assert registry.get_sample_value("steplog_run_last_point_age_seconds", RUN) == 11.5


def test_a_run_without_points_ages_from_its_start(loop: asyncio.AbstractEventLoop) -> None:
    source = Source(Snapshot(db_now=1000.0, runs=[run(points=0, last=None)]))
    _, registry, _ = make(source, loop, Clock())
    assert registry.get_sample_value("steplog_run_last_point_age_seconds", RUN) == 100


def test_reads_are_cached_and_describe_reads_nothing(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    source = Source(Snapshot(db_now=1000.0, runs=[run()]))
    _, registry, _ = make(source, loop, clock)  # register() calls describe()
    assert source.reads == 0
    for _ in range(5):
        registry.get_sample_value("steplog_run_points", RUN)
    assert source.reads == 1
    clock.now += 2.5
    registry.get_sample_value("steplog_run_points", RUN)
    assert source.reads == 2


def test_points_per_second_from_successive_reads(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    source = Source(
        Snapshot(db_now=1000.0, runs=[run(points=100)]),
        Snapshot(db_now=1010.0, runs=[run(points=600)]),
        Snapshot(db_now=1020.0, runs=[run(points=1100)]),
        Snapshot(db_now=1030.0, runs=[run(points=50)]),  # a rewind hid points
        Snapshot(db_now=1040.0, runs=[run(points=150)]),
    )
    _, registry, _ = make(source, loop, clock)

    def rate() -> float | None:
        clock.now += 10
        return registry.get_sample_value("steplog_run_points_per_second", RUN)

    assert registry.get_sample_value("steplog_run_points_per_second", RUN) is None
    assert rate() == 50
    assert rate() == 50
    assert rate() is None  # the window starts over
    assert rate() == 10


def test_runs_that_end_drop_out(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    source = Source(
        Snapshot(db_now=1000.0, runs=[run()], series=[series()]),
        Snapshot(db_now=1010.0, runs=[], series=[]),
    )
    collector, registry, _ = make(source, loop, clock)
    loss = {**RUN, "series": "loss", "series_labels": ""}
    assert value(registry, loss) == 0.5
    clock.now += 10
    assert value(registry, loss) is None
    assert registry.get_sample_value("steplog_run_status", {**RUN, "status": "Running"}) is None
    assert collector._history == {}


def test_what_the_cap_left_out_is_reported(loop: asyncio.AbstractEventLoop) -> None:
    source = Source(Snapshot(db_now=1.0, runs=[run()], runs_omitted=4, series_omitted=17))
    _, registry, _ = make(source, loop, Clock(), max_series=1)
    assert registry.get_sample_value("steplog_progress_runs_omitted") == 4
    assert registry.get_sample_value("steplog_progress_series_omitted") == 17


def test_series_of_runs_not_exported_are_skipped(loop: asyncio.AbstractEventLoop) -> None:
    orphan = SeriesProgress("other_run", "loss", {}, 1, 1.0, "default")
    source = Source(Snapshot(db_now=1.0, runs=[run()], series=[orphan]))
    _, registry, _ = make(source, loop, Clock())
    text = generate_latest(registry).decode()
    assert "other_run" not in text


def test_a_slow_database_never_hangs_a_scrape(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    source = Source(Snapshot(db_now=1000.0, runs=[run()], series=[series()]))
    source.gate = asyncio.Event()
    collector, registry, metrics = make(source, loop, clock)
    collector.timeout_s = 0.05
    text = generate_latest(registry).decode()  # returns: no data yet, no hang
    assert "steplog_run_series_last_value{" not in text
    assert registry.get_sample_value("steplog_progress_refresh_errors_total", {"kind": "timeout"})
    # One read in flight, however many scrapes wait for it.
    generate_latest(registry)
    assert source.reads == 1
    loop.call_soon_threadsafe(source.gate.set)
    collector.timeout_s = 30.0
    loss = {**RUN, "series": "loss", "series_labels": ""}
    assert value(registry, loss) == 0.5
    assert source.reads == 1
    assert metrics.registry.get_sample_value("steplog_progress_refresh_duration_seconds_count") == 1


def test_a_failing_database_serves_the_last_snapshot(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    source = Source(Snapshot(db_now=1000.0, runs=[run()], series=[series()]))
    _, registry, _ = make(source, loop, clock)
    loss = {**RUN, "series": "loss", "series_labels": ""}
    assert value(registry, loss) == 0.5
    source.error = OSError("connection refused")
    clock.now += 60
    assert value(registry, loss) == 0.5
    assert registry.get_sample_value("steplog_progress_refresh_errors_total", {"kind": "error"})
    assert registry.get_sample_value("steplog_progress_snapshot_age_seconds") == 60


def test_collect_on_the_loop_thread_does_not_deadlock(loop: asyncio.AbstractEventLoop) -> None:
    source = Source(Snapshot(db_now=1.0, runs=[run()]))
    _, registry, _ = make(source, loop, Clock())

    async def scrape_on_loop() -> bytes:
        return generate_latest(registry)

    text = asyncio.run_coroutine_threadsafe(scrape_on_loop(), loop).result(10).decode()
    assert "steplog_progress_snapshot_age_seconds" in text


def test_a_closed_loop_serves_what_it_has() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    _, registry, _ = make(Source(Snapshot(db_now=1.0)), loop, Clock())
    assert b"steplog_run_status" in generate_latest(registry)


def test_flatten_labels_is_sorted_escaped_bounded_and_unique() -> None:
    assert flatten_labels({}) == ""
    assert flatten_labels({"rank": "3", "node": "a"}) == "node=a,rank=3"
    # A comma inside a value must not read like a second label.
    assert flatten_labels({"a": "1,b=2"}) != flatten_labels({"a": "1", "b": "2"})
    assert flatten_labels({"a": "x\\"}) != flatten_labels({"a": "x\\\\"})
    long_a = flatten_labels({"k": "v" * 500 + "a"})
    long_b = flatten_labels({"k": "v" * 500 + "b"})
    assert len(long_a) == len(long_b) == progress.MAX_SERIES_LABELS_CHARS
    assert long_a != long_b


def test_glob_to_like() -> None:
    assert glob_to_like("loss*") == "loss%"
    assert glob_to_like("*loss") == "%loss"
    assert glob_to_like("acc?") == "acc_"
    # LIKE's own wildcards in a name are literal.
    assert glob_to_like("top_1%") == "top\\_1\\%"
    assert glob_to_like("a\\b") == "a\\\\b"


def test_install_is_off_at_zero(loop: asyncio.AbstractEventLoop) -> None:
    registry = CollectorRegistry()
    off = progress.install(
        registry, None, loop, patterns=("loss",), max_series=0, heartbeat_timeout_s=300
    )
    assert off is None
    assert generate_latest(registry) == b""


def _parse(env: dict[str, str]) -> config.Config:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_sources(parser.parse_args([]), env)


def test_progress_settings() -> None:
    cfg = _parse({})
    assert cfg.progress_series == ("loss*", "*loss", "accuracy*", "lr")
    assert cfg.progress_max_series == 1000
    cfg = _parse({"STEPLOG_PROGRESS_SERIES": " loss , top_1 ,", "STEPLOG_PROGRESS_MAX_SERIES": "0"})
    assert cfg.progress_series == ("loss", "top_1")
    assert cfg.progress_max_series == 0
    with pytest.raises(config.ConfigError, match="STEPLOG_PROGRESS_SERIES"):
        _parse({"STEPLOG_PROGRESS_SERIES": " , "})
    with pytest.raises(config.ConfigError, match="STEPLOG_PROGRESS_MAX_SERIES"):
        _parse({"STEPLOG_PROGRESS_MAX_SERIES": "-1"})


def test_run_names_can_be_hashed(loop: asyncio.AbstractEventLoop) -> None:
    """--progress-run-names false: experiment and run labels carry a keyed
    hash, the same for the same name (alerts keep their series); the names
    appear nowhere in the exposition."""
    snap = Snapshot(db_now=1000.0, runs=[run(points=3)], series=[series("loss", 0.5, 1)])
    _, registry, _ = make(
        Source(snap), loop, Clock(), patterns=("loss",), run_names=False, name_key=b"pepper"
    )
    text = generate_latest(registry).decode()
    assert "mnist" not in text
    hidden = {
        "workspace": "default",
        "experiment": progress.hashed_name("mnist", b"pepper"),
        "run": progress.hashed_name("mnist_1", b"pepper"),
    }
    assert hidden["run"].startswith("h-") and len(hidden["run"]) == 18
    assert registry.get_sample_value("steplog_run_points", hidden) == 3
    assert value(registry, {**hidden, "series": "loss", "series_labels": ""}) == 0.5
    # keyed: another key gives other labels; no key still hides the name
    assert progress.hashed_name("mnist", b"other") != hidden["experiment"]
    assert progress.hashed_name("mnist") != "mnist"


def test_run_names_setting() -> None:
    assert _parse({}).progress_run_names is True
    assert _parse({"STEPLOG_PROGRESS_RUN_NAMES": "false"}).progress_run_names is False
    with pytest.raises(config.ConfigError, match="STEPLOG_PROGRESS_RUN_NAMES"):
        _parse({"STEPLOG_PROGRESS_RUN_NAMES": "maybe"})
