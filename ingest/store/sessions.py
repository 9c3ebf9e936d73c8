"""The write pipeline's own database connections: one per worker, made by
`CommitSessions.connect`, each committing groups of batches through the
PointStore (asyncpg). The pipeline sees them only through the Protocols of
ingest/write/ports.py."""

from __future__ import annotations

import os
from collections.abc import Sequence

import asyncpg

from ingest.core.batch import CommitResult, DecodedBatch
from ingest.core.errors import Fault
from ingest.store.db import classify, init_connection
from ingest.store.points import PointStore

# How the workers' connections show in pg_stat_activity (with the process id).
APPLICATION_NAME = "steplog-pipeline"
# A polite close waits this long for the server, then drops the connection.
CLOSE_TIMEOUT_S = 2.0


def application_name(pid: int | None = None) -> str:
    return f"{APPLICATION_NAME} pid={os.getpid() if pid is None else pid}"


class PointSession:
    """One worker's connection: group commits on it, and its end."""

    def __init__(self, conn: asyncpg.Connection, points: PointStore) -> None:
        self.conn = conn
        self.points = points

    def is_closed(self) -> bool:
        return bool(self.conn.is_closed())

    def terminate(self) -> None:
        self.conn.terminate()

    async def close(self) -> None:
        await self.conn.close(timeout=CLOSE_TIMEOUT_S)

    async def commit_group(self, batches: Sequence[DecodedBatch]) -> list[CommitResult]:
        results, _stats = await self.points.commit_group(self.conn, batches)
        return results


class CommitSessions:
    """Makes the workers' connections (ingest.write.ports.CommitStore)."""

    def __init__(
        self,
        dsn: str,
        points: PointStore,
        connect_timeout: float = 5.0,
        command_timeout: float = 60.0,
    ) -> None:
        self.dsn = dsn
        self.points = points
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout

    async def connect(self) -> PointSession:
        # A command that hangs (a frozen server) ends and counts as transient.
        conn = await asyncpg.connect(
            self.dsn,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings={"application_name": application_name()},
        )
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return PointSession(conn, self.points)

    def classify(self, exc: BaseException) -> Fault:
        return classify(exc)
