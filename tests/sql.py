"""Direct SQL for assertions: what is really stored."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(url, query, *args))


def fetchval(url: str, query: str, *args: Any) -> Any:
    rows = fetch(url, query, *args)
    return rows[0][0] if rows else None


def stored_points(url: str, run_id: str) -> list[tuple[str, int, float]]:
    """(series name, step, value) of every visible point of a run, in order."""
    rows = fetch(
        url,
        "SELECT s.name, p.step, p.value FROM scalar_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 AND NOT p.hidden ORDER BY s.name, p.step",
        run_id,
    )
    return [(r["name"], r["step"], r["value"]) for r in rows]
