"""The web UI's reads (ingest/ui): experiments, runs, series and their points,
tables, evaluation documents, images and files, shaped for a page.

Read only: nothing here writes, so the UI can run against a read replica.
Over 500 lines: one read-only store class with a method per page's read (each
its SQL and its bound), which share the series lookup, the byte bounds and the
run row's shape; the long-series summaries are apart (view_blocks.py).
Every answer is bounded: in rows by the caller's limits, and in bytes by
`max_bytes` (the database sums the encoded size of variable-length values
before anything reaches this process; fixed-size rows are bounded by count).

Charts. `chart` reads the scalar series of a metric for several runs in one
query. When a series has more points in the asked range than the chart can
show (`width` buckets of equal x extent over the range common to all series,
by step or by wall time), each bucket keeps its minimum, its maximum, its
last point and its first NaN, each with its own step and time: a spike, a
dip or a NaN inside a bucket is always drawn, and the line ends where the
data ends. Infinities count as extremes. A series with few enough points in
the range (at most four per bucket) comes whole, so zooming in re-queries
the range at full resolution. Steps above 2**53 in a downsampled answer are
rounded to a float64 (the aggregation carries them as doubles).

Long series (BlockCache, ingest/store/view_blocks.py). A series of more than
CACHE_MIN_POINTS points is summarized once into about BLOCKS blocks of equal
step span, as columns (per block its count and the step, time and value of its
minimum, maximum, last point and first NaN: `Summary`), by one query per
series that PostgreSQL aggregates and sends as a fixed-width binary COPY
(TimescaleDB's first/last give the step and time at a block's extremes; on
ties any of the tied points). A chart of such series is reduced from the
blocks with numpy (`reduce_summary`: reduceat over the blocks of each bucket),
with no query of the points: a bucket is the blocks whose first step falls in
it, so its edges fall on block edges (at most one block, 1/4,096 of the
series, from the equal-extent edge), and its minimum, maximum, last point and
first NaN are exact for those blocks. A zoom cuts at most two blocks; their
points inside the range come from the database, so a zoom's extremes and count
are exact too. The blocks are kept in memory (LRU, bytes bounded) and in files
(one per series, in a directory of this process, the same bytes bound), grown
as the series grows, so a restarted UI process answers from its files; it
still never writes to the database."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from ingest.core.evaluations import SCHEMA_NAMES
from ingest.core.kinds import (
    KIND_EVALUATION,
    KIND_HISTOGRAM,
    KIND_IMAGE,
    KIND_LABELS,
    KIND_SCALAR,
    KIND_TABLE,
    VALUE_TEXT,
)
from ingest.store.view_blocks import (
    DEFAULT_CACHE_BYTES,
    BlockCache,
    Blocks,
    Points,
    Summary,
    reduce_summary,
    ts,
)

log = logging.getLogger("steplog.ui")

# The kinds, value types and evaluation schemas as the protocol numbers them.
KIND_NAMES = {k: v for k, v in KIND_LABELS.items() if k != KIND_EVALUATION}
EVALUATION_SCHEMAS = SCHEMA_NAMES

MAX_RUNS = 2000
MAX_SERIES = 2000
MAX_CHART_SERIES = 256
MAX_WIDTH = 4096
# Encoded bytes of one chart point in JSON (step, time, value) at most.
POINT_BYTES = 64
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MIN_STEP = -(2**63)
MAX_STEP = 2**63 - 1


class ViewError(Exception):
    """A read that cannot be answered: an HTTP status and a message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(message: str) -> ViewError:
    return ViewError(404, message)


def bad(message: str) -> ViewError:
    return ViewError(400, message)


def number(value: float | None) -> float | str | None:
    """A float for JSON: NaN and the infinities as the strings JavaScript's
    Number() reads back ("NaN", "Infinity", "-Infinity")."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _tags(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return dict(json.loads(value) if isinstance(value, str) else value)


_RUN = """
    r.run_id, r.number, r.display_name, r.description, r.run_type, r.parent_run_id,
    r.root_run_id, r.created_at, r.start_time, r.end_time, r.error_message, r.error_code,
    r.tags, r.properties, e.name AS experiment,
    CASE WHEN r.status = 'Running' AND r.last_seen < now() - make_interval(secs => $HB)
         THEN 'NotResponding' ELSE r.status END AS status,
    extract(epoch FROM coalesce(r.end_time, CASE WHEN r.status IN ('Running', 'NotResponding',
        'Finalizing', 'CancelRequested') THEN now() END) - r.start_time)::float8 AS duration_s
"""


def _run(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_id": r["run_id"],
        "number": r["number"],
        "display_name": r["display_name"],
        "description": r["description"],
        "run_type": r["run_type"],
        "parent_run_id": r["parent_run_id"],
        "experiment": r["experiment"],
        "status": r["status"],
        "created_at": _iso(r["created_at"]),
        "start_time": _iso(r["start_time"]),
        "end_time": _iso(r["end_time"]),
        "duration_s": r["duration_s"],
        "error": r["error_message"],
        "tags": _tags(r["tags"]),
        "properties": _tags(r["properties"]),
    }


@dataclass(frozen=True)
class SeriesRef:
    """Series of a chart: the series named `name` of each run (every label set)."""

    run_id: str
    name: str


class ViewStore:
    """The UI's queries over one asyncpg pool (a replica will do)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        heartbeat_timeout_s: float = 300.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_dir: Path | None = None,
        cache_namespace: str = "",
    ) -> None:
        self.pool = pool
        self.max_bytes = max_bytes
        self.cache = BlockCache(pool, cache_bytes, cache_dir, cache_namespace)
        self._run_sql = _RUN.replace("$HB", repr(float(heartbeat_timeout_s)))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(sql, *args))

    # -- experiments and runs ---------------------------------------------------

    async def experiments(
        self, workspace: str, recent: int = 5, limit: int = 500
    ) -> dict[str, Any]:
        """Experiments (not archived first, most recently active first), each
        with its `recent` latest runs; and the workspace's latest runs."""
        rows = await self._fetch(
            "SELECT e.experiment_id, e.name, e.tags, e.archived, e.created_at, e.run_count,"
            " (SELECT max(r.created_at) FROM runs r WHERE r.experiment_id = e.experiment_id)"
            " AS last_run_at FROM experiments e WHERE e.workspace = $1"
            " ORDER BY e.archived, last_run_at DESC NULLS LAST, e.name LIMIT $2",
            workspace,
            limit + 1,
        )
        truncated = len(rows) > limit
        rows = rows[:limit]
        ids = [r["experiment_id"] for r in rows]
        runs = await self._fetch(
            f"SELECT x.experiment_id, {self._run_sql} FROM unnest($1::bigint[]) x(experiment_id)"
            " CROSS JOIN LATERAL (SELECT * FROM runs WHERE experiment_id = x.experiment_id"
            " ORDER BY created_at DESC LIMIT $2) r JOIN experiments e"
            " ON e.experiment_id = r.experiment_id ORDER BY r.created_at DESC",
            ids,
            recent,
        )
        by_exp: dict[int, list[dict[str, Any]]] = {}
        for r in runs:
            by_exp.setdefault(r["experiment_id"], []).append(_run(r))
        latest = await self._fetch(
            f"SELECT {self._run_sql} FROM runs r JOIN experiments e USING (experiment_id)"
            " WHERE r.workspace = $1 ORDER BY r.created_at DESC LIMIT 20",
            workspace,
        )
        return {
            "workspace": workspace,
            "experiments": [
                {
                    "name": r["name"],
                    "tags": _tags(r["tags"]),
                    "archived": r["archived"],
                    "created_at": _iso(r["created_at"]),
                    "run_count": r["run_count"],
                    "last_run_at": _iso(r["last_run_at"]),
                    "recent_runs": by_exp.get(r["experiment_id"], []),
                }
                for r in rows
            ],
            "truncated": truncated,
            "recent_runs": [_run(r) for r in latest],
        }

    async def runs(
        self, workspace: str, experiment: str, metrics: Sequence[str], limit: int = MAX_RUNS
    ) -> dict[str, Any]:
        """Every run of an experiment (children too, with their parent id, so
        the page draws the tree), newest first, with the latest value of each
        chosen metric; the experiment's scalar metric names."""
        exp = await self._fetch(
            "SELECT experiment_id, tags, archived FROM experiments WHERE workspace = $1"
            " AND name = $2",
            workspace,
            experiment,
        )
        if not exp:
            raise not_found(f"experiment {experiment!r} does not exist in workspace {workspace!r}")
        eid = exp[0]["experiment_id"]
        limit = max(1, min(limit, MAX_RUNS))
        # Bytes: tags, properties and names are the variable parts of a row.
        rows = await self._fetch(
            f"SELECT * FROM (SELECT {self._run_sql},"
            " sum(octet_length(r.tags::text) + octet_length(r.properties::text)"
            " + octet_length(r.display_name) + octet_length(r.description) + 400)"
            " OVER (ORDER BY r.created_at DESC, r.run_id) AS used"
            " FROM runs r JOIN experiments e USING (experiment_id) WHERE r.experiment_id = $1"
            " ORDER BY r.created_at DESC, r.run_id LIMIT $2) t WHERE used <= $3",
            eid,
            limit + 1,
            self.max_bytes // 2,
        )
        truncated = len(rows) > limit
        rows = rows[:limit]
        runs = [_run(r) for r in rows]
        names = list(metrics)[:50]
        if names and runs:
            latest = await self._fetch(
                "SELECT DISTINCT ON (run_id, name) run_id, name, last_value, last_text, last_step,"
                " value_type FROM series WHERE workspace = $1 AND run_id = ANY($2::text[])"
                " AND name = ANY($3::text[]) AND kind = $4 ORDER BY run_id, name, labels_key",
                workspace,
                [r["run_id"] for r in runs],
                names,
                KIND_SCALAR,
            )
            values: dict[str, dict[str, Any]] = {}
            for s in latest:
                v = s["last_text"] if s["value_type"] == VALUE_TEXT else number(s["last_value"])
                values.setdefault(s["run_id"], {})[s["name"]] = v
            for run in runs:
                run["metrics"] = values.get(run["run_id"], {})
        names_rows = await self._fetch(
            "SELECT DISTINCT s.name FROM series s JOIN runs r ON r.workspace = s.workspace"
            " AND r.run_id = s.run_id WHERE r.experiment_id = $1 AND s.kind = $2"
            " ORDER BY s.name LIMIT 500",
            eid,
            KIND_SCALAR,
        )
        return {
            "experiment": experiment,
            "tags": _tags(exp[0]["tags"]),
            "archived": exp[0]["archived"],
            "runs": runs,
            "truncated": truncated,
            "metric_names": [r["name"] for r in names_rows],
        }

    async def run(self, workspace: str, run_id: str) -> dict[str, Any]:
        """One run, its direct children and its series."""
        rows = await self._fetch(
            f"SELECT {self._run_sql} FROM runs r JOIN experiments e USING (experiment_id)"
            " WHERE r.workspace = $1 AND (r.run_id = $2 OR r.parent_run_id = $2)"
            " ORDER BY r.created_at LIMIT $3",
            workspace,
            run_id,
            MAX_RUNS,
        )
        found = [r for r in rows if r["run_id"] == run_id]
        if not found:
            raise not_found(f"run {run_id!r} does not exist in workspace {workspace!r}")
        out = _run(found[0])
        out["children"] = [_run(r) for r in rows if r["run_id"] != run_id]
        out["series"] = await self.series(workspace, run_id)
        return out

    async def runs_by_id(self, workspace: str, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        rows = await self._fetch(
            f"SELECT {self._run_sql} FROM runs r JOIN experiments e USING (experiment_id)"
            " WHERE r.workspace = $1 AND r.run_id = ANY($2::text[])",
            workspace,
            list(run_ids)[:MAX_CHART_SERIES],
        )
        return [_run(r) for r in rows]

    async def series(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT * FROM (SELECT series_id, name, labels, kind, value_type, stepped,"
            " point_count, last_step, last_value, last_text, description,"
            " sum(octet_length(name) + 2 * octet_length(labels::text) + octet_length(description)"
            " + coalesce(octet_length(last_text), 0) + 160) OVER (ORDER BY series_id) AS used"
            " FROM series WHERE workspace = $1 AND run_id = $2 ORDER BY series_id LIMIT $3) t"
            " WHERE used <= $4",
            workspace,
            run_id,
            MAX_SERIES,
            self.max_bytes // 2,
        )
        out = []
        for r in rows:
            kind = r["kind"]
            if kind == KIND_EVALUATION:
                kind_name = EVALUATION_SCHEMAS.get(r["value_type"], "evaluation")
            elif kind == KIND_SCALAR and r["value_type"] == VALUE_TEXT:
                kind_name = "text"
            else:
                kind_name = KIND_NAMES.get(kind, f"kind{kind}")
            out.append(
                {
                    "name": r["name"],
                    "labels": _tags(r["labels"]),
                    "kind": kind_name,
                    "stepped": r["stepped"],
                    "point_count": r["point_count"],
                    "last_step": r["last_step"],
                    "last_value": r["last_text"]
                    if r["value_type"] == VALUE_TEXT
                    else number(r["last_value"]),
                    "description": r["description"],
                }
            )
        return out

    # -- charts -----------------------------------------------------------------

    async def _scalar_series(
        self, workspace: str, refs: Sequence[SeriesRef]
    ) -> list[asyncpg.Record]:
        runs = [r.run_id for r in refs]
        names = [r.name for r in refs]
        return await self._fetch(
            "SELECT s.series_id, s.run_id, s.name, s.labels, s.point_count, s.last_step,"
            " s.out_of_order FROM series s"
            " JOIN unnest($2::text[], $3::text[]) AS q(run_id, name)"
            " ON s.run_id = q.run_id AND s.name = q.name"
            " WHERE s.workspace = $1 AND s.kind = $4 AND s.value_type <> $5"
            " ORDER BY s.series_id LIMIT $6",
            workspace,
            runs,
            names,
            KIND_SCALAR,
            VALUE_TEXT,
            MAX_CHART_SERIES + 1,
        )

    async def chart(
        self,
        workspace: str,
        refs: Sequence[SeriesRef],
        width: int,
        x: str = "step",
        start: float | None = None,
        end: float | None = None,
    ) -> dict[str, Any]:
        """The points of numeric scalar series for a chart `width` pixels wide
        (see the module docstring): by step, or by wall time (`x="time"`,
        start/end in epoch seconds). Each series' points come as arrays:
        `steps` (int64), `times` (epoch seconds) and `values` (float64, NaN
        and infinities as they are); ingest/ui encodes them."""
        if x not in ("step", "time"):
            raise bad("x: must be 'step' or 'time'")
        if not 1 <= width <= MAX_WIDTH:
            raise bad(f"width: must be 1..{MAX_WIDTH}")
        series = await self._scalar_series(workspace, refs)
        if len(series) > MAX_CHART_SERIES:
            raise bad(f"at most {MAX_CHART_SERIES} series in one chart; choose fewer runs")
        # The bytes bound: fewer buckets when many series share one answer.
        budget_points = self.max_bytes // POINT_BYTES
        if series:
            width = max(1, min(width, budget_points // (4 * len(series))))
        ids = [s["series_id"] for s in series]
        # Long series come from the block cache (computed once, kept on disk,
        # grown as points arrive); short ones, and narrow zooms, from the database.
        cached: dict[int, Blocks] = {}
        long = [s for s in series if self.cache.fits(s)]
        for s, b in zip(
            long, await asyncio.gather(*(self.cache.get(s) for s in long)), strict=True
        ):
            if b is not None:
                cached[s["series_id"]] = b
        # The x range: as asked, else from the first to the last point of any series.
        key = "step" if x == "step" else "t"
        firsts: list[float] = []
        lasts: list[float] = []
        for b in cached.values():
            first, last = b.extent(x)
            firsts.append(first)
            lasts.append(last)
        others = [i for i in ids if i not in cached]
        if others:
            ends = await self._fetch(
                "SELECT x.series_id, f.step AS first_step, extract(epoch FROM f.time)::float8 AS"
                " first_t, l.step AS last_step, extract(epoch FROM l.time)::float8 AS last_t"
                " FROM unnest($1::bigint[]) x(series_id)"
                " CROSS JOIN LATERAL (SELECT step, time FROM scalar_points p WHERE p.series_id ="
                " x.series_id AND NOT hidden ORDER BY step LIMIT 1) f"
                " CROSS JOIN LATERAL (SELECT step, time FROM scalar_points p WHERE p.series_id ="
                " x.series_id AND NOT hidden ORDER BY step DESC LIMIT 1) l",
                others,
            )
            firsts += [e[f"first_{key}"] for e in ends]
            lasts += [e[f"last_{key}"] for e in ends]
        lo: float = min(firsts, default=0)
        hi: float = max(lasts, default=0)
        full = start is None and end is None
        if start is not None and math.isfinite(start):
            lo = start
        if end is not None and math.isfinite(end):
            hi = end
        if x == "step":
            lo = int(max(MIN_STEP, min(MAX_STEP, math.floor(lo))))
            hi = int(max(MIN_STEP, min(MAX_STEP, math.ceil(hi))))
        if hi < lo:
            raise bad("end: must be >= start")
        extent = float(hi - lo + 1) if x == "step" else float(hi - lo) or 1.0
        empty = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        points: dict[int, Points] = {i: empty for i in ids}
        counts: dict[int, int] = {}
        from_cache: set[int] = set()
        picked: dict[int, tuple[Summary, list[tuple[int, int]], Blocks]] = {}
        for sid, b in cached.items():
            got = b.select(x, lo, hi, width, full)
            if got is not None:
                picked[sid] = (got[0], got[1], b)
        # The blocks cut by the ends of a zoom: their points inside it, from the database.
        edges = [(sid, a, z) for sid, (_, cut, _) in picked.items() for a, z in cut]
        raw_edges: dict[int, list[Summary]] = {}
        if edges:
            rows = await self._fetch(
                "SELECT e.series_id, array_agg(p.step ORDER BY p.step) AS s,"
                " array_agg(extract(epoch FROM p.time)::float8 ORDER BY p.step) AS t,"
                " array_agg(p.value ORDER BY p.step) AS v"
                " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) e(series_id, a, z)"
                " JOIN scalar_points p ON p.series_id = e.series_id AND p.step >= e.a"
                " AND p.step <= e.z AND NOT p.hidden GROUP BY e.series_id, e.a",
                [e[0] for e in edges],
                [e[1] for e in edges],
                [e[2] for e in edges],
            )
            for r in rows:
                raw_edges.setdefault(r["series_id"], []).append(
                    Summary.of_points(
                        np.array(r["s"], np.int64), np.array(r["t"]), np.array(r["v"])
                    )
                )
        for sid, (summary, _, b) in picked.items():
            parts = [summary, *raw_edges.get(sid, [])]
            s = Summary.concat(parts) if len(parts) > 1 else summary
            if len(parts) > 1:
                s = s.take(np.argsort(s.key, kind="stable"))
            xs = s.key.astype(np.float64) if x == "step" else s.last_t
            bucket = np.clip(np.floor((xs - lo) * width / extent), 0, width - 1).astype(np.int64)
            if x == "time":
                order = np.argsort(bucket, kind="stable")
                s, bucket = s.take(order), bucket[order]
            head = b.head if (lo <= (b.head[0] if x == "step" else b.head[1]) <= hi) else None
            points[sid] = reduce_summary(bucket, s, head)
            counts[sid] = int(s.count.sum())
            from_cache.add(sid)
        ids = [i for i in ids if i not in from_cache]
        if full:
            counts.update(
                {s["series_id"]: int(s["point_count"]) for s in series if s["series_id"] in ids}
            )
        elif ids:
            col = "step" if x == "step" else "time"
            args: tuple[Any, Any] = (lo, hi) if x == "step" else (ts(lo), ts(hi))
            cast = "bigint" if x == "step" else "timestamptz"
            rows = await self._fetch(
                "SELECT series_id, count(*) AS n FROM scalar_points WHERE series_id ="
                f" ANY($1::bigint[]) AND NOT hidden AND {col} >= $2::{cast}"
                f" AND {col} <= $3::{cast} GROUP BY series_id",
                ids,
                *args,
            )
            counts.update({r["series_id"]: int(r["n"]) for r in rows})
        raw_ids = [i for i in ids if counts.get(i, 0) <= 4 * width]
        agg_ids = [i for i in ids if counts.get(i, 0) > 4 * width]
        if raw_ids:
            await self._raw(raw_ids, x, lo, hi, points)
        if agg_ids:
            await self._buckets(agg_ids, x, lo, hi, width, points)
        out = []
        for s in series:
            steps, times, values = points[s["series_id"]]
            out.append(
                {
                    "run_id": s["run_id"],
                    "name": s["name"],
                    "labels": _tags(s["labels"]),
                    "points_in_range": counts.get(s["series_id"], 0),
                    "downsampled": s["series_id"] in agg_ids or s["series_id"] in from_cache,
                    "steps": steps,
                    "times": times,
                    "values": values,
                }
            )
        return {"x": x, "start": lo, "end": hi, "width": width, "series": out}

    async def _raw(
        self,
        ids: Sequence[int],
        x: str,
        lo: float,
        hi: float,
        out: dict[int, Points],
    ) -> None:
        col, cast = ("step", "bigint") if x == "step" else ("time", "timestamptz")
        args = (lo, hi) if x == "step" else (ts(lo), ts(hi))
        rows = await self._fetch(
            "SELECT series_id, array_agg(step ORDER BY step) AS s,"
            " array_agg(extract(epoch FROM time)::float8 ORDER BY step) AS t,"
            " array_agg(value ORDER BY step) AS v FROM scalar_points"
            f" WHERE series_id = ANY($1::bigint[]) AND NOT hidden AND {col} >= $2::{cast}"
            f" AND {col} <= $3::{cast} GROUP BY series_id",
            list(ids),
            *args,
        )
        for r in rows:
            out[r["series_id"]] = (
                np.array(r["s"], dtype=np.int64),
                np.array(r["t"], dtype=np.float64),
                np.array(r["v"], dtype=np.float64),
            )

    async def _buckets(
        self,
        ids: Sequence[int],
        x: str,
        lo: float,
        hi: float,
        width: int,
        out: dict[int, Points],
    ) -> None:
        if x == "step":
            where = "step >= $2::bigint AND step <= $3::bigint"
            pos = "(step - $2::bigint)::float8"
            args: tuple[Any, ...] = (int(lo), int(hi), float(hi - lo + 1))
        else:
            where = "time >= to_timestamp($2::float8) AND time <= to_timestamp($3::float8)"
            pos = "(extract(epoch FROM time)::float8 - $2::float8)"
            args = (float(lo), float(hi), float(hi - lo) or 1.0)
        # Each bucket: [value, step, t] of its minimum and maximum (NaN left
        # out), [step, value, t] of its last point, [step, t] of its first NaN.
        sql = (
            "SELECT series_id,"
            " min(ARRAY[value, step, t]) FILTER (WHERE value <> 'NaN') AS lo,"
            " max(ARRAY[value, -step, t]) FILTER (WHERE value <> 'NaN') AS hi,"
            " max(ARRAY[step, value, t]) AS last,"
            " min(ARRAY[step, t]) FILTER (WHERE value = 'NaN') AS nan"
            " FROM (SELECT series_id, step::float8 AS step, value,"
            " extract(epoch FROM time)::float8 AS t,"
            f" least($5::int - 1, floor({pos} * $5::int / $4::float8)::int) AS b"
            f" FROM scalar_points WHERE series_id = ANY($1::bigint[]) AND NOT hidden AND {where}"
            ") p GROUP BY series_id, b"
        )
        rows = await self._fetch(sql, list(ids), *args, width)
        picked: dict[int, dict[float, tuple[float, float]]] = {i: {} for i in ids}
        for r in rows:
            keep = picked[r["series_id"]]
            if r["lo"] is not None:
                v, step, t = r["lo"]
                keep[step] = (t, v)
            if r["hi"] is not None:
                v, neg, t = r["hi"]
                keep[-neg] = (t, v)
            step, v, t = r["last"]
            keep[step] = (t, v)
            if r["nan"] is not None:
                step, t = r["nan"]
                keep[step] = (t, math.nan)
        for sid, keep in picked.items():
            order = sorted(keep)
            out[sid] = (
                np.array(order, dtype=np.float64).astype(np.int64),
                np.array([keep[s][0] for s in order], dtype=np.float64),
                np.array([keep[s][1] for s in order], dtype=np.float64),
            )

    # -- one run's other kinds ---------------------------------------------------

    async def _series_row(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str], kind: int
    ) -> asyncpg.Record:
        rows = await self._fetch(
            "SELECT series_id, kind, value_type, labels FROM series WHERE workspace = $1"
            " AND run_id = $2 AND name = $3 AND labels = $4::jsonb AND kind = $5",
            workspace,
            run_id,
            name,
            json.dumps(dict(labels)),
            kind,
        )
        if not rows:
            raise not_found(f"run {run_id!r} has no such series {name!r} with labels {labels}")
        return rows[0]

    async def table(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str], limit: int = 1000
    ) -> dict[str, Any]:
        """The last `limit` rows of a table series (bytes bounded), oldest first."""
        s = await self._series_row(workspace, run_id, name, labels, KIND_TABLE)
        cols = await self._fetch(
            "SELECT name, type, slot FROM table_columns WHERE series_id = $1 ORDER BY position",
            s["series_id"],
        )
        rows = await self._fetch(
            "SELECT * FROM (SELECT step, doubles, ints, bools, strings,"
            " sum(coalesce(octet_length(strings::text), 0) + 16 * (coalesce("
            " cardinality(doubles), 0) + coalesce(cardinality(ints), 0) + coalesce("
            " cardinality(bools), 0)) + 32) OVER (ORDER BY step DESC) AS used"
            " FROM table_rows WHERE series_id = $1 AND NOT hidden ORDER BY step DESC LIMIT $2) t"
            " WHERE used <= $3 ORDER BY step",
            s["series_id"],
            max(1, min(limit, 100_000)),
            self.max_bytes,
        )
        arrays = {1: "doubles", 2: "ints", 3: "strings", 4: "bools"}
        out_rows = []
        for r in rows:
            cells: list[Any] = []
            for c in cols:
                arr = r[arrays.get(c["type"], "doubles")]
                v = arr[c["slot"]] if arr is not None and c["slot"] < len(arr) else None
                cells.append(number(v) if isinstance(v, float) else v)
            out_rows.append({"step": r["step"], "cells": cells})
        return {"name": name, "columns": [c["name"] for c in cols], "rows": out_rows}

    async def evaluations(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str]
    ) -> dict[str, Any]:
        """The steps of an evaluation series and its latest document."""
        s = await self._series_row(workspace, run_id, name, labels, KIND_EVALUATION)
        rows = await self._fetch(
            "SELECT step, schema_type, schema_version, document, octet_length(document::text)"
            " AS size FROM evaluation_points WHERE series_id = $1 AND NOT hidden"
            " ORDER BY step DESC LIMIT 1",
            s["series_id"],
        )
        steps = await self._fetch(
            "SELECT step FROM evaluation_points WHERE series_id = $1 AND NOT hidden"
            " ORDER BY step LIMIT 10000",
            s["series_id"],
        )
        doc = None
        if rows:
            r = rows[0]
            if r["size"] > self.max_bytes:
                raise ViewError(413, f"the document is {r['size']} bytes; over {self.max_bytes}")
            doc = {
                "step": r["step"],
                "schema_type": r["schema_type"],
                "schema_version": r["schema_version"],
                "document": json.loads(r["document"]),
            }
        return {"name": name, "steps": [r["step"] for r in steps], "latest": doc}

    async def histograms(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str], limit: int = 1000
    ) -> dict[str, Any]:
        """The histograms of a series over steps, the latest `limit`, bytes bounded."""
        s = await self._series_row(workspace, run_id, name, labels, KIND_HISTOGRAM)
        rows = await self._fetch(
            "SELECT * FROM (SELECT step, edges, counts, underflow, overflow, nan_count,"
            " sum(24 * cardinality(counts) + 64) OVER (ORDER BY step DESC) AS used"
            " FROM histogram_points WHERE series_id = $1 AND NOT hidden ORDER BY step DESC"
            " LIMIT $2) t WHERE used <= $3 ORDER BY step",
            s["series_id"],
            max(1, min(limit, 10_000)),
            self.max_bytes,
        )
        return {
            "name": name,
            "histograms": [
                {
                    "step": r["step"],
                    "edges": [number(v) for v in r["edges"]],
                    "counts": list(r["counts"]),
                    "underflow": r["underflow"],
                    "overflow": r["overflow"],
                    "nan_count": r["nan_count"],
                }
                for r in rows
            ],
        }

    async def images(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str], limit: int = 5000
    ) -> dict[str, Any]:
        """The image points of a series (metadata; the bytes come by `blob`)."""
        s = await self._series_row(workspace, run_id, name, labels, KIND_IMAGE)
        rows = await self._fetch(
            "SELECT step, sha256, size, content_type, width, height FROM image_points"
            " WHERE series_id = $1 AND NOT hidden ORDER BY step LIMIT $2",
            s["series_id"],
            max(1, min(limit, 20_000)),
        )
        return {"name": name, "images": [dict(r) for r in rows]}

    async def image_blob(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str], step: int
    ) -> asyncpg.Record:
        s = await self._series_row(workspace, run_id, name, labels, KIND_IMAGE)
        rows = await self._fetch(
            "SELECT sha256, size, content_type FROM image_points WHERE series_id = $1"
            " AND NOT hidden AND step = $2",
            s["series_id"],
            step,
        )
        if not rows:
            raise not_found(f"series {name!r} has no image at step {step}")
        return rows[0]

    async def files(self, workspace: str, run_id: str, limit: int = 5000) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT * FROM (SELECT path, size, content_type, updated_at,"
            " sum(octet_length(path) + 120) OVER (ORDER BY path) AS used FROM artifacts"
            " WHERE workspace = $1 AND run_id = $2 ORDER BY path LIMIT $3) t WHERE used <= $4",
            workspace,
            run_id,
            max(1, min(limit, 20_000)),
            self.max_bytes // 2,
        )
        return [
            {
                "path": r["path"],
                "size": r["size"],
                "content_type": r["content_type"],
                "updated_at": _iso(r["updated_at"]),
            }
            for r in rows
        ]

    async def file(self, workspace: str, run_id: str, path: str) -> asyncpg.Record:
        rows = await self._fetch(
            "SELECT path, sha256, size, content_type FROM artifacts WHERE workspace = $1"
            " AND run_id = $2 AND path = $3",
            workspace,
            run_id,
            path,
        )
        if not rows:
            raise not_found(f"run {run_id!r} has no file {path!r}")
        return rows[0]
