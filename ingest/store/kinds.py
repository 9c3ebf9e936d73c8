"""What a kind of point other than scalars plugs into the group commit
(ingest/store/points.py): a writer of its accepted points and, for kinds
whose points are checked against stored series state beyond steps (a table
column's type), a check. The implementations (tables.py, histograms.py,
artifacts.py) are wired in by the composition root, ingest/server.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from ingest.core.batch import Chunk, Outcome
from ingest.core.order import Accepted, SeriesState


class KindWriter(Protocol):
    async def __call__(self, conn: asyncpg.Connection, accepted: list[Accepted]) -> int:
        """Append the accepted points of one kind in the group's transaction
        (series rows are locked); returns the rows written."""
        ...


@dataclass(frozen=True, slots=True)
class CheckItem:
    """A chunk of a kind with a check, its series' locked state, and the
    outcome of its batch (where rejections go)."""

    chunk: Chunk
    state: SeriesState
    outcome: Outcome


class KindCheck(Protocol):
    async def __call__(self, conn: asyncpg.Connection, items: Sequence[CheckItem]) -> None:
        """Run after the series are locked and before order.apply, so what it
        rejects is reported and never counted as accepted."""
        ...


async def hide_superseded(conn: asyncpg.Connection, table: str, accepted: Accepted) -> None:
    """Out-of-order series: the last write per step wins, so earlier points at
    the steps being written are hidden (kept for audit)."""
    if accepted.supersede is not None and accepted.supersede.size:
        if table == "scalar_points":
            # Rows and blocks (migration 010): scalar_hide updates both.
            await conn.execute(
                "SELECT scalar_hide($1, $2::bigint[], NULL)",
                accepted.series_id,
                accepted.supersede.tolist(),
            )
            return
        await conn.execute(
            f"UPDATE {table} SET hidden = true WHERE series_id = $1"
            " AND step = ANY($2::bigint[]) AND NOT hidden",
            accepted.series_id,
            accepted.supersede.tolist(),
        )
