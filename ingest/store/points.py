"""Group commits of decoded batches: writer high-water marks, series state
and points in one transaction (asyncpg).

Over 500 lines: the steps of one transaction, in the order they take their
locks (writers, runs, series, usage), which reads best in one place; the
kinds, the COPY encoding and the writer outcomes live beside it (kinds.py,
copy.py, writers.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np

from ingest.core import order
from ingest.core.batch import (
    INVALID_VALUE,
    KIND_IMAGE,
    KIND_SCALAR,
    LIMIT_EXCEEDED,
    Chunk,
    CommitResult,
    DecodedBatch,
)
from ingest.core.order import Accepted, SeriesState, reject_unwritable_run
from ingest.store.blocks import (
    BLOCK_COLUMNS,
    BLOCK_COLUMNS_WITH_ID,
    MIN_BLOCK_POINTS,
    Block,
    blocks_copy_source,
    encode_block_rows,
    merge_taken,
    split_span,
)
from ingest.store.columns import Block as CachedBlock
from ingest.store.columns import Written
from ingest.store.copy import PG_EPOCH, SCALAR_COLUMNS
from ingest.store.kinds import CheckItem, KindCheck, KindWriter, hide_superseded
from ingest.store.quotas import (
    SERIES,
    STORED_BYTES,
    Limits,
    Usage,
    add_usage,
    hard_limit_message,
    lock_usage,
)
from ingest.store.writers import (
    OUTCOMES_KEPT,
    classify_sequences,
    decode_outcome,
    encode_outcome,
)

log = logging.getLogger(__name__)

# PostgreSQL's timestamp origin in microseconds since the Unix epoch.
PG_EPOCH_US = int(PG_EPOCH) * 1_000_000

# Write-through (PointStore.publish): the transaction's xid, as the xmin its
# rows will have (no subtransaction is open at the COPY), and block ids
# allocated ahead for the commit's blocks.
_XID_AND_IDS = (
    "SELECT pg_current_xact_id()::xid::text::bigint AS x,"
    " ARRAY(SELECT nextval('scalar_blocks_id_seq') FROM generate_series(1, $1::int)) AS ids"
)

# The blocks a commit stored, for the read cache: (xid, blocks, each
# block's split_span, the block ids in COPY order).
Stored = list[tuple[int, list[Block], list[list[slice]], list[int]]]


def cached_blocks(stored: Stored) -> Written:
    """The blocks a commit stored, as reads decode them, by cache key
    (block_id, xmin): what the read cache takes once the commit is done."""
    out: Written = []
    for xid, blocks, cuts, ids in stored:
        next_id = iter(ids)
        for b, pieces in zip(blocks, cuts, strict=True):
            times = b.times_us + PG_EPOCH_US
            for c in pieces:
                hidden = None if b.hidden is None else b.hidden[c]
                block = CachedBlock.written(b.steps[c], times[c], b.values[c], hidden)
                block.visible()  # derived here, on the commit's thread, not by the first read
                out.append(((next(next_id), xid), block))
    return out


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
        on_quota_exceeded: Callable[[str], None] | None = None,
        writers: Mapping[int, KindWriter] | None = None,
        checks: Mapping[int, KindCheck] | None = None,
        publish: Callable[[Written], None] | None = None,
    ) -> None:
        self.max_series_per_run = max_series_per_run
        # Write-through to the read cache (columns.publisher): told the
        # blocks each commit stored, once it committed; None: not told.
        self.publish = publish
        # Hard quotas per workspace (ingest/store/quotas.py): series and stored bytes.
        self.quota_defaults = quota_defaults or Limits()
        self.on_quota_exceeded = on_quota_exceeded
        # The kinds other than scalars that this service stores (ingest/store/kinds.py);
        # points of any other kind are rejected.
        self.kind_writers: Mapping[int, KindWriter] = dict(writers or {})
        self.kind_checks: Mapping[int, KindCheck] = dict(checks or {})

    async def commit_group(
        self, conn: asyncpg.Connection, batches: Sequence[DecodedBatch]
    ) -> tuple[list[CommitResult], GroupStats]:
        stats = GroupStats(batches=len(batches))
        stored: Stored = []
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
                        CheckItem(c, states[_series_key(b.workspace, c)], b.outcome)
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
                stats.rows = await self._write_points(conn, accepted, stored)
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
        if stored and self.publish is not None:
            # Committed: the blocks are the versions every later read sees
            # until an UPDATE of one gives it another xmin.
            try:
                self.publish(cached_blocks(stored))
            except Exception:  # the commit happened; only the cache misses them
                log.exception("blocks not handed to the read cache")
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
                if reject_unwritable_run(
                    b.outcome, c, b.workspace, runs.get((b.workspace, c.run_id))
                ):
                    continue
                if c.kind != KIND_SCALAR and c.kind not in self.kind_writers:
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
                n = image_bytes(c, np.flatnonzero(c.alive).tolist())
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

    async def _write_points(
        self, conn: asyncpg.Connection, accepted: list[Accepted], stored: Stored
    ) -> int:
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
            # One block per series of the group (ingest/store/blocks.py).
            blocks = merge_taken(
                [
                    (a.series_id, a.chunk.times, a.chunk.steps, values, a.index)
                    for a in numeric
                    if (values := a.chunk.values) is not None
                ],
                {a.series_id for a in numeric if a.supersede is not None},
            )
            # A series with few points in this commit: rows, merged into
            # blocks later by the compaction sweep (ingest/store/compact.py).
            small = [b for b in blocks if b.values.shape[0] < MIN_BLOCK_POINTS]
            if len(small) < len(blocks):
                big = [b for b in blocks if b.values.shape[0] >= MIN_BLOCK_POINTS]
                cuts: list[list[slice]] | None = None
                ids: list[int] | None = None
                if self.publish is not None:
                    # The block ids allocated ahead, so the cache knows them.
                    cuts = [split_span(b.times_us) for b in big]
                    got = await conn.fetchrow(_XID_AND_IDS, sum(len(c) for c in cuts))
                    assert got is not None
                    ids = list(got["ids"])
                    stored.append((int(got["x"]), big, cuts, ids))  # published once committed
                await conn.copy_to_table(
                    "scalar_blocks",
                    source=blocks_copy_source(big, cuts, ids),  # encoded while it is sent
                    columns=BLOCK_COLUMNS if ids is None else BLOCK_COLUMNS_WITH_ID,
                    format="binary",
                )
            if small:
                await conn.copy_to_table(
                    "scalar_rows",
                    source=memoryview(encode_block_rows(small)),
                    columns=SCALAR_COLUMNS,
                    format="binary",
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


def image_bytes(chunk: Chunk, index: Iterable[int]) -> int:
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
            u.stored_bytes += image_bytes(a.chunk, a.index.tolist())
