"""Live training progress for Prometheus: the latest value and step of chosen
scalar series of active runs, their points per second, the age of their last
point, and their status, so Prometheus can alert on a NaN loss or a stalled
job without a second pipeline.

Over 500 lines: one collector (its query, its snapshot cache, the families
it exports) that Prometheus scrapes as a unit.

Where the numbers come from: the series table already keeps last_step,
last_value, point_count and last_time per series (the write pipeline updates
them in the commit that stores the points), and runs keeps status and
last_seen. So a scrape reads a few rows instead of points.

Threads: prometheus-client calls `collect()` in its HTTP server's thread,
while the asyncpg pool belongs to the service's asyncio loop. The collector
hands the read to that loop with `asyncio.run_coroutine_threadsafe` and waits
for it at most `timeout_s`; the result is cached for `cache_s`, and at most
one read is in flight, so many scrapers cost one query. A slow database never
hangs a scrape: it gets the previous snapshot (or none) and a counted
timeout. Reading at scrape time rather than from a periodic task means no
database work while nobody scrapes, and fresh values when someone does.

Bounded cardinality: only runs in an active status (Running, Finalizing,
CancelRequested; Running shows as NotResponding after missed heartbeats), only
numeric scalar series whose name matches the allow-list, at most `max_series`
series and `max_series` runs, newest runs first; what the cap leaves out is
reported. Series labels are flattened into one bounded `series_labels` label.
Runs that end drop out of the next snapshot, so their series go stale.

Names: with `run_names=False` (`--progress-run-names false`) the `experiment`
and `run` labels carry `h-` and 16 hex digits of HMAC-SHA256(key, name)
instead of the names (the key is the token pepper when one is set, so the
hashes cannot be matched against guessed names without it); the same name
gives the same label on every replica and after a restart, so alerts and
dashboards keep their series. `workspace`, the series name and its labels stay.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.config import Config
from ingest.core.kinds import KIND_SCALAR, VALUE_NUMERIC
from ingest.core.model import RunStatus
from ingest.observe.metrics import Metrics

log = logging.getLogger(__name__)

# Stored statuses whose runs are exported. NotResponding is derived from Running.
ACTIVE_STATUSES = (RunStatus.RUNNING, RunStatus.FINALIZING, RunStatus.CANCEL_REQUESTED)
# The series exported by default: the setting progress_series (ingest/config.py).
DEFAULT_PATTERNS = Config.progress_series
MAX_SERIES_LABELS_CHARS = 200
# Points per second are measured over about this many seconds of snapshots.
RATE_WINDOW_S = 30.0

RUN_LABELS = ["workspace", "experiment", "run"]
SERIES_LABELS = [*RUN_LABELS, "series", "series_labels"]


@dataclass(frozen=True)
class RunProgress:
    workspace: str
    experiment: str
    run_id: str
    status: str
    points: int
    # Seconds since the epoch, by the database's clock.
    last_point_time: float | None
    started_time: float


@dataclass(frozen=True)
class SeriesProgress:
    run_id: str
    name: str
    labels: Mapping[str, str]
    last_step: int
    last_value: float
    # A run is (workspace, run_id): run ids are per workspace.
    workspace: str


@dataclass(frozen=True)
class Snapshot:
    """One read of the database. `db_now` is the database's clock at the read,
    so ages do not depend on this host's clock agreeing with the database's."""

    db_now: float
    runs: Sequence[RunProgress] = ()
    series: Sequence[SeriesProgress] = ()
    runs_omitted: int = 0
    series_omitted: int = 0


class ProgressSource(Protocol):
    async def snapshot(self, patterns: Sequence[str], max_series: int) -> Snapshot: ...


# -- the store ------------------------------------------------------------------------


def glob_to_like(pattern: str) -> str:
    """A name glob (`*` any run of characters, `?` one) as a SQL LIKE pattern."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _epoch(value: Any) -> float | None:
    return None if value is None else float(value)


class ProgressStore:
    """The progress reads, on the service's asyncpg pool. Read only; one short
    repeatable-read transaction so runs and series agree with each other."""

    def __init__(self, pool: Any, heartbeat_timeout_s: float, timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.timeout_s = timeout_s

    async def snapshot(self, patterns: Sequence[str], max_series: int) -> Snapshot:
        active = [s.value for s in ACTIVE_STATUSES]
        likes = [glob_to_like(p) for p in patterns]
        t = self.timeout_s
        async with (
            self.pool.acquire(timeout=t) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            db_now = float(await conn.fetchval("SELECT extract(epoch FROM now())", timeout=t))
            total_runs = int(
                await conn.fetchval(
                    "SELECT count(*) FROM runs WHERE status = ANY($1::text[])", active, timeout=t
                )
            )
            runs = await conn.fetch(
                "SELECT r.run_id, r.workspace, e.name AS experiment,"
                " CASE WHEN r.status = 'Running'"
                "  AND r.last_seen < now() - make_interval(secs => $2::float8)"
                "  THEN 'NotResponding' ELSE r.status END AS status,"
                " extract(epoch FROM COALESCE(r.start_time, r.created_at)) AS started,"
                " extract(epoch FROM p.last_time) AS last_time, COALESCE(p.points, 0) AS points"
                " FROM runs r JOIN experiments e USING (experiment_id)"
                " LEFT JOIN LATERAL (SELECT sum(s.point_count)::bigint AS points,"
                "   max(s.last_time) AS last_time FROM series s"
                "   WHERE s.workspace = r.workspace AND s.run_id = r.run_id) p"
                "  ON true"
                " WHERE r.status = ANY($1::text[])"
                " ORDER BY r.created_at DESC, r.run_id"
                " LIMIT $3",
                active,
                float(self.heartbeat_timeout_s),
                max_series,
                timeout=t,
            )
            run_keys = [(r["workspace"], r["run_id"]) for r in runs]
            total_series = int(
                await conn.fetchval(
                    "SELECT count(*) FROM series s JOIN runs r USING (workspace, run_id)"
                    " WHERE r.status = ANY($1::text[]) AND s.kind = $2 AND s.value_type = $3"
                    " AND s.last_step IS NOT NULL AND s.name LIKE ANY($4::text[])",
                    active,
                    KIND_SCALAR,
                    VALUE_NUMERIC,
                    likes,
                    timeout=t,
                )
            )
            series = await conn.fetch(
                "SELECT s.workspace, s.run_id, s.name, s.labels, s.last_step, s.last_value"
                " FROM series s JOIN runs r USING (workspace, run_id)"
                " WHERE (s.workspace, s.run_id) IN (SELECT * FROM unnest($6::text[], $1::text[]))"
                " AND s.kind = $2 AND s.value_type = $3"
                " AND s.last_step IS NOT NULL AND s.name LIKE ANY($4::text[])"
                " ORDER BY r.created_at DESC, r.run_id, s.series_id"
                " LIMIT $5",
                [k[1] for k in run_keys],
                KIND_SCALAR,
                VALUE_NUMERIC,
                likes,
                max_series,
                [k[0] for k in run_keys],
                timeout=t,
            )
        return Snapshot(
            db_now=db_now,
            runs=[
                RunProgress(
                    workspace=r["workspace"],
                    experiment=r["experiment"],
                    run_id=r["run_id"],
                    status=r["status"],
                    points=int(r["points"]),
                    last_point_time=_epoch(r["last_time"]),
                    started_time=float(r["started"]),
                )
                for r in runs
            ],
            series=[
                SeriesProgress(
                    run_id=s["run_id"],
                    name=s["name"],
                    labels=_labels(s["labels"]),
                    last_step=int(s["last_step"]),
                    last_value=math.nan if s["last_value"] is None else float(s["last_value"]),
                    workspace=s["workspace"],
                )
                for s in series
            ],
            runs_omitted=max(0, total_runs - len(runs)),
            series_omitted=max(0, total_series - len(series)),
        )


def _labels(value: Any) -> Mapping[str, str]:
    if isinstance(value, str):  # a connection without the pool's jsonb codec
        value = json.loads(value)
    return {str(k): str(v) for k, v in (value or {}).items()}


# -- the collector ---------------------------------------------------------------------


def flatten_labels(labels: Mapping[str, str], limit: int = MAX_SERIES_LABELS_CHARS) -> str:
    """{"rank": "3", "node": "a"} -> 'node=a,rank=3', at most `limit` characters.

    Label keys are identifiers, so escaping `\\` and `,` in values keeps two
    label sets from flattening alike; a value cut short ends in a hash of the
    whole, so it stays unique too."""
    text = ",".join(
        f"{k}={v.replace(chr(92), chr(92) * 2).replace(',', chr(92) + ',')}"
        for k, v in sorted(labels.items())
    )
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return text[: limit - len(digest) - 2] + "~#" + digest


@dataclass
class _View:
    """A snapshot with what the collector derived from it."""

    snapshot: Snapshot
    fetched_at: float  # collector clock (monotonic)
    # Per (workspace, run_id).
    rates: dict[tuple[str, str], float] = field(default_factory=dict)


class ProgressCollector(Collector):
    """A prometheus-client collector reading progress from a ProgressSource
    on the service's event loop (see the module docstring)."""

    def __init__(
        self,
        source: ProgressSource,
        loop: asyncio.AbstractEventLoop,
        *,
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        max_series: int = 1000,
        metrics: Metrics | None = None,
        cache_s: float = 2.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        run_names: bool = True,
        name_key: bytes = b"",
    ) -> None:
        self.source = source
        self.run_names = run_names
        self.name_key = name_key
        self.loop = loop
        self.patterns = tuple(patterns)
        self.max_series = max_series
        self.metrics = metrics
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._view: _View | None = None
        self._inflight: concurrent.futures.Future[Snapshot] | None = None
        self._history: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def _name(self, name: str) -> str:
        return name if self.run_names else hashed_name(name, self.name_key)

    # prometheus-client asks for names at registration; no database read then.
    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._current())

    def _current(self) -> _View | None:
        with self._lock:
            view = self._view
            if view is not None and self.clock() - view.fetched_at < self.cache_s:
                return view
            fut = self._inflight
            started = fut is None
            if fut is None:
                read = self._read()
                try:
                    fut = asyncio.run_coroutine_threadsafe(read, self.loop)
                except RuntimeError:  # the loop is closed: the service is stopping
                    read.close()
                    return view
                self._inflight = fut
        if started:
            # Outside the lock: a read that already finished runs _apply right here.
            fut.add_done_callback(self._apply)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return view  # waiting here would block the very loop doing the read
        try:
            fut.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            self._count_error("timeout")
            log.warning(
                "progress read took over %.1fs; serving the previous snapshot", self.timeout_s
            )
        except Exception:  # counted and logged in _apply
            pass
        self._apply(fut)
        return self._view

    async def _read(self) -> Snapshot:
        started = time.perf_counter()
        snap = await self.source.snapshot(self.patterns, self.max_series)
        if self.metrics is not None:
            self.metrics.progress_refresh_seconds.observe(time.perf_counter() - started)
        return snap

    def _apply(self, fut: concurrent.futures.Future[Snapshot]) -> None:
        """Take a finished read's result; runs once per read, from whichever
        thread gets here first (the waiting scraper or the loop's callback)."""
        if not fut.done():
            return
        with self._lock:
            if self._inflight is not fut:
                return
            self._inflight = None
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                self._count_error("error")
                log.warning("progress read failed: %s", exc)
                return
            self._view = self._derive(fut.result())

    def _derive(self, snap: Snapshot) -> _View:
        """Points per second per run, from the point counts of successive
        snapshots over about RATE_WINDOW_S (a rewind that lowers the count
        starts the window over)."""
        view = _View(snap, self.clock())
        seen = set()
        for run in snap.runs:
            key = (run.workspace, run.run_id)
            seen.add(key)
            hist = self._history.get(key)
            if hist is None or (hist and run.points < hist[-1][1]):
                hist = self._history[key] = deque()
            if not hist or snap.db_now > hist[-1][0]:
                hist.append((snap.db_now, run.points))
            while len(hist) > 2 and hist[1][0] <= snap.db_now - RATE_WINDOW_S:
                hist.popleft()
            if len(hist) >= 2:
                (t0, n0), (t1, n1) = hist[0], hist[-1]
                view.rates[key] = (n1 - n0) / (t1 - t0)
        for gone in self._history.keys() - seen:
            del self._history[gone]
        return view

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.progress_refresh_errors.labels(kind).inc()

    def _families(self, view: _View | None) -> list[Metric]:
        status = GaugeMetricFamily(
            "steplog_run_status",
            "1 for each active run, labelled with its status "
            "(Running, NotResponding, Finalizing, CancelRequested).",
            labels=[*RUN_LABELS, "status"],
        )
        points = GaugeMetricFamily(
            "steplog_run_points",
            "Points stored in the run (all series, as queries see them).",
            labels=RUN_LABELS,
        )
        rate = GaugeMetricFamily(
            "steplog_run_points_per_second",
            f"Points stored per second in the run, over about the last {RATE_WINDOW_S:g}s.",
            labels=RUN_LABELS,
        )
        age = GaugeMetricFamily(
            "steplog_run_last_point_age_seconds",
            "Seconds since the run's last point (since its start if it has none).",
            labels=RUN_LABELS,
        )
        last_time = GaugeMetricFamily(
            "steplog_run_last_point_timestamp_seconds",
            "When the run's last point was stored (since its start if it has none).",
            labels=RUN_LABELS,
        )
        value = GaugeMetricFamily(
            "steplog_run_series_last_value",
            "Latest value of an allow-listed scalar series of an active run (NaN stays NaN).",
            labels=SERIES_LABELS,
        )
        step = GaugeMetricFamily(
            "steplog_run_series_last_step",
            "Step (or index, if unstepped) of that latest value.",
            labels=SERIES_LABELS,
        )
        runs_omitted = GaugeMetricFamily(
            "steplog_progress_runs_omitted",
            "Active runs left out of the progress export by the cap.",
        )
        series_omitted = GaugeMetricFamily(
            "steplog_progress_series_omitted",
            "Allow-listed series of active runs left out of the progress export by the cap.",
        )
        snapshot_age = GaugeMetricFamily(
            "steplog_progress_snapshot_age_seconds",
            "Age of the progress data served (grows when database reads fail or are slow).",
        )
        families: list[Metric] = [
            status,
            points,
            rate,
            age,
            last_time,
            value,
            step,
            runs_omitted,
            series_omitted,
            snapshot_age,
        ]
        if view is None:
            return families
        snap = view.snapshot
        since = max(0.0, self.clock() - view.fetched_at)
        now = snap.db_now + since
        names: dict[tuple[str, str], list[str]] = {}
        for run in snap.runs:
            labels = [run.workspace, self._name(run.experiment), self._name(run.run_id)]
            key = (run.workspace, run.run_id)
            names[key] = labels
            status.add_metric([*labels, run.status], 1.0)
            points.add_metric(labels, float(run.points))
            if key in view.rates:
                rate.add_metric(labels, view.rates[key])
            last = run.last_point_time if run.last_point_time is not None else run.started_time
            last_time.add_metric(labels, last)
            age.add_metric(labels, max(0.0, now - last))
        for s in snap.series:
            run_labels = names.get((s.workspace, s.run_id))
            if run_labels is None:
                continue
            labels = [*run_labels, s.name, flatten_labels(s.labels)]
            value.add_metric(labels, s.last_value)
            step.add_metric(labels, float(s.last_step))
        runs_omitted.add_metric([], float(snap.runs_omitted))
        series_omitted.add_metric([], float(snap.series_omitted))
        snapshot_age.add_metric([], since)
        return families


def hashed_name(name: str, key: bytes = b"") -> str:
    """The label that stands for a run or experiment name when names are off."""
    return "h-" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:16]


def install(
    registry: Any,
    pool: Any,
    loop: asyncio.AbstractEventLoop,
    *,
    patterns: Sequence[str],
    max_series: int,
    heartbeat_timeout_s: float,
    metrics: Metrics | None = None,
    run_names: bool = True,
    name_key: bytes = b"",
) -> ProgressCollector | None:
    """Register the progress collector for a service (None when max_series is 0)."""
    if max_series <= 0 or not patterns:
        return None
    collector = ProgressCollector(
        ProgressStore(pool, heartbeat_timeout_s),
        loop,
        patterns=patterns,
        max_series=max_series,
        metrics=metrics,
        run_names=run_names,
        name_key=name_key,
    )
    registry.register(collector)
    return collector
