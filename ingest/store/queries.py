"""Reads: series of runs and their visible (not hidden) points, downsampled
in SQL, and the windows and slices a query pages through (asyncpg).

The store's read surface, for ingest/api/query.py: `SeriesHead` (a series
as read), `Window` (what to read), `Read` (what a reader found: the points
as rows of plain values, plus a kind's extras), `KindReader` (the reader of
a kind other than scalars, wired in ingest/server.py). Building the
protobuf messages of an answer is the api's job (ingest/api/series.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import asyncpg
import numpy as np

from ingest.core.decode import labels_key
from ingest.core.errors import not_found
from ingest.core.kinds import KIND_HISTOGRAM, KIND_IMAGE, KIND_SCALAR, KIND_TABLE, VALUE_TEXT
from ingest.store.columns import (
    DEFAULT_CACHE_BYTES,
    BlockCache,
    Points,
    assemble,
    downsample,
    read_page,
    read_parts,
    read_points,
)
from ingest.store.db import acquire

MIN_STEP = -(2**63)
MAX_STEP = 2**63 - 1

# A point as read: series_id, step, t (the time as epoch seconds) and the
# columns of its kind (value; doubles, ints, strings, bools; sha256, size,
# content_type, width, height; document; edges, counts, ...), plain values.
Point = Mapping[str, Any]


def points_table(kind: int, value_type: int) -> str:
    """The hypertable that holds a series' points."""
    if kind == KIND_SCALAR:
        return "text_points" if value_type == VALUE_TEXT else "scalar_points"
    return {
        KIND_TABLE: "table_rows",
        KIND_IMAGE: "image_points",
        KIND_HISTOGRAM: "histogram_points",
    }.get(kind, "evaluation_points")


@dataclass(frozen=True, slots=True)
class SeriesHead:
    """A series as the reads see it. `header` bounds the bytes its name,
    labels and description take encoded; `group` is its place in GetMetrics
    order (by points table); `take` is false for the one series a page of
    ListSeries reads past its end (where the next page starts)."""

    series_id: int
    run_id: str
    name: str
    labels: dict[str, str]
    kind: int
    value_type: int
    stepped: bool
    point_count: int
    last_step: int | None
    description: str
    header: int
    group: int = 0
    take: bool = True

    @property
    def text(self) -> bool:
        return self.kind == KIND_SCALAR and self.value_type == VALUE_TEXT

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> SeriesHead:
        return cls(
            series_id=r["series_id"],
            run_id=r["run_id"],
            name=r["name"],
            labels=r["labels"],
            kind=r["kind"],
            value_type=r["value_type"],
            stepped=r["stepped"],
            point_count=r["point_count"],
            last_step=r["last_step"],
            description=r["description"],
            header=int(r["header"]),
            group=int(r.get("grp") or 0),
            take=bool(r.get("take", True)),
        )


@dataclass(frozen=True, slots=True)
class Column:
    """A stored column of a table series: its cells sit at `slot` of the
    row's array of its type; `position` orders the columns."""

    name: str
    type: int
    slot: int
    position: int


@dataclass(frozen=True)
class Window:
    """Which visible points of some series to read, and at most how many
    points and bytes. A read resumes at `after` = (series_id, step),
    inclusive, in (series_id, step) order."""

    limit: int
    budget: int
    start: int = MIN_STEP
    end: int = MAX_STEP
    after: tuple[int, int] = (0, MIN_STEP)
    # Take the first point even when it alone is over the budget (a page must
    # make progress).
    force: bool = True
    # One series only: keep at most `spread` points spread evenly over the
    # range (which held `total` points), first and last included ...
    spread: int = 0
    total: int = 0
    # ... or, for numeric scalars, at most `extremes` points keeping each
    # bucket's first point, extremes and NaN.
    extremes: int = 0
    include_bytes: bool = False


@dataclass(frozen=True)
class Slice:
    """What a Window read: rows by series, where the next read starts (None
    when the window holds no more), the estimated encoded bytes, the count."""

    rows: dict[int, list[Point]]
    next: tuple[int, int] | None
    used: int
    count: int
    # Numeric scalars read as numpy columns (ingest/store/columns.py), by
    # series, instead of rows.
    columns: Mapping[int, Points] = field(default_factory=dict)


class PointCount(NamedTuple):
    """Visible points of a series in a step range, and the last one's step."""

    total: int
    last_step: int | None


@dataclass(frozen=True)
class Read:
    """A reader's answer: the slice of points, and what a kind needs beside
    its rows to be answered (a table's columns by series; an image's bytes
    by sha256, when asked for)."""

    slice: Slice
    columns: Mapping[int, Sequence[Column]] = field(default_factory=dict)
    blobs: Mapping[str, bytes] = field(default_factory=dict)


class KindReader(Protocol):
    async def __call__(self, series: Sequence[SeriesHead], window: Window) -> Read:
        """The visible points of the window for series of one kind (and one
        points table), in (series_id, step) order."""
        ...


_DOWNSAMPLE_EXTREMES = """
    WITH p AS (SELECT series_id, step, time, value, ntile($7::bigint::int) OVER (ORDER BY step) AS b
        FROM scalar_points_in($1::bigint[], $2::bigint, $3::bigint)
        WHERE series_id = ANY($1::bigint[]) AND NOT hidden
        AND step >= $2::bigint AND step <= $3::bigint),
    a AS (SELECT b, min(step) AS f, min(step) FILTER (WHERE value = 'NaN') AS nan,
        min(value) FILTER (WHERE value <> 'NaN') AS lo,
        max(value) FILTER (WHERE value <> 'NaN') AS hi FROM p GROUP BY b),
    e AS (SELECT p.b, min(p.step) FILTER (WHERE p.value = a.lo) AS lo_step,
        min(p.step) FILTER (WHERE p.value = a.hi) AS hi_step
        FROM p JOIN a ON a.b = p.b AND (p.value = a.lo OR p.value = a.hi) GROUP BY p.b),
    k AS (SELECT step, min(prio) AS prio, min(b) AS b FROM (
        SELECT b, nan AS step, 0 AS prio FROM a WHERE nan IS NOT NULL
        UNION ALL SELECT b, hi_step, 1 FROM e WHERE hi_step IS NOT NULL
        UNION ALL SELECT b, lo_step, 2 FROM e WHERE lo_step IS NOT NULL
        UNION ALL SELECT b, f, 3 FROM a) u GROUP BY step),
    kept AS (SELECT step FROM k ORDER BY prio, b, step LIMIT $8::bigint)
    SELECT series_id, step, extract(epoch FROM time)::float8 AS t, value
    FROM p JOIN kept USING (step) WHERE (series_id, step) >= ($4::bigint, $5::bigint)
    ORDER BY series_id, step LIMIT $6::bigint
"""


def _source(table: str, ids: str, lo: str = "$2::bigint", hi: str = "$3::bigint") -> str:
    """What to select a table's points from: numeric scalars through
    scalar_points_in (rows and the blocks whose steps overlap [lo, hi], the
    others not read), other tables as they are."""
    if table == "scalar_points":
        return f"scalar_points_in({ids}, {lo}, {hi})"
    return table


def _candidates(table: str, columns: Sequence[tuple[str, str]], window: Window) -> str:
    """SQL for the candidate points of a window ($1 series ids, $2/$3 the
    step range, $4/$5 the resume position, $6 rows at most; $7/$8 the
    downsampling parameters)."""
    select = ", ".join(f"{expr} AS {alias}" for expr, alias in columns)
    source = _source(table, "$1::bigint[]")
    head = f"SELECT series_id, step, extract(epoch FROM time)::float8 AS t, {select} FROM {source}"
    visible = (
        "series_id = ANY($1::bigint[]) AND NOT hidden AND step >= $2::bigint AND step <= $3::bigint"
    )
    tail = (
        " AND (series_id, step) >= ($4::bigint, $5::bigint)"
        " ORDER BY series_id, step LIMIT $6::bigint"
    )
    if window.extremes:
        if table != "scalar_points":
            raise ValueError("extremes downsampling is for numeric scalars")
        return _DOWNSAMPLE_EXTREMES
    if window.spread:
        # Row indices round(k * (total - 1) / (spread - 1)), k = 0 .. spread - 1.
        picked = (
            f"SELECT step FROM (SELECT step, row_number() OVER (ORDER BY step) - 1 AS i"
            f" FROM {source} WHERE {visible}) n WHERE i IN (SELECT CASE WHEN $8::bigint <= 1 THEN 0"
            " ELSE (k * ($7::bigint - 1)) / ($8::bigint - 1) END"
            " FROM generate_series(0::bigint, greatest($8::bigint, 1) - 1) k)"
        )
        return f"{head} WHERE {visible} AND step IN ({picked}){tail}"
    if table == "scalar_points":
        # A page: only the blocks that can hold its points are unpacked.
        head = (
            f"SELECT series_id, step, extract(epoch FROM time)::float8 AS t, {select}"
            " FROM scalar_points_page($1::bigint[], $2::bigint, $3::bigint, $4::bigint,"
            " $5::bigint, $6::bigint)"
        )
    # $7 and $8 are unused here; PostgreSQL needs every parameter typed.
    return f"{head} WHERE {visible} AND $7::bigint > 0 AND $8::bigint >= 0{tail}"


async def visible_points(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[tuple[str, str]],
    series_ids: Sequence[int],
    window: Window,
    cost: str = "0",
    per_point: Mapping[int, int] | None = None,
) -> Slice:
    """The visible (not hidden) points of some series in a window, in
    (series_id, step) order: at most window.limit points whose estimated
    encoded size stays within window.budget bytes (at least one with
    window.force). `columns` are (SQL expression, alias) pairs selected after
    series_id, step and t (the time as epoch seconds); `cost` is an SQL
    expression over those aliases that bounds a point's encoded bytes, plus
    `per_point` bytes by series. The database computes the sizes, so no more
    than the window (and one position past it) ever reaches this process."""
    if window.limit <= 0:
        raise ValueError("a window reads at least one point")
    aliases = [alias for _, alias in columns]
    payload = ", ".join(f"CASE WHEN take THEN {a} END AS {a}" for a in aliases)
    weights = per_point or {}
    candidates = _candidates(table, columns, window)
    sql = (
        f"SELECT series_id, step, t, used, take, {payload} FROM ("
        " SELECT q.*, lag(take, 1, true) OVER (ORDER BY series_id, step) AS prev FROM ("
        "  SELECT c.*, (rn <= $6::bigint - 1"
        "   AND (used <= $9::bigint OR (rn = 1 AND $10::boolean))) AS take FROM ("
        "   SELECT x.*, (sum(x.cost) OVER w)::bigint AS used, row_number() OVER w AS rn FROM ("
        f"    SELECT y.*, ({cost}) + coalesce(wt.n, 0) AS cost FROM ({candidates}) y"
        "     LEFT JOIN unnest($11::bigint[], $12::bigint[]) AS wt(sid, n) ON wt.sid = y.series_id"
        "   ) x WINDOW w AS (ORDER BY x.series_id, x.step ROWS BETWEEN UNBOUNDED PRECEDING"
        "   AND CURRENT ROW)"
        "  ) c"
        " ) q"
        ") z WHERE take OR prev ORDER BY series_id, step"
    )
    rows = await conn.fetch(
        sql,
        list(series_ids),
        window.start,
        window.end,
        window.after[0],
        window.after[1],
        window.limit + 1,
        window.total if window.spread else max(1, window.extremes // 3),
        window.spread or window.extremes,
        window.budget,
        window.force,
        list(weights),
        list(weights.values()),
    )
    grouped: dict[int, list[Point]] = {}
    nxt: tuple[int, int] | None = None
    used = count = 0
    for r in rows:
        if not r["take"]:
            nxt = (r["series_id"], r["step"])
            break
        grouped.setdefault(r["series_id"], []).append(r)
        used = int(r["used"])
        count += 1
    return Slice(grouped, nxt, used, count)


async def count_points(
    conn: asyncpg.Connection, table: str, series_id: int, start: int, end: int
) -> PointCount:
    """Visible points of a series in an inclusive step range, and the last step."""
    if table == "scalar_points":
        # From the blocks' summaries where they answer (migration 010).
        row = await conn.fetchrow("SELECT * FROM scalar_count($1, $2, $3)", series_id, start, end)
        return PointCount(int(row["n"]), row["last"])
    row = await conn.fetchrow(
        f"SELECT count(*) AS n, max(step) AS last FROM {table}"
        " WHERE series_id = $1 AND NOT hidden AND step >= $2 AND step <= $3",
        series_id,
        start,
        end,
    )
    return PointCount(int(row["n"]), row["last"])


# A chart of at least this many series is read on two connections at once.
PARALLEL_FROM_SERIES = 8

# Bytes a numeric scalar point takes in an answer, at most (a step, a time, a double).
SCALAR_POINT_BYTES = 26


@dataclass(frozen=True, slots=True)
class Chart:
    """One series of a chart read: its points (downsampled when `downsampled`)
    and the visible points of the range before downsampling."""

    points: Points
    total: int
    downsampled: bool


class QueryStore:
    """Reads: series of runs and their visible (not hidden) points."""

    def __init__(self, pool: asyncpg.Pool, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.pool = pool
        # Decoded scalar blocks, shared by every read of this store.
        self.cache = BlockCache(cache_bytes)

    def _conn(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return acquire(self.pool)

    async def run_ids(self, workspace: str, run_id: str, recursive: bool) -> list[str]:
        async with self._conn() as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM runs WHERE run_id = $1 AND workspace = $2", run_id, workspace
            )
            if found is None:
                raise not_found(
                    "run_id", f"run {run_id!r} does not exist in workspace {workspace!r}"
                )
            if not recursive:
                return [run_id]
            # Children are runs of the same workspace (the parent key includes
            # it); the join says so too, so the walk never leaves it.
            rows = await conn.fetch(
                "WITH RECURSIVE d AS (SELECT run_id, 0 AS depth, created_at FROM runs"
                " WHERE workspace = $2 AND run_id = $1"
                " UNION ALL SELECT c.run_id, d.depth + 1, c.created_at FROM runs c"
                " JOIN d ON c.workspace = $2 AND c.parent_run_id = d.run_id)"
                " SELECT run_id FROM d ORDER BY depth, created_at",
                run_id,
                workspace,
            )
            return [r["run_id"] for r in rows]

    # A series' place in GetMetrics order: by the table its points live in
    # (one query reads many series of one table), then by id.
    _GROUP = f"(kind * 2 + (kind = {KIND_SCALAR} AND value_type = {VALUE_TEXT})::int)"
    # Bytes a series' header (name, labels, description) takes when encoded, at most.
    _HEADER = (
        "(octet_length(name) + 2 * octet_length(labels::text) + octet_length(description) + 64)"
    )
    _SERIES = (
        "series_id, run_id, name, labels, kind, value_type, stepped, point_count, last_step,"
        " description"
    )

    async def series_page(
        self,
        workspace: str,
        run_id: str,
        names: Sequence[str],
        after: tuple[int, int],
        limit: int,
        budget: int,
    ) -> list[SeriesHead]:
        """The next series of a run in GetMetrics order from `after` =
        (group, series_id), inclusive: at most `limit`, whose headers fit in
        `budget` bytes (at least one)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM (SELECT *, sum(header) OVER (ORDER BY grp, series_id) AS used,"
                f" row_number() OVER (ORDER BY grp, series_id) AS rn FROM ("
                f"  SELECT {self._SERIES}, {self._GROUP} AS grp, {self._HEADER} AS header"
                "   FROM series WHERE workspace = $7 AND run_id = $1"
                "   AND (cardinality($2::text[]) = 0 OR name = ANY($2::text[]))"
                f"  AND ({self._GROUP}, series_id) >= ($3::int, $4::bigint)"
                f"  ORDER BY {self._GROUP}, series_id LIMIT $5::bigint) s"
                ") t WHERE used <= $6::bigint OR rn = 1 ORDER BY grp, series_id",
                run_id,
                list(names),
                after[0],
                after[1],
                limit,
                budget,
                workspace,
            )
        return [SeriesHead.of(r) for r in rows]

    async def list_series(
        self, workspace: str, run_id: str, after: int, limit: int, budget: int
    ) -> list[SeriesHead]:
        """The series of a run in creation order from series id `after`
        (inclusive): at most `limit`, whose headers fit in `budget` bytes (at
        least one), then the next series, if any, with `take` false."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM (SELECT *, lag(take, 1, true) OVER (ORDER BY series_id) AS prev"
                " FROM (SELECT *, (rn <= $3::bigint AND (used <= $4::bigint OR rn = 1)) AS take"
                "  FROM (SELECT *, sum(header) OVER (ORDER BY series_id) AS used,"
                "   row_number() OVER (ORDER BY series_id) AS rn FROM ("
                f"   SELECT {self._SERIES}, {self._HEADER} AS header FROM series"
                "    WHERE workspace = $5 AND run_id = $1 AND series_id >= $2::bigint"
                "    ORDER BY series_id LIMIT $3::bigint + 1) s) t) u) v"
                " WHERE take OR prev ORDER BY series_id",
                run_id,
                after,
                limit,
                budget,
                workspace,
            )
        return [SeriesHead.of(r) for r in rows]

    async def find_series(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str]
    ) -> SeriesHead:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT s.series_id, s.run_id, s.name, s.labels, s.kind, s.value_type, s.stepped,"
                " s.point_count, s.last_step, s.description,"
                " (octet_length(s.name) + 2 * octet_length(s.labels::text)"
                " + octet_length(s.description) + 64) AS header"
                " FROM series s"
                " WHERE s.run_id = $1 AND s.workspace = $2 AND s.name = $3 AND s.labels_key = $4",
                run_id,
                workspace,
                name,
                labels_key(dict(labels)),
            )
        if row is None:
            raise not_found(
                "name", f"run {run_id!r} has no series {name!r} with labels {dict(labels)}"
            )
        return SeriesHead.of(row)

    async def find_many(
        self, workspace: str, run_id: str, refs: Sequence[tuple[str, Mapping[str, str]]]
    ) -> list[SeriesHead | None]:
        """The series of a run by (name, labels), in the order asked (None
        for one that does not exist), in one query."""
        keys = [labels_key(dict(labels)) for _, labels in refs]
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {self._SERIES}, {self._HEADER} AS header FROM series"
                " WHERE run_id = $1 AND workspace = $2"
                " AND (name, labels_key) IN (SELECT * FROM unnest($3::text[], $4::text[]))",
                run_id,
                workspace,
                [name for name, _ in refs],
                keys,
            )
        found = {(r["name"], labels_key(dict(r["labels"]))): SeriesHead.of(r) for r in rows}
        return [found.get((name, key)) for (name, _), key in zip(refs, keys, strict=True)]

    async def read_scalars(self, series: Sequence[SeriesHead], window: Window) -> Read:
        """Visible scalar points of a window (series of one value type), in
        (series_id, step) order: the scalar kind's KindReader."""
        got = await self.scalar_points([s.series_id for s in series], series[0].text, window)
        return Read(got)

    async def scalar_points(self, series_ids: Sequence[int], text: bool, window: Window) -> Slice:
        """Visible scalar points of a window, in (series_id, step) order."""
        if not text and window.extremes:
            return await self._downsampled(series_ids, window)
        if not text and not window.spread:
            return await self._page(series_ids, window)
        table = "text_points" if text else "scalar_points"
        # Encoded: a step (<= 10 bytes), a time and a double, or a string.
        cost = "octet_length(value) + 24" if text else "26"
        async with self._conn() as conn:
            return await visible_points(conn, table, [("value", "value")], series_ids, window, cost)

    async def _page(self, series_ids: Sequence[int], window: Window) -> Slice:
        """A page of numeric scalars at full resolution, as numpy columns
        (columns.read_page): every point costs SCALAR_POINT_BYTES."""
        room = min(window.limit, window.budget // SCALAR_POINT_BYTES)
        if room <= 0:
            if not window.force:
                return Slice({}, window.after, 0, 0)
            room = 1
        async with self._conn() as conn:
            got, nxt = await read_page(
                conn, series_ids, window.start, window.end, window.after, room, self.cache
            )
        count = sum(len(p) for p in got.values())
        return Slice({}, nxt, count * SCALAR_POINT_BYTES, count, got)

    async def _downsampled(self, series_ids: Sequence[int], window: Window) -> Slice:
        """A page of one numeric series' downsampled points (Window.extremes),
        computed with numpy from the points as columns (columns.downsample)."""
        if len(series_ids) != 1:
            raise ValueError("a downsampled read is of one series")
        sid = series_ids[0]
        async with self._conn() as conn:
            got = await read_points([conn], [sid], window.start, window.end, self.cache)
        kept = downsample(got[sid], window.extremes)
        a_sid, a_step = window.after
        first = 0 if a_sid < sid else len(kept) if a_sid > sid else None
        if first is None:
            first = int(kept.steps.searchsorted(a_step, "left"))
        room = min(window.limit, window.budget // SCALAR_POINT_BYTES)
        if room <= 0 and window.force:
            room = 1
        last = min(len(kept), first + max(room, 0))
        page = kept.take(np.arange(first, last, dtype=np.intp))
        nxt = (sid, int(kept.steps[last])) if last < len(kept) else None
        count = last - first
        return Slice({}, nxt, count * SCALAR_POINT_BYTES, count, {sid: page} if count else {})

    async def chart(
        self, series_ids: Sequence[int], start: int, end: int, max_points: int
    ) -> dict[int, Chart]:
        """Numeric scalar series in one step range, each downsampled to at
        most max_points points (columns.downsample), read in one snapshot."""
        async with AsyncExitStack() as stack:
            # Many series: two connections at once (columns.read_points).
            n = 2 if len(set(series_ids)) >= PARALLEL_FROM_SERIES else 1
            conns = [await stack.enter_async_context(self._conn()) for _ in range(n)]
            found, loose = await read_parts(conns, series_ids, start, end, self.cache)
        out: dict[int, Chart] = {}
        # A series at a time: its joined arrays are freed before the next
        # one's (the memory reused, not 160 MB of new pages per chart).
        for sid in sorted(set(series_ids)):
            p = assemble(found.get(sid, []), loose.get(sid), start, end)
            out[sid] = Chart(downsample(p, max_points), len(p), 0 < max_points < len(p))
        return out

    async def count_points(self, series: SeriesHead, start: int, end: int) -> PointCount:
        table = points_table(series.kind, series.value_type)
        async with self._conn() as conn:
            return await count_points(conn, table, series.series_id, start, end)
