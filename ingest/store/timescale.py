"""The TimescaleDB store: migrations, experiments and runs, series state,
group commits of points, and queries. The only module that talks to the
database (asyncpg)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import asyncpg
import numpy as np

from ingest.core import order
from ingest.core.batch import (
    INVALID_VALUE,
    KIND_IMAGE,
    KIND_SCALAR,
    KIND_TABLE,
    LIMIT_EXCEEDED,
    RUN_NOT_ACTIVE,
    RUN_NOT_FOUND,
    VALUE_TEXT,
    Chunk,
    DecodedBatch,
    Outcome,
)
from ingest.core.errors import ApiError, StoreUnavailable, invalid, not_found, precondition
from ingest.core.model import RunStatus, check_transition, merge_properties
from ingest.core.order import Accepted, SeriesState
from ingest.store.quotas import (
    RUNS,
    SERIES,
    STORED_BYTES,
    Limits,
    QuotaExceeded,
    Usage,
    add_usage,
    hard_limit_message,
    lock_usage,
)

log = logging.getLogger(__name__)

Row = Any  # an asyncpg.Record

# Errors that mean "the database is not there right now": retryable.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.PostgresConnectionError,
)

_RUN_COLUMNS = """
    r.run_id, r.workspace, e.name AS experiment_name, r.number, r.display_name,
    r.description, r.run_type, r.parent_run_id, r.root_run_id, r.status, r.created_at,
    r.start_time, r.end_time, r.error_message, r.error_code, r.tags, r.properties,
    r.last_seen
"""


@asynccontextmanager
async def acquire(
    pool: asyncpg.Pool, transaction: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection (optionally in a transaction); a database that
    cannot be reached becomes StoreUnavailable (retryable)."""
    try:
        async with pool.acquire() as conn:
            if transaction:
                async with conn.transaction():
                    yield conn
            else:
                yield conn
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"database unavailable: {exc}") from exc


MIN_STEP = -(2**63)
MAX_STEP = 2**63 - 1


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

    rows: dict[int, list[Row]]
    next: tuple[int, int] | None
    used: int
    count: int


@dataclass(frozen=True)
class Read:
    """A reader's answer: one SeriesData per series asked for (points of this
    slice only) and the slice."""

    data: dict[int, Any]
    slice: Slice


_DOWNSAMPLE_EXTREMES = """
    WITH p AS (SELECT series_id, step, time, value, ntile($7::bigint::int) OVER (ORDER BY step) AS b
        FROM scalar_points WHERE series_id = ANY($1::bigint[]) AND NOT hidden
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


def _candidates(table: str, columns: Sequence[tuple[str, str]], window: Window) -> str:
    """SQL for the candidate points of a window ($1 series ids, $2/$3 the
    step range, $4/$5 the resume position, $6 rows at most; $7/$8 the
    downsampling parameters)."""
    select = ", ".join(f"{expr} AS {alias}" for expr, alias in columns)
    head = f"SELECT series_id, step, extract(epoch FROM time)::float8 AS t, {select} FROM {table}"
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
            f" FROM {table} WHERE {visible}) n WHERE i IN (SELECT CASE WHEN $8::bigint <= 1 THEN 0"
            " ELSE (k * ($7::bigint - 1)) / ($8::bigint - 1) END"
            " FROM generate_series(0::bigint, greatest($8::bigint, 1) - 1) k)"
        )
        return f"{head} WHERE {visible} AND step IN ({picked}){tail}"
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
    grouped: dict[int, list[Row]] = {}
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
) -> tuple[int, int | None]:
    """Visible points of a series in an inclusive step range, and the last step."""
    row = await conn.fetchrow(
        f"SELECT count(*) AS n, max(step) AS last FROM {table}"
        " WHERE series_id = $1 AND NOT hidden AND step >= $2 AND step <= $3",
        series_id,
        start,
        end,
    )
    return int(row["n"]), row["last"]


async def hide_superseded(conn: asyncpg.Connection, table: str, accepted: Accepted) -> None:
    """Out-of-order series: the last write per step wins, so earlier points at
    the steps being written are hidden (kept for audit)."""
    if accepted.supersede is not None and accepted.supersede.size:
        await conn.execute(
            f"UPDATE {table} SET hidden = true WHERE series_id = $1"
            " AND step = ANY($2::bigint[]) AND NOT hidden",
            accepted.series_id,
            accepted.supersede.tolist(),
        )


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect_pool(url: str, size: int) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=size, init=_init_connection, command_timeout=60
        )
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"database unavailable: {exc}") from exc
    assert pool is not None
    return pool


# Commands that run beside live services (token, quota) wait at most this long
# for any lock: a running service holds a row for the milliseconds of an
# update, a starting one the migration lock while it migrates. Longer is an
# error that says so, never a command that hangs.
CLI_LOCK_TIMEOUT_S = 10.0


async def migrations_pending(pool: asyncpg.Pool) -> bool:
    """Whether a migration of ingest/store/migrations is not applied yet (read
    without taking the migration lock, which a starting service may hold)."""
    versions = {
        f.name.removesuffix(".sql")
        for f in resources.files("ingest.store.migrations").iterdir()
        if f.name.endswith(".sql")
    }
    try:
        rows = await pool.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        return True
    return not versions <= {r["version"] for r in rows}


@asynccontextmanager
async def command_pool(url: str, application_name: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool for a command run beside live services: its sessions give
    up on a lock after CLI_LOCK_TIMEOUT_S, and migrations are applied only when
    some are pending (a current schema takes no migration lock, so a command
    never waits behind a service that is starting)."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=2,
            command_timeout=60,
            init=_init_connection,
            server_settings={
                "lock_timeout": f"{int(CLI_LOCK_TIMEOUT_S * 1000)}ms",
                "application_name": application_name,
            },
        )
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"database unavailable: {exc}") from exc
    assert pool is not None
    try:
        if await migrations_pending(pool):
            await migrate(pool)
        yield pool
    finally:
        await pool.close()


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply the versioned SQL migrations in ingest/store/migrations not yet applied.

    An advisory lock makes concurrent service processes take turns."""
    applied: list[str] = []
    files = sorted(
        (
            f
            for f in resources.files("ingest.store.migrations").iterdir()
            if f.name.endswith(".sql")
        ),
        key=lambda f: f.name,
    )
    async with pool.acquire() as conn:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            log.warning("TimescaleDB is not available (%s); using plain tables", exc)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7324118)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for f in files:
                version = f.name.removesuffix(".sql")
                if version in done:
                    continue
                await conn.execute(f.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
    return applied


class MetadataStore:
    """Experiments and runs."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        heartbeat_timeout_s: float,
        quota_defaults: Limits | None = None,
        on_quota_exceeded: Any = None,
    ) -> None:
        self.pool = pool
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # The runs quota per workspace (ingest/store/quotas.py).
        self.quota_defaults = quota_defaults or Limits()
        self.on_quota_exceeded = on_quota_exceeded

    def _tx(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return acquire(self.pool, transaction=True)

    # -- experiments ---------------------------------------------------------

    async def get_or_create_experiment(
        self, workspace: str, name: str, tags: Mapping[str, str | None]
    ) -> tuple[Row, bool]:
        async with self._tx() as conn:
            row = await conn.fetchrow(
                "INSERT INTO experiments (workspace, name, tags) VALUES ($1, $2, $3)"
                " ON CONFLICT (workspace, name) DO NOTHING RETURNING *",
                workspace,
                name,
                dict(tags),
            )
            if row is not None:
                return row, True
            row = await conn.fetchrow(
                "SELECT * FROM experiments WHERE workspace = $1 AND name = $2", workspace, name
            )
            assert row is not None
            return row, False

    async def get_experiment(self, workspace: str, name: str, conn: Any = None) -> Row:
        query = "SELECT * FROM experiments WHERE workspace = $1 AND name = $2"
        if conn is None:
            async with self._tx() as c:
                row = await c.fetchrow(query, workspace, name)
        else:
            row = await conn.fetchrow(query, workspace, name)
        if row is None:
            raise not_found(
                "name", f"experiment {name!r} does not exist in workspace {workspace!r}"
            )
        return row

    async def list_experiments(
        self,
        workspace: str,
        tags: Mapping[str, str | None],
        archived: bool | None,
        name_prefix: str,
    ) -> list[Row]:
        where = ["workspace = $1"]
        args: list[Any] = [workspace]
        if archived is not None:
            args.append(archived)
            where.append(f"archived = ${len(args)}")
        if name_prefix:
            args.append(name_prefix)
            where.append(f"starts_with(name, ${len(args)})")
        _tag_filter(where, args, "tags", tags)
        async with self._tx() as conn:
            return list(
                await conn.fetch(
                    f"SELECT * FROM experiments WHERE {' AND '.join(where)} ORDER BY name", *args
                )
            )

    async def update_experiment_tags(
        self, workspace: str, name: str, set_tags: Mapping[str, str | None], remove: Sequence[str]
    ) -> Row:
        async with self._tx() as conn:
            row = await conn.fetchrow(
                "UPDATE experiments SET tags = (tags - $3::text[]) || $4::jsonb"
                " WHERE workspace = $1 AND name = $2 RETURNING *",
                workspace,
                name,
                list(remove),
                dict(set_tags),
            )
            if row is None:
                raise not_found("name", f"experiment {name!r} does not exist")
            return row

    async def set_experiment_archived(
        self, workspace: str, name: str, archived: bool, new_name: str = ""
    ) -> Row:
        async with self._tx() as conn:
            try:
                row = await conn.fetchrow(
                    "UPDATE experiments SET archived = $3, name = COALESCE(NULLIF($4, ''), name)"
                    " WHERE workspace = $1 AND name = $2 RETURNING *",
                    workspace,
                    name,
                    archived,
                    new_name,
                )
            except asyncpg.UniqueViolationError:
                raise ApiError(
                    "ALREADY_EXISTS", f"an experiment named {new_name!r} exists", "new_name"
                ) from None
            if row is None:
                raise not_found("name", f"experiment {name!r} does not exist")
            return row

    async def delete_experiment(self, workspace: str, experiment_id: int) -> tuple[str, int]:
        """Delete an experiment, its runs and everything they logged, in one
        transaction; refused while a run is not terminal (Azure ML's rule).
        The workspace's usage counters go down by what was deleted. Returns
        the experiment's name and how many runs went with it."""
        async with self._tx() as conn:
            # Locks in CreateRun's order (a parent run, then the experiment,
            # then usage; ingest: series, then usage): the runs there are,
            # then the experiment row, which keeps new runs out, then the runs
            # again to see any created meanwhile.
            await conn.execute(
                "SELECT 1 FROM runs WHERE workspace = $1 AND experiment_id = $2 FOR UPDATE",
                workspace,
                experiment_id,
            )
            exp = await conn.fetchrow(
                "SELECT name FROM experiments WHERE workspace = $1 AND experiment_id = $2"
                " FOR UPDATE",
                workspace,
                experiment_id,
            )
            if exp is None:
                raise not_found(
                    "experiment_id",
                    f"experiment id {experiment_id} does not exist in workspace {workspace!r}",
                )
            runs = await conn.fetch(
                "SELECT run_id, status FROM runs WHERE workspace = $1 AND experiment_id = $2"
                " FOR UPDATE",
                workspace,
                experiment_id,
            )
            terminal = {s.value for s in RunStatus if s.terminal}
            active = [r for r in runs if r["status"] not in terminal]
            if active:
                raise precondition(
                    "experiment_id",
                    f"experiment {exp['name']!r} has {len(active)} run(s) not yet finished "
                    f"(for example {active[0]['run_id']!r}, {active[0]['status']}); complete, "
                    "fail or cancel them before deleting the experiment",
                )
            run_ids = [r["run_id"] for r in runs]
            series = [
                r["series_id"]
                for r in await conn.fetch(
                    "SELECT series_id FROM series"
                    " WHERE workspace = $1 AND run_id = ANY($2::text[])",
                    workspace,
                    run_ids,
                )
            ]
            image_bytes = await conn.fetchval(
                "SELECT COALESCE(sum(size), 0) FROM image_points"
                " WHERE series_id = ANY($1::bigint[])",
                series,
            )
            file_bytes = await conn.fetchval(
                "SELECT COALESCE(sum(size), 0) FROM artifacts"
                " WHERE workspace = $1 AND run_id = ANY($2::text[])",
                workspace,
                run_ids,
            )
            for table in (
                "scalar_points",
                "text_points",
                "table_rows",
                "evaluation_points",
                "image_points",
                "table_columns",
            ):
                await conn.execute(
                    f"DELETE FROM {table} WHERE series_id = ANY($1::bigint[])", series
                )
            for table in ("series", "artifacts"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE workspace = $1 AND run_id = ANY($2::text[])",
                    workspace,
                    run_ids,
                )
            await conn.execute(
                "DELETE FROM runs WHERE workspace = $1 AND experiment_id = $2",
                workspace,
                experiment_id,
            )
            await conn.execute("DELETE FROM experiments WHERE experiment_id = $1", experiment_id)
            await conn.execute(
                "UPDATE workspace_usage SET runs = greatest(runs - $2, 0),"
                " series = greatest(series - $3, 0),"
                " stored_bytes = greatest(stored_bytes - $4, 0) WHERE workspace = $1",
                workspace,
                len(run_ids),
                len(series),
                int(image_bytes) + int(file_bytes),
            )
            return str(exp["name"]), len(run_ids)

    # -- runs ----------------------------------------------------------------

    async def create_run(
        self,
        workspace: str,
        experiment: str,
        run_id: str,
        display_name: str,
        description: str,
        run_type: str,
        parent_run_id: str,
        tags: Mapping[str, str | None],
        properties: Mapping[str, str],
        status: RunStatus,
    ) -> tuple[Row, bool]:
        async with self._tx() as conn:
            existing = await self._fetch_run(conn, workspace, run_id, missing_ok=True)
            if existing is not None:
                if existing["experiment_name"] != experiment:
                    raise ApiError(
                        "ALREADY_EXISTS",
                        f"run {run_id!r} exists in experiment {existing['experiment_name']!r}",
                        "run_id",
                    )
                return existing, False
            # Run ids are per workspace (migration 007): one used in another
            # workspace is another run, and nothing here looks at it.
            root = run_id
            if parent_run_id:
                parent = await self._fetch_run(
                    conn, workspace, parent_run_id, field="parent_run_id"
                )
                if parent["experiment_name"] != experiment:
                    raise invalid(
                        "parent_run_id",
                        f"parent run {parent_run_id!r} belongs to experiment "
                        f"{parent['experiment_name']!r}, not {experiment!r}",
                    )
                if RunStatus(parent["status"]).terminal:
                    raise precondition(
                        "parent_run_id",
                        f"parent run {parent_run_id!r} is {parent['status']}; "
                        "a finished run cannot get children",
                    )
                root = parent["root_run_id"]
            await conn.execute(
                "INSERT INTO experiments (workspace, name) VALUES ($1, $2)"
                " ON CONFLICT (workspace, name) DO NOTHING",
                workspace,
                experiment,
            )
            exp = await conn.fetchrow(
                "UPDATE experiments SET run_count = run_count + 1"
                " WHERE workspace = $1 AND name = $2 RETURNING experiment_id, run_count, archived",
                workspace,
                experiment,
            )
            assert exp is not None
            if exp["archived"]:
                raise precondition(
                    "experiment_name", f"experiment {experiment!r} is archived; reactivate it first"
                )
            usage = (await lock_usage(conn, [workspace], self.quota_defaults))[workspace]
            if usage.limits.runs and usage.runs >= usage.limits.runs:
                if self.on_quota_exceeded is not None:
                    self.on_quota_exceeded(RUNS)
                raise QuotaExceeded(
                    RUNS,
                    hard_limit_message(
                        RUNS, workspace, usage.runs, usage.limits.runs, "no new run is created"
                    ),
                )
            usage.runs += 1
            await add_usage(conn, [usage])
            await conn.execute(
                "INSERT INTO runs (run_id, workspace, experiment_id, number, display_name,"
                " description, run_type, parent_run_id, root_run_id, status, tags, properties,"
                " start_time)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, NULLIF($8, ''), $9, $10, $11, $12,"
                " CASE WHEN $10 = 'Running' THEN now() END)",
                run_id,
                workspace,
                exp["experiment_id"],
                exp["run_count"],
                display_name,
                description,
                run_type,
                parent_run_id,
                root,
                status.value,
                dict(tags),
                dict(properties),
            )
            row = await self._fetch_run(conn, workspace, run_id)
            return row, True

    async def get_run(self, workspace: str, run_id: str) -> Row:
        async with self._tx() as conn:
            return await self._fetch_run(conn, workspace, run_id)

    async def _fetch_run(
        self,
        conn: asyncpg.Connection,
        workspace: str,
        run_id: str,
        *,
        missing_ok: bool = False,
        field: str = "run_id",
        lock: bool = False,
    ) -> Any:
        row = await conn.fetchrow(
            f"SELECT {_RUN_COLUMNS}, {self._status_sql()} AS effective_status"
            " FROM runs r JOIN experiments e USING (experiment_id)"
            " WHERE r.run_id = $1 AND r.workspace = $2" + (" FOR UPDATE OF r" if lock else ""),
            run_id,
            workspace,
        )
        if row is None and not missing_ok:
            raise not_found(field, f"run {run_id!r} does not exist in workspace {workspace!r}")
        return row

    def _status_sql(self) -> str:
        timeout = float(self.heartbeat_timeout_s)
        return (
            "CASE WHEN r.status = 'Running' AND r.last_seen < now() - "
            f"make_interval(secs => {timeout}) THEN 'NotResponding' ELSE r.status END"
        )

    async def list_runs(
        self,
        workspace: str,
        experiment: str,
        parent_run_id: str,
        recursive: bool,
        tags: Mapping[str, str | None],
        properties: Mapping[str, str],
        run_type: str,
        status: RunStatus | None,
        limit: int,
        property_keys: Sequence[str] = (),
    ) -> list[Row]:
        where = ["r.workspace = $1"]
        args: list[Any] = [workspace]
        if parent_run_id:
            args.append(parent_run_id)
            if recursive:
                where.append(
                    "r.run_id IN (WITH RECURSIVE d AS (SELECT run_id FROM runs WHERE "
                    f"workspace = $1 AND parent_run_id = ${len(args)} UNION ALL SELECT c.run_id"
                    " FROM runs c JOIN d ON c.workspace = $1 AND c.parent_run_id = d.run_id)"
                    " SELECT run_id FROM d)"
                )
            else:
                where.append(f"r.parent_run_id = ${len(args)}")
        if experiment:
            args.append(experiment)
            where.append(f"e.name = ${len(args)}")
            if not parent_run_id and not recursive:
                where.append("r.parent_run_id IS NULL")
        _tag_filter(where, args, "r.tags", tags)
        if properties:
            args.append(dict(properties))
            where.append(f"r.properties @> ${len(args)}::jsonb")
        if property_keys:
            args.append(list(property_keys))
            where.append(f"r.properties ?& ${len(args)}::text[]")
        if run_type:
            args.append(run_type)
            where.append(f"r.run_type = ${len(args)}")
        if status is not None:
            args.append(status.value)
            where.append(f"{self._status_sql()} = ${len(args)}")
        args.append(limit)
        async with self._tx() as conn:
            if experiment:
                await self.get_experiment(workspace, experiment, conn)
            elif parent_run_id:
                await self._fetch_run(conn, workspace, parent_run_id, field="parent_run_id")
            return list(
                await conn.fetch(
                    f"SELECT {_RUN_COLUMNS}, {self._status_sql()} AS effective_status"
                    " FROM runs r JOIN experiments e USING (experiment_id)"
                    f" WHERE {' AND '.join(where)}"
                    f" ORDER BY r.created_at DESC, r.number DESC LIMIT ${len(args)}",
                    *args,
                )
            )

    async def update_run_tags(
        self, workspace: str, run_id: str, set_tags: Mapping[str, str | None], remove: Sequence[str]
    ) -> Row:
        async with self._tx() as conn:
            n = await conn.execute(
                "UPDATE runs SET tags = (tags - $3::text[]) || $4::jsonb"
                " WHERE run_id = $1 AND workspace = $2",
                run_id,
                workspace,
                list(remove),
                dict(set_tags),
            )
            if n == "UPDATE 0":
                raise not_found(
                    "run_id", f"run {run_id!r} does not exist in workspace {workspace!r}"
                )
            return await self._fetch_run(conn, workspace, run_id)

    async def add_run_properties(
        self, workspace: str, run_id: str, props: Mapping[str, str]
    ) -> Row:
        async with self._tx() as conn:
            run = await self._fetch_run(conn, workspace, run_id, lock=True)
            merged = merge_properties(run["properties"], props)
            await conn.execute(
                "UPDATE runs SET properties = $3 WHERE run_id = $1 AND workspace = $2",
                run_id,
                workspace,
                merged,
            )
            return await self._fetch_run(conn, workspace, run_id)

    async def update_run_status(
        self,
        workspace: str,
        run_id: str,
        target: RunStatus,
        error_message: str,
        error_code: str,
    ) -> Row:
        async with self._tx() as conn:
            run = await self._fetch_run(conn, workspace, run_id, lock=True)
            current = RunStatus(run["status"])
            check_transition(current, target)
            await conn.execute(
                "UPDATE runs SET status = $2, last_seen = now(),"
                " start_time = CASE WHEN $2 = 'Running' THEN COALESCE(start_time, now())"
                "                   ELSE start_time END,"
                " end_time = CASE WHEN $3 THEN now() ELSE end_time END,"
                " error_message = COALESCE(NULLIF($4, ''), error_message),"
                " error_code = COALESCE(NULLIF($5, ''), error_code)"
                " WHERE run_id = $1 AND workspace = $6",
                run_id,
                target.value,
                target.terminal,
                error_message,
                error_code,
                workspace,
            )
            return await self._fetch_run(conn, workspace, run_id)

    async def heartbeat(self, workspace: str, run_ids: Sequence[str]) -> list[str]:
        async with self._tx() as conn:
            rows = await conn.fetch(
                "UPDATE runs SET last_seen = now()"
                " WHERE workspace = $1 AND run_id = ANY($2::text[]) RETURNING run_id, status",
                workspace,
                list(run_ids),
            )
        found = {r["run_id"]: r["status"] for r in rows}
        missing = [r for r in run_ids if r not in found]
        if missing:
            raise not_found(
                "run_ids", f"run {missing[0]!r} does not exist in workspace {workspace!r}"
            )
        return [found[r] for r in run_ids]

    async def rewind_run(
        self, workspace: str, run_id: str, step: int, names: Sequence[str]
    ) -> tuple[int, int]:
        """Hide points after `step` in the run's stepped series, and move each
        series' last step back so logging can continue from the checkpoint."""
        async with self._tx() as conn:
            run = await self._fetch_run(conn, workspace, run_id, lock=True)
            if RunStatus(run["status"]).terminal:
                raise precondition("run_id", f"run {run_id!r} is {run['status']}; it cannot rewind")
            series = await conn.fetch(
                "SELECT series_id, kind, value_type FROM series"
                " WHERE workspace = $3 AND run_id = $1 AND stepped"
                " AND (cardinality($2::text[]) = 0 OR name = ANY($2::text[]))"
                " ORDER BY series_id FOR UPDATE",
                run_id,
                list(names),
                workspace,
            )
            hidden = 0
            for s in series:
                table = points_table(s["kind"], s["value_type"])
                numeric = table == "scalar_points"
                # The value the step rules compare: text, or an image's hash.
                text_expr = {"text_points": "value", "image_points": "sha256"}.get(
                    table, "NULL::text"
                )
                status = await conn.execute(
                    f"UPDATE {table} SET hidden = true"
                    " WHERE series_id = $1 AND step > $2 AND NOT hidden",
                    s["series_id"],
                    step,
                )
                hidden += int(status.split()[-1])
                last = await conn.fetchrow(
                    f"SELECT step, {'value' if numeric else 'NULL::float8'} AS value,"
                    f" {text_expr} AS text"
                    f" FROM {table} WHERE series_id = $1 AND NOT hidden"
                    " ORDER BY step DESC LIMIT 1",
                    s["series_id"],
                )
                await conn.execute(
                    "UPDATE series SET last_step = $2, last_value = $3, last_text = $4,"
                    " point_count = (SELECT count(*) FROM "
                    f"{table} WHERE series_id = $1 AND NOT hidden) WHERE series_id = $1",
                    s["series_id"],
                    last["step"] if last else None,
                    last["value"] if last else None,
                    last["text"] if last else None,
                )
            return hidden, len(series)


def points_table(kind: int, value_type: int) -> str:
    """The hypertable that holds a series' points."""
    if kind == KIND_SCALAR:
        return "text_points" if value_type == VALUE_TEXT else "scalar_points"
    return {KIND_TABLE: "table_rows", KIND_IMAGE: "image_points"}.get(kind, "evaluation_points")


def _tag_filter(
    where: list[str], args: list[Any], column: str, tags: Mapping[str, str | None]
) -> None:
    """Tags to match: a key alone matches on presence; a key with a value on both."""
    for key, value in tags.items():
        if value is None:
            args.append(key)
            where.append(f"{column} ? ${len(args)}")
        else:
            args.append({key: value})
            where.append(f"{column} @> ${len(args)}::jsonb")


def tags_of(value: Iterable[tuple[str, str | None]]) -> dict[str, str | None]:
    return dict(value)


# -- points -----------------------------------------------------------------------

PG_EPOCH = 946684800.0  # 2000-01-01T00:00:00Z, PostgreSQL's timestamp origin

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)

# One scalar_points row in PostgreSQL's binary COPY format: field count, then
# (length, big-endian value) per column: time, series_id, step, value, hidden.
_SCALAR_ROW = np.dtype(
    [
        ("nfields", ">i2"),
        ("l_time", ">i4"),
        ("time", ">i8"),
        ("l_sid", ">i4"),
        ("sid", ">i8"),
        ("l_step", ">i4"),
        ("step", ">i8"),
        ("l_value", ">i4"),
        ("value", ">f8"),
        ("l_hidden", ">i4"),
        ("hidden", "u1"),
    ]
)
SCALAR_COLUMNS = ["time", "series_id", "step", "value", "hidden"]


def encode_scalar_copy(
    times: np.ndarray[Any, Any],
    series_ids: np.ndarray[Any, Any],
    steps: np.ndarray[Any, Any],
    values: np.ndarray[Any, Any],
) -> bytes:
    """Build a binary COPY payload for scalar_points from arrays, vectorized:
    no per-row Python objects on the hot path."""
    rows = np.empty(times.shape[0], dtype=_SCALAR_ROW)
    rows["nfields"] = 5
    rows["l_time"] = 8
    rows["time"] = np.rint((times - PG_EPOCH) * 1e6).astype(np.int64)
    rows["l_sid"] = 8
    rows["sid"] = series_ids
    rows["l_step"] = 8
    rows["step"] = steps
    rows["l_value"] = 8
    rows["value"] = values
    rows["l_hidden"] = 1
    rows["hidden"] = 0
    return _COPY_HEADER + rows.tobytes() + _COPY_TRAILER


# -- writer progress: exactly once per (workspace, writer) ------------------------

# The outcomes of a writer's last batches that the service keeps, so a batch
# resent after its acknowledgement was lost is answered with what its commit
# decided. The client keeps at most 32 batches unacknowledged
# (sdk/steplog/_writer.py MAX_INFLIGHT_BATCHES): twice that covers any resend
# of its window.
OUTCOMES_KEPT = 64
# Each kept outcome is at most this many bytes: the counts are exact, the
# rejected-point examples are cut (strings shortened, then examples dropped).
MAX_OUTCOME_BYTES = 4096
_MAX_EXAMPLE_CHARS = 200
_MAX_EXAMPLE_LABELS = 16
_MAX_MESSAGE_CHARS = 300


class SequenceGap(Exception):
    """A writer skipped a sequence number: the client must resend from `expected`.

    The numbers are the writer's own, in its own workspace."""

    def __init__(self, writer_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"writer {writer_id[:128]!r}: expected batch sequence {expected}, got {got}; "
            f"resend from {expected}"
        )
        self.expected = expected


@dataclass
class CommitResult:
    duplicate_batch: bool = False
    gap: SequenceGap | None = None
    # For a duplicate batch: what the commit that stored it decided, while
    # the service keeps it (the writer's last OUTCOMES_KEPT batches).
    original: Outcome | None = None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def encode_outcome(outcome: Outcome, max_bytes: int = MAX_OUTCOME_BYTES) -> bytes:
    """A batch's outcome as compact JSON of at most `max_bytes`: the counts in
    full, as many (shortened) rejected-point examples as fit."""
    head: dict[str, Any] = {
        "a": outcome.accepted,
        "d": outcome.duplicates,
        "r": outcome.rejected,
        "c": sorted(outcome.by_reason.items()),
    }
    examples = [
        [
            _cut(run_id, _MAX_EXAMPLE_CHARS),
            _cut(name, _MAX_EXAMPLE_CHARS),
            {
                _cut(k, _MAX_EXAMPLE_CHARS): _cut(v, _MAX_EXAMPLE_CHARS)
                for k, v in list(labels.items())[:_MAX_EXAMPLE_LABELS]
            },
            index,
            step,
            reason,
            _cut(message, _MAX_MESSAGE_CHARS),
        ]
        for run_id, name, labels, index, step, reason, message in outcome.examples
    ]
    keep = len(examples)
    while True:
        data = json.dumps({**head, "x": examples[:keep]}, separators=(",", ":")).encode()
        if len(data) <= max_bytes or keep == 0:
            return data
        keep -= 1


def decode_outcome(data: bytes) -> Outcome:
    """The inverse of encode_outcome."""
    doc = json.loads(data)
    return Outcome(
        accepted=int(doc["a"]),
        duplicates=int(doc["d"]),
        rejected=int(doc["r"]),
        by_reason={int(reason): int(n) for reason, n in doc["c"]},
        examples=[
            (str(r), str(n), dict(lb), int(i), None if s is None else int(s), int(why), str(m))
            for r, n, lb, i, s, why, m in doc["x"]
        ],
    )


def classify_sequences(
    batches: Sequence[DecodedBatch], marks: Mapping[tuple[str, str], int]
) -> tuple[list[CommitResult], list[DecodedBatch]]:
    """Exactly-once, pure: against each writer's committed high-water mark, a
    batch at or below it is a duplicate, the one right above it is live (and
    moves the mark for the batches after it in the group), a gap is an error."""
    hwm = dict(marks)
    results: list[CommitResult] = []
    live: list[DecodedBatch] = []
    for b in batches:
        key = (b.workspace, b.writer_id)
        last = hwm.get(key, 0)
        if b.sequence <= last:
            results.append(CommitResult(duplicate_batch=True))
        elif b.sequence == last + 1:
            hwm[key] = b.sequence
            results.append(CommitResult())
            live.append(b)
        else:
            results.append(CommitResult(gap=SequenceGap(b.writer_id, last + 1, b.sequence)))
    return results, live


def sweep_interval(retention_s: float) -> float:
    """How often the retention sweep runs: a quarter of the retention, at
    least every minute, at most every 50 ms."""
    return min(60.0, max(0.05, retention_s / 4))


async def sweep_writers(
    conn: asyncpg.Connection, retention_s: float, rows: int = 1000, rounds: int = 100
) -> int:
    """Delete writers idle for longer than the retention (and, by cascade,
    their kept outcomes), in short transactions of at most `rows` rows, at
    most `rounds` of them per call. Rows a commit holds are skipped: that
    writer is active. Returns how many writers were deleted."""
    deleted = 0
    for _ in range(rounds):
        status = await conn.execute(
            "DELETE FROM writers WHERE (workspace, writer_id) IN ("
            " SELECT workspace, writer_id FROM writers"
            " WHERE updated_at < now() - make_interval(secs => $1)"
            " ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            float(retention_s),
            rows,
        )
        n = int(status.split()[-1])
        deleted += n
        if n < rows:
            break
    return deleted


class WriterSweeper:
    """The background task that expires idle writers (see sweep_writers)."""

    def __init__(self, pool: asyncpg.Pool, retention_s: float) -> None:
        self.pool = pool
        self.retention_s = retention_s
        self.deleted = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="steplog-writer-sweep")

    async def _run(self) -> None:
        interval = sweep_interval(self.retention_s)
        while True:
            try:
                async with acquire(self.pool) as conn:
                    n = await sweep_writers(conn, self.retention_s)
                self.deleted += n
                if n:
                    log.info("expired %d idle writer(s)", n)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again
                log.warning("writer retention sweep failed: %s", exc)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class GroupStats:
    rows: int = 0
    batches: int = 0
    new_series: int = 0


_SERIES_COLUMNS = (
    "series_id, workspace, run_id, name, labels_key, kind, value_type, stepped, out_of_order,"
    " last_step, last_value, last_text, point_count"
)

# A series in the write path: (workspace, run_id, name, labels_key). Run ids
# are per workspace, so the same chunk key in two batches of one group is two
# series when the batches' workspaces differ.
SeriesKey = tuple[str, str, str, str]


def _series_key(workspace: str, chunk: Chunk) -> SeriesKey:
    return (workspace, chunk.run_id, chunk.name, chunk.labels_key)


def _row_key(row: Mapping[str, Any]) -> SeriesKey:
    return (row["workspace"], row["run_id"], row["name"], row["labels_key"])


def _state(row: Mapping[str, Any], new: bool = False) -> SeriesState:
    return SeriesState(
        series_id=row["series_id"],
        kind=row["kind"],
        value_type=row["value_type"],
        stepped=row["stepped"],
        out_of_order=row["out_of_order"],
        last_step=row["last_step"],
        last_value=row["last_value"],
        last_text=row["last_text"],
        point_count=row["point_count"],
        new=new,
    )


class PointStore:
    """Group commits of decoded batches: writer high-water marks, series
    state, and points, in one transaction."""

    def __init__(
        self,
        max_series_per_run: int,
        quota_defaults: Limits | None = None,
        on_quota_exceeded: Any = None,
    ) -> None:
        self.max_series_per_run = max_series_per_run
        # Hard quotas per workspace (ingest/store/quotas.py): series and stored bytes.
        self.quota_defaults = quota_defaults or Limits()
        self.on_quota_exceeded = on_quota_exceeded
        # Non-scalar kinds register a writer: async fn(conn, accepted) -> rows.
        self.kind_writers: dict[int, Any] = {}
        # Kinds whose points are checked against stored series state beyond
        # steps (a table column's type) register a check, run after the series
        # are locked and before order.apply, so what it rejects is reported and
        # never counted as accepted: async fn(conn, [(chunk, state, outcome)]).
        self.kind_checks: dict[int, Any] = {}

    async def commit_group(
        self, conn: asyncpg.Connection, batches: Sequence[DecodedBatch]
    ) -> tuple[list[CommitResult], GroupStats]:
        stats = GroupStats(batches=len(batches))
        async with conn.transaction():
            results, live = await self._sequence(conn, batches)
            # The (workspace, run_id) of every chunk with points to store.
            seen = sorted(
                {(b.workspace, c.run_id) for b in live for c in b.chunks if c.alive.any()}
            )
            if seen:
                await self._check_runs(conn, live)
                # Usage rows locked after the series rows (quotas.lock_usage).
                usage: dict[str, Usage] = {}
                states = await self._lock_series(conn, live, stats, usage)
                for kind, check in self.kind_checks.items():
                    items = [
                        (c, states[_series_key(b.workspace, c)], b.outcome)
                        for b in live
                        for c in b.chunks
                        if c.kind == kind
                        and _series_key(b.workspace, c) in states
                        and c.alive.any()
                    ]
                    if items:
                        await check(conn, items)
                if usage:
                    self._enforce_stored_bytes(live, usage)
                accepted: list[Accepted] = []
                for batch in live:
                    for chunk in batch.chunks:
                        if not chunk.alive.any():
                            continue
                        state = states.get(_series_key(batch.workspace, chunk))
                        if state is None:
                            continue
                        acc = order.apply(chunk, state, batch.outcome)
                        if acc is not None and acc.index.size:
                            accepted.append(acc)
                stats.rows = await self._write_points(conn, accepted)
                if usage:
                    _charge_images(live, accepted, usage)
                    await add_usage(conn, list(usage.values()))
                await self._save_states(conn, states)
                await conn.execute(
                    "UPDATE runs SET last_seen = now() WHERE (workspace, run_id) IN"
                    " (SELECT * FROM unnest($1::text[], $2::text[]))"
                    " AND last_seen < now() - interval '2 seconds'",
                    [k[0] for k in seen],
                    [k[1] for k in seen],
                )
            if live:
                await self._record_progress(conn, live)
        return results, stats

    async def _sequence(
        self, conn: asyncpg.Connection, batches: Sequence[DecodedBatch]
    ) -> tuple[list[CommitResult], list[DecodedBatch]]:
        """Exactly-once: lock each writer's row, creating the new ones first,
        so two processes that receive a writer's batch at once take turns (an
        INSERT waits for the other transaction's uncommitted row, then locks
        the committed one and reads its mark). Rows are taken in (workspace,
        writer_id) order, the same in every transaction: no deadlocks."""
        keys = sorted({(b.workspace, b.writer_id) for b in batches})
        rows = await conn.fetch(
            "INSERT INTO writers AS w (workspace, writer_id, last_sequence)"
            " SELECT ws, id, 0 FROM unnest($1::text[], $2::text[]) AS u(ws, id) ORDER BY ws, id"
            " ON CONFLICT (workspace, writer_id) DO UPDATE SET updated_at = now()"
            " RETURNING workspace, writer_id, last_sequence",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        marks = {(r["workspace"], r["writer_id"]): r["last_sequence"] for r in rows}
        results, live = classify_sequences(batches, marks)
        moving = {(b.workspace, b.writer_id) for b in live}
        unused = [k for k in keys if marks.get(k) == 0 and k not in moving]
        if unused:
            # Rows just created for writers whose batches were all gaps: a
            # writer exists once a batch of it commits, not before.
            await conn.execute(
                "DELETE FROM writers WHERE (workspace, writer_id) IN"
                " (SELECT * FROM unnest($1::text[], $2::text[])) AND last_sequence = 0",
                [k[0] for k in unused],
                [k[1] for k in unused],
            )
        again = [(b, r) for b, r in zip(batches, results, strict=True) if r.duplicate_batch]
        if again:
            kept = await conn.fetch(
                "SELECT workspace, writer_id, sequence, result FROM writer_batches"
                " WHERE (workspace, writer_id, sequence) IN"
                " (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]))",
                [b.workspace for b, _ in again],
                [b.writer_id for b, _ in again],
                [b.sequence for b, _ in again],
            )
            found = {(r["workspace"], r["writer_id"], r["sequence"]): r["result"] for r in kept}
            for b, result in again:
                data = found.get((b.workspace, b.writer_id, b.sequence))
                if data is not None:
                    result.original = decode_outcome(data)
        return results, live

    async def _record_progress(
        self, conn: asyncpg.Connection, live: Sequence[DecodedBatch]
    ) -> None:
        """In the transaction that stored their points: move each writer's
        high-water mark forward (never back), keep each live batch's outcome,
        and forget the writer's outcomes older than its last OUTCOMES_KEPT."""
        marks: dict[tuple[str, str], int] = {}
        for b in live:
            key = (b.workspace, b.writer_id)
            marks[key] = max(marks.get(key, 0), b.sequence)
        await conn.execute(
            "WITH m AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"
            "   AS m(ws, id, seq)),"
            " hwm AS (UPDATE writers w SET last_sequence = GREATEST(w.last_sequence, m.seq),"
            "   updated_at = now() FROM m WHERE w.workspace = m.ws AND w.writer_id = m.id),"
            " old AS (DELETE FROM writer_batches b USING m"
            "   WHERE b.workspace = m.ws AND b.writer_id = m.id AND b.sequence <= m.seq - $4)"
            " INSERT INTO writer_batches (workspace, writer_id, sequence, result)"
            " SELECT * FROM unnest($5::text[], $6::text[], $7::bigint[], $8::bytea[])"
            " ON CONFLICT (workspace, writer_id, sequence) DO UPDATE SET result = EXCLUDED.result",
            [k[0] for k in marks],
            [k[1] for k in marks],
            list(marks.values()),
            OUTCOMES_KEPT,
            [b.workspace for b in live],
            [b.writer_id for b in live],
            [b.sequence for b in live],
            [encode_outcome(b.outcome) for b in live],
        )

    async def _check_runs(self, conn: asyncpg.Connection, live: Sequence[DecodedBatch]) -> None:
        """Each chunk's run, looked up in its batch's workspace only: a run of
        another workspace is not found, exactly like one that does not exist."""
        keys = sorted({(b.workspace, c.run_id) for b in live for c in b.chunks if c.alive.any()})
        rows = await conn.fetch(
            "SELECT workspace, run_id, status FROM runs WHERE (workspace, run_id) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        runs = {(r["workspace"], r["run_id"]): r["status"] for r in rows}
        for b in live:
            for c in b.chunks:
                if not c.alive.any():
                    continue
                status = runs.get((b.workspace, c.run_id))
                if status is None:
                    b.outcome.reject(
                        c,
                        None,
                        RUN_NOT_FOUND,
                        f"run {c.run_id[:130]!r} does not exist in workspace {b.workspace!r}",
                        steps=False,
                    )
                elif RunStatus(status).terminal:
                    b.outcome.reject(
                        c,
                        None,
                        RUN_NOT_ACTIVE,
                        f"run {c.run_id!r} is {status}; a finished run takes no more points",
                        steps=False,
                    )
                elif c.kind != KIND_SCALAR and c.kind not in self.kind_writers:
                    b.outcome.reject(
                        c,
                        None,
                        INVALID_VALUE,
                        "this service does not store this kind of point yet",
                        steps=False,
                    )

    async def _lock_series(
        self,
        conn: asyncpg.Connection,
        live: Sequence[DecodedBatch],
        stats: GroupStats,
        usage: dict[str, Usage],
    ) -> dict[SeriesKey, SeriesState]:
        """Fetch and lock the state of every series in the group, creating the
        new ones from their first chunk. Then lock the usage rows of the
        workspaces that get new series or images (filled into `usage`)."""
        first: dict[SeriesKey, Chunk] = {}
        for b in live:
            for c in b.chunks:
                key = _series_key(b.workspace, c)
                if c.alive.any() and key not in first:
                    first[key] = c
        keys = sorted(first)
        states = await self._select_for_update(conn, keys)
        missing = [k for k in keys if k not in states]
        counted = {k[0] for k in missing} | {
            b.workspace for b in live for c in b.chunks if c.kind == KIND_IMAGE and c.alive.any()
        }
        if counted:
            usage.update(await lock_usage(conn, counted, self.quota_defaults))
        if missing:
            missing = await self._enforce_series_limit(conn, missing, first, live)
        if missing:
            missing = self._enforce_series_quota(missing, live, usage)
        if missing:
            chunks = [first[k] for k in missing]
            created = await conn.fetch(
                "INSERT INTO series (run_id, name, labels, labels_key, kind, value_type, stepped,"
                " out_of_order, description, workspace)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[],"
                " $5::int2[], $6::int2[], $7::bool[], $8::bool[], $9::text[], $10::text[])"
                " ON CONFLICT (workspace, run_id, name, labels_key) DO NOTHING"
                f" RETURNING {_SERIES_COLUMNS}",
                [c.run_id for c in chunks],
                [c.name for c in chunks],
                [c.labels for c in chunks],
                [c.labels_key for c in chunks],
                [c.kind for c in chunks],
                [c.value_type for c in chunks],
                [c.stepped for c in chunks],
                [bool(c.out_of_order) for c in chunks],
                [c.description[:5000] for c in chunks],
                [k[0] for k in missing],
            )
            stats.new_series += len(created)
            for r in created:
                key = _row_key(r)
                states[key] = _state(r, new=True)
                if (u := usage.get(key[0])) is not None:
                    u.series += 1
            raced = [k for k in missing if k not in states]
            if raced:
                # Another service process created them a moment ago: lock theirs.
                states.update(await self._select_for_update(conn, raced))
        return states

    @staticmethod
    async def _select_for_update(
        conn: asyncpg.Connection, keys: Sequence[SeriesKey]
    ) -> dict[SeriesKey, SeriesState]:
        """Lock existing series rows, in series_id order (a fixed lock order
        keeps concurrent transactions from deadlocking)."""
        rows = await conn.fetch(
            f"SELECT {_SERIES_COLUMNS} FROM series"
            " WHERE (workspace, run_id, name, labels_key) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]))"
            " ORDER BY series_id FOR UPDATE",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [k[3] for k in keys],
        )
        return {_row_key(r): _state(r) for r in rows}

    async def _enforce_series_limit(
        self,
        conn: asyncpg.Connection,
        missing: list[SeriesKey],
        first: Mapping[SeriesKey, Chunk],
        live: Sequence[DecodedBatch],
    ) -> list[SeriesKey]:
        runs = sorted({k[:2] for k in missing})
        rows = await conn.fetch(
            "SELECT workspace, run_id, count(*) AS n FROM series WHERE (workspace, run_id) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[])) GROUP BY workspace, run_id",
            [r[0] for r in runs],
            [r[1] for r in runs],
        )
        have = {(r["workspace"], r["run_id"]): r["n"] for r in rows}
        allowed: list[SeriesKey] = []
        refused: set[SeriesKey] = set()
        for k in missing:
            run = k[:2]
            if have.get(run, 0) < self.max_series_per_run:
                have[run] = have.get(run, 0) + 1
                allowed.append(k)
            else:
                refused.add(k)
        if refused:
            for b in live:
                for c in b.chunks:
                    if _series_key(b.workspace, c) in refused:
                        b.outcome.reject(
                            c,
                            None,
                            LIMIT_EXCEEDED,
                            f"run {c.run_id!r} has {self.max_series_per_run} series, the limit",
                            steps=False,
                        )
        return allowed

    def _quota_exceeded(self, quota: str) -> None:
        if self.on_quota_exceeded is not None:
            self.on_quota_exceeded(quota)

    def _enforce_series_quota(
        self,
        missing: list[SeriesKey],
        live: Sequence[DecodedBatch],
        usage: Mapping[str, Usage],
    ) -> list[SeriesKey]:
        """The workspace's series quota: new series past it are rejected
        LIMIT_EXCEEDED (the series the workspace has keep taking points)."""
        planned: dict[str, int] = {}
        allowed: list[SeriesKey] = []
        refused: dict[SeriesKey, str] = {}
        for k in missing:
            ws = k[0]
            u = usage.get(ws)
            n = planned.get(ws, 0)
            if u is None or not u.limits.series or u.series + n < u.limits.series:
                planned[ws] = n + 1
                allowed.append(k)
            else:
                refused[k] = hard_limit_message(
                    SERIES, ws, u.series, u.limits.series, "no new series is created"
                )
        if refused:
            self._quota_exceeded(SERIES)
            for b in live:
                for c in b.chunks:
                    message = refused.get(_series_key(b.workspace, c))
                    if message is not None:
                        b.outcome.reject(c, None, LIMIT_EXCEEDED, message, steps=False)
        return allowed

    def _enforce_stored_bytes(
        self, live: Sequence[DecodedBatch], usage: Mapping[str, Usage]
    ) -> None:
        """The workspace's stored-bytes quota: image points that would pass it
        are rejected LIMIT_EXCEEDED, a whole chunk at a time, in batch order."""
        planned: dict[str, int] = {}
        hit = False
        for b in live:
            u = usage.get(b.workspace)
            if u is None or not u.limits.stored_bytes:
                continue
            for c in b.chunks:
                if c.kind != KIND_IMAGE or not c.payload or not c.alive.any():
                    continue
                n = _image_bytes(c, np.flatnonzero(c.alive).tolist())
                held = u.stored_bytes + planned.get(b.workspace, 0)
                if held + n > u.limits.stored_bytes:
                    hit = True
                    b.outcome.reject(
                        c,
                        None,
                        LIMIT_EXCEEDED,
                        hard_limit_message(
                            STORED_BYTES,
                            b.workspace,
                            held,
                            u.limits.stored_bytes,
                            f"these images ({n} bytes) are not stored",
                        ),
                        steps=False,
                    )
                else:
                    planned[b.workspace] = planned.get(b.workspace, 0) + n
        if hit:
            self._quota_exceeded(STORED_BYTES)

    async def _write_points(self, conn: asyncpg.Connection, accepted: list[Accepted]) -> int:
        numeric = [
            a for a in accepted if a.chunk.kind == KIND_SCALAR and a.chunk.values is not None
        ]
        text = [a for a in accepted if a.chunk.kind == KIND_SCALAR and a.chunk.texts is not None]
        other = [a for a in accepted if a.chunk.kind != KIND_SCALAR]
        rows = 0
        for acc_list, table in ((numeric, "scalar_points"), (text, "text_points")):
            for a in acc_list:
                await hide_superseded(conn, table, a)
        if numeric:
            payload = encode_scalar_copy(
                np.concatenate([a.chunk.times[a.index] for a in numeric]),
                np.concatenate(
                    [np.full(a.index.size, a.series_id, dtype=np.int64) for a in numeric]
                ),
                np.concatenate([a.chunk.steps[a.index] for a in numeric]),
                np.concatenate(
                    [a.chunk.values[a.index] for a in numeric if a.chunk.values is not None]
                ),
            )
            await conn.copy_to_table(
                "scalar_points", source=io.BytesIO(payload), columns=SCALAR_COLUMNS, format="binary"
            )
            rows += sum(int(a.index.size) for a in numeric)
        if text:
            records = []
            for a in text:
                texts = a.chunk.texts
                assert texts is not None
                for i in a.index.tolist():
                    records.append(
                        (
                            datetime.fromtimestamp(float(a.chunk.times[i]), UTC),
                            a.series_id,
                            int(a.chunk.steps[i]),
                            texts[i],
                            False,
                        )
                    )
            await conn.copy_records_to_table(
                "text_points",
                records=records,
                columns=["time", "series_id", "step", "value", "hidden"],
            )
            rows += len(records)
        by_kind: dict[int, list[Accepted]] = {}
        for a in other:
            by_kind.setdefault(a.chunk.kind, []).append(a)
        for kind, accs in by_kind.items():
            rows += await self.kind_writers[kind](conn, accs)
        return rows

    async def _save_states(
        self, conn: asyncpg.Connection, states: Mapping[SeriesKey, SeriesState]
    ) -> None:
        changed = [s for s in states.values() if s.changed]
        if not changed:
            return
        await conn.execute(
            "UPDATE series s SET last_step = u.last_step, last_value = u.last_value,"
            " last_text = u.last_text, point_count = u.point_count, last_time = now()"
            " FROM unnest($1::bigint[], $2::bigint[], $3::float8[], $4::text[], $5::bigint[])"
            " AS u(series_id, last_step, last_value, last_text, point_count)"
            " WHERE s.series_id = u.series_id",
            [s.series_id for s in changed],
            [s.last_step for s in changed],
            [s.last_value for s in changed],
            [s.last_text for s in changed],
            [s.point_count for s in changed],
        )


def _image_bytes(chunk: Chunk, index: Iterable[int]) -> int:
    payload = chunk.payload or []
    return sum(int(getattr(payload[i], "size", 0)) for i in index)


def _charge_images(
    live: Sequence[DecodedBatch], accepted: Sequence[Accepted], usage: Mapping[str, Usage]
) -> None:
    """Count the accepted image points' bytes in their workspaces' usage."""
    workspace_of = {id(c): b.workspace for b in live for c in b.chunks}
    for a in accepted:
        if a.chunk.kind != KIND_IMAGE:
            continue
        u = usage.get(workspace_of.get(id(a.chunk), ""))
        if u is not None:
            u.stored_bytes += _image_bytes(a.chunk, a.index.tolist())


class QueryStore:
    """Reads: series of runs and their visible (not hidden) points."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

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
    ) -> list[Row]:
        """The next series of a run in GetMetrics order from `after` =
        (group, series_id), inclusive: at most `limit`, whose headers fit in
        `budget` bytes (at least one). Rows carry `grp` and `header` (bytes)."""
        async with self._conn() as conn:
            return list(
                await conn.fetch(
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
            )

    async def list_series(
        self, workspace: str, run_id: str, after: int, limit: int, budget: int
    ) -> list[Row]:
        """The series of a run in creation order from series id `after`
        (inclusive): at most `limit`, whose headers fit in `budget` bytes (at
        least one), then the next series, if any, with `take` false."""
        async with self._conn() as conn:
            return list(
                await conn.fetch(
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
            )

    async def find_series(
        self, workspace: str, run_id: str, name: str, labels: Mapping[str, str]
    ) -> Row:
        from ingest.core.decode import labels_key

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
        return row

    async def scalar_points(self, series_ids: Sequence[int], text: bool, window: Window) -> Slice:
        """Visible scalar points of a window, in (series_id, step) order."""
        table = "text_points" if text else "scalar_points"
        # Encoded: a step (<= 10 bytes), a time and a double, or a string.
        cost = "octet_length(value) + 24" if text else "26"
        async with self._conn() as conn:
            return await visible_points(conn, table, [("value", "value")], series_ids, window, cost)

    async def count_points(
        self, table: str, series_id: int, start: int, end: int
    ) -> tuple[int, int | None]:
        async with self._conn() as conn:
            return await count_points(conn, table, series_id, start, end)
