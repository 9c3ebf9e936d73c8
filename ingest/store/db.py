"""The database connection: the pool, the one set-up every connection gets
(the pipeline's own included), the errors that mean "not there right now",
and the small pool of commands run beside live services (asyncpg)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ingest.core.errors import CONFLICT, OTHER, REFUSED, UNAVAILABLE, Fault, StoreUnavailable
from ingest.store.migrate import migrate, migrations_pending

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


_CONFLICT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.LockNotAvailableError,
)
# SQLSTATE classes of errors that a value of the batch causes, every time:
# data exceptions, integrity constraint violations, program limits.
_REFUSED_CLASSES = ("22", "23", "54")
# Classes of errors that come and go with the server: insufficient resources,
# operator intervention (shutdown, cancel), system errors, connection errors.
_TRANSIENT_CLASSES = ("08", "53", "57", "58")


def classify(exc: BaseException) -> Fault:
    """What a database error means: conflict and unavailable are transient
    (retry); refused is a value the database will never store; other is
    anything else."""
    if isinstance(exc, _CONFLICT):
        return CONFLICT
    if isinstance(exc, (*UNAVAILABLE_ERRORS, TimeoutError)):
        return UNAVAILABLE
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state[:2] in _TRANSIENT_CLASSES:
            return UNAVAILABLE
        if state[:2] in _REFUSED_CLASSES:
            return REFUSED
    return OTHER


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


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# Settings of the sessions that read points. The numeric scalars are read
# through SQL functions over a step range (scalar_points_in/page/count,
# migration 010) that the planner inlines and prunes to the blocks holding
# the range only when it plans with the parameters' values: a generic plan,
# which PostgreSQL switches a prepared statement to after five executions,
# unpacks every block of every series asked for (measured: 26 ms becoming
# 430 ms for a 20,000-point series). Planning each time costs a fraction of
# a millisecond. No JIT either: every query is index-driven and short, and
# compiling one costs more than it saves.
READ_SETTINGS = {"plan_cache_mode": "force_custom_plan", "jit": "off"}


async def connect_pool(url: str, size: int) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=size,
            init=init_connection,
            command_timeout=60,
            server_settings=READ_SETTINGS,
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
            init=init_connection,
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
