"""The versioned SQL migrations of ingest/store/migrations: applied at start
under an advisory lock, so concurrent service processes take turns."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)


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
