"""Compaction of numeric scalars (migration 011_scalar_compaction).

A commit stores a series' points as a block when it brings at least
MIN_BLOCK_POINTS of them (ingest/store/blocks.py), and as rows of
`scalar_rows` otherwise. This sweep moves rows and small blocks into full
blocks in the background, a bounded number of series per transaction:

- it picks series with rows, or with two small blocks (< 1024 points) that
  can merge (`scalar_compact_candidates`), in series_id order, resuming
  where the last round stopped;
- it locks those series' rows `FOR UPDATE SKIP LOCKED`: a series a writer,
  a rewind or a deletion holds is skipped (the next round takes it), and
  while the sweep holds one, they wait the few milliseconds its statement
  takes. Every writer locks its series rows before it hides or writes a
  point, so nothing is hidden, written or deleted under the sweep;
- `scalar_compact` moves exactly what it read in one statement: a row
  committed meanwhile stays a row until the next round.

Several replicas may sweep at once: SKIP LOCKED gives each series to one of
them. Readers see the same points before and after (the view scalar_points
is over rows and blocks), and a series' count and last step never change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from ingest.observe.metrics import Metrics
from ingest.store.columns import Written, decoded, made_here
from ingest.store.db import UNAVAILABLE_ERRORS, acquire
from ingest.store.periodic import Periodic

log = logging.getLogger(__name__)

# Series compacted in one transaction at most, and per series at most this
# many rows and small blocks (the rest waits for the next round): a
# transaction moves at most 8 x (16,384 + 64 x 1,023) points, in the usual
# case a few thousand, and the locks are held for its one statement.
SERIES_PER_TRANSACTION = 8
ROWS_PER_SERIES = 16384
BLOCKS_PER_SERIES = 64
# Series looked at in one round at most; the next round resumes after them.
SERIES_PER_ROUND = 4096


@dataclass
class CompactionTotals:
    """What compaction has done since the process started."""

    rounds: int = 0
    series: int = 0
    points: int = 0
    rows_in: int = 0
    blocks_in: int = 0
    blocks_out: int = 0
    skipped: int = 0  # series locked by a writer when their turn came
    failed: int = 0  # series whose transaction failed (left for the next round)


async def compact_series(
    conn: asyncpg.Connection,
    ids: list[int],
    totals: CompactionTotals,
    publish: Callable[[Written], None] | None = None,
) -> None:
    """Compact the series `ids` that no one else holds, in one transaction;
    with `publish`, the blocks it made (decoded) are handed to it once the
    transaction committed (write-through to the read cache)."""
    made: list[Any] = []
    async with conn.transaction():
        locked = [
            r["series_id"]
            for r in await conn.fetch(
                "SELECT series_id FROM series WHERE series_id = ANY($1::bigint[])"
                " ORDER BY series_id FOR UPDATE SKIP LOCKED",
                ids,
            )
        ]
        totals.skipped += len(ids) - len(locked)
        if not locked:
            return
        out = 0
        for r in await conn.fetch(
            "SELECT * FROM scalar_compact($1::bigint[], $2, $3)",
            locked,
            ROWS_PER_SERIES,
            BLOCKS_PER_SERIES,
        ):
            totals.series += 1
            totals.points += int(r["points"])
            totals.rows_in += int(r["rows_in"])
            totals.blocks_in += int(r["blocks_in"])
            out += int(r["blocks_out"])
        totals.blocks_out += out
        if out and publish is not None:
            # The blocks just made (this transaction's xid is their xmin),
            # sent once here rather than by the first read of each.
            made = await made_here(conn, locked)
    if made and publish is not None:
        try:
            publish(decoded(made))
        except Exception:  # the compaction happened; only the cache misses them
            log.exception("compacted blocks not handed to the read cache")


async def compact_round(
    pool: asyncpg.Pool,
    totals: CompactionTotals,
    after: int = 0,
    per_round: int = SERIES_PER_ROUND,
    per_transaction: int = SERIES_PER_TRANSACTION,
    publish: Callable[[Written], None] | None = None,
) -> int:
    """One round: up to `per_round` candidate series after `after`, compacted
    `per_transaction` at a time. Returns where the next round resumes (0:
    from the start, the candidates after `after` are done)."""
    async with acquire(pool) as conn:
        ids = [
            int(r["series_id"])
            for r in await conn.fetch(
                "SELECT series_id FROM scalar_compact_candidates($1, $2)", after, per_round
            )
        ]
        for i in range(0, len(ids), per_transaction):
            group = ids[i : i + per_transaction]
            try:
                await compact_series(conn, group, totals, publish)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, UNAVAILABLE_ERRORS):
                    raise  # the database is gone: the round ends here
                # Those series stay as they are (the transaction rolled
                # back); the others of the round are still compacted.
                totals.failed += len(group)
                log.warning("compaction of series %s failed: %s", group, exc)
    totals.rounds += 1
    return ids[-1] if len(ids) == per_round else 0


class Compactor(Periodic):
    """The background task: a compaction round every `interval_s` seconds
    (0: never). Rows left when the service stops are compacted by the next
    round of any process on the database."""

    name = "steplog-compaction"

    def __init__(
        self,
        pool: asyncpg.Pool,
        interval_s: float,
        metrics: Metrics,
        publish: Callable[[Written], None] | None = None,
    ) -> None:
        super().__init__(interval_s)
        self.pool = pool
        self.metrics = metrics
        # The blocks each transaction made, for the read cache (None: none).
        self.publish = publish
        self.totals = CompactionTotals()
        self._after = 0

    async def round(self) -> None:
        t = self.totals
        before = (t.points, t.rows_in, t.blocks_out, t.skipped, t.failed)
        try:
            self._after = await compact_round(self.pool, t, self._after, publish=self.publish)
            self.metrics.compaction_rounds.labels("done").inc()
        finally:  # what the round did before it failed counts too
            rows = t.rows_in - before[1]
            self.metrics.compaction_points.labels("row").inc(rows)
            self.metrics.compaction_points.labels("block").inc(t.points - before[0] - rows)
            self.metrics.compaction_blocks.inc(t.blocks_out - before[2])
            self.metrics.compaction_skipped.inc(t.skipped - before[3])
            self.metrics.compaction_failed.inc(t.failed - before[4])

    def failed(self, exc: Exception) -> None:
        self.metrics.compaction_rounds.labels("failed").inc()
        log.warning("compaction round failed: %s", exc)
