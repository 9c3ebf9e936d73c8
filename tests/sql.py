"""Direct SQL for assertions: what is really stored."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import asyncpg
import numpy as np

from ingest.store.copy import SCALAR_COLUMNS, encode_scalar_copy


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


async def copy_series_tail_async(
    url: str, run_id: str, name: str, values: np.ndarray[Any, Any]
) -> None:
    conn = await asyncpg.connect(url)
    try:
        sid = await conn.fetchval(
            "SELECT series_id FROM series WHERE run_id = $1 AND name = $2", run_id, name
        )
        steps = np.arange(1, values.size, dtype=np.int64)
        payload = encode_scalar_copy(
            1.7e9 + steps.astype(np.float64), np.full(steps.size, sid), steps, values[1:]
        )
        await conn.copy_to_table(
            "scalar_points", source=io.BytesIO(payload), columns=SCALAR_COLUMNS, format="binary"
        )
        await conn.execute(
            "UPDATE series SET point_count = $2, last_step = $3 WHERE series_id = $1",
            sid,
            values.size,
            values.size - 1,
        )
    finally:
        await conn.close()


def copy_series_tail(url: str, run_id: str, name: str, values: np.ndarray[Any, Any]) -> None:
    """Points 1.. of a scalar series the SDK created (its step 0), written
    with the service's COPY encoder: a long series in seconds."""
    asyncio.run(copy_series_tail_async(url, run_id, name, values))
