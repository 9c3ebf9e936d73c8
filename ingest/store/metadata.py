"""Experiments and runs: their rows, status transitions, tags and properties,
and the series listing of a run (asyncpg).

Over 500 lines: one store class whose methods share the run row's columns and
rules; splitting it would scatter one table's invariants."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from ingest.core.errors import ApiError, invalid, not_found, precondition
from ingest.core.model import RunStatus, check_transition, merge_properties
from ingest.store.db import Row, acquire
from ingest.store.queries import points_table
from ingest.store.quotas import (
    RUNS,
    Limits,
    QuotaExceeded,
    add_usage,
    hard_limit_message,
    lock_usage,
)

_RUN_COLUMNS = """
    r.run_id, r.workspace, e.name AS experiment_name, r.number, r.display_name,
    r.description, r.run_type, r.parent_run_id, r.root_run_id, r.status, r.created_at,
    r.start_time, r.end_time, r.error_message, r.error_code, r.tags, r.properties,
    r.last_seen
"""


class MetadataStore:
    """Experiments and runs."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        heartbeat_timeout_s: float,
        quota_defaults: Limits | None = None,
        on_quota_exceeded: Callable[[str], None] | None = None,
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
            # Locked (in series_id order, as writers lock them) so the
            # compaction sweep (ingest/store/compact.py) cannot move a
            # series' points into a block this deletion would not see.
            series = [
                r["series_id"]
                for r in await conn.fetch(
                    "SELECT series_id FROM series"
                    " WHERE workspace = $1 AND run_id = ANY($2::text[])"
                    " ORDER BY series_id FOR UPDATE",
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
                "scalar_rows",
                "scalar_blocks",
                "text_points",
                "table_rows",
                "evaluation_points",
                "image_points",
                "histogram_points",
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
                if numeric:
                    # Rows and blocks (migration 010): scalar_hide updates both.
                    hidden += int(
                        await conn.fetchval(
                            "SELECT scalar_hide($1, NULL, $2)", s["series_id"], step
                        )
                    )
                else:
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
                # Numeric scalars counted from the blocks' summaries (migration 010).
                count = (
                    "(SELECT n FROM scalar_count($1, -9223372036854775808, 9223372036854775807))"
                    if numeric
                    else f"(SELECT count(*) FROM {table} WHERE series_id = $1 AND NOT hidden)"
                )
                await conn.execute(
                    "UPDATE series SET last_step = $2, last_value = $3, last_text = $4,"
                    f" point_count = {count} WHERE series_id = $1",
                    s["series_id"],
                    last["step"] if last else None,
                    last["value"] if last else None,
                    last["text"] if last else None,
                )
            return hidden, len(series)


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
