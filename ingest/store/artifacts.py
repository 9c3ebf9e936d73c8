"""The database side of images and files (asyncpg): the image kind's writer
and reader, and the files of runs. The image blobs are stored before their
batch is queued (ingest/store/image_blobs.py).

Files (`ArtifactStore`): the servicer checks the run (exists, active) and
the stored-bytes quota, streams the bytes to S3, then `record` maps (run,
path) to the blob in one transaction with the rule on reuse: the same
content is "unchanged", other content needs `overwrite`; the workspace's
usage moves in that transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg

from ingest.core.errors import ApiError, invalid, not_found
from ingest.core.images import ImageInfo
from ingest.core.order import Accepted
from ingest.store import quotas as q
from ingest.store.blobs import BlobNotFound, BlobStore, StoredBlob
from ingest.store.db import acquire
from ingest.store.kinds import hide_superseded
from ingest.store.queries import Read, SeriesHead, Window, visible_points

log = logging.getLogger(__name__)

Row = Mapping[str, Any]

IMAGE_COLUMNS = [
    "time",
    "series_id",
    "step",
    "sha256",
    "size",
    "content_type",
    "width",
    "height",
    "hidden",
]
_ARTIFACT_COLUMNS = "run_id, path, sha256, size, content_type, created_at, updated_at"


class ImageStore:
    """The image kind's writer (inside the pipeline's transaction) and reader."""

    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore, max_read_bytes: int) -> None:
        self.pool = pool
        self.blobs = blobs
        self.max_read_bytes = max_read_bytes

    async def write_images(self, conn: asyncpg.Connection, accepted: list[Accepted]) -> int:
        """Append the accepted image points (their blobs are stored already)."""
        records: list[tuple[Any, ...]] = []
        for a in accepted:
            await hide_superseded(conn, "image_points", a)
            payload = a.chunk.payload or []
            for i in a.index.tolist():
                info = payload[i]
                if not isinstance(info, ImageInfo) or not info.stored:
                    # The invariant this module exists for; a bug if it breaks.
                    raise RuntimeError(f"image point of {a.chunk.name!r} reached commit unstored")
                records.append(
                    (
                        datetime.fromtimestamp(float(a.chunk.times[i]), UTC),
                        a.series_id,
                        int(a.chunk.steps[i]),
                        info.sha256,
                        info.size,
                        info.content_type,
                        info.width,
                        info.height,
                        False,
                    )
                )
        if records:
            await conn.copy_records_to_table("image_points", records=records, columns=IMAGE_COLUMNS)
        return len(records)

    async def read_images(self, series: Sequence[SeriesHead], window: Window) -> Read:
        """Visible image points of a window in step order; with include_bytes,
        their bytes from S3, counted in the window's byte budget."""
        ids = [s.series_id for s in series]
        # Encoded: hash, content type, sizes and framing; then the bytes.
        cost = "octet_length(content_type) + 130" + (" + size + 8" if window.include_bytes else "")
        columns = [(c, c) for c in ("sha256", "size", "content_type", "width", "height")]
        async with acquire(self.pool) as conn:
            got = await visible_points(conn, "image_points", columns, ids, window, cost)
        data: dict[str, bytes] = {}
        if window.include_bytes and got.rows:
            data = await self._fetch(
                {r["sha256"]: r["size"] for rows in got.rows.values() for r in rows}
            )
        return Read(got, blobs=data)

    async def _fetch(self, sizes: Mapping[str, int]) -> dict[str, bytes]:
        total = sum(sizes.values())
        if total > self.max_read_bytes:
            raise invalid(
                "include_bytes",
                f"the images in this range hold {total} bytes, more than one response carries "
                f"({self.max_read_bytes}); narrow the step range",
            )
        hashes = list(sizes)
        try:
            blobs = await asyncio.gather(*(self.blobs.get(h) for h in hashes))
        except BlobNotFound:
            raise ApiError(
                "DATA_LOSS", "an image's bytes are missing from the object store"
            ) from None
        return dict(zip(hashes, blobs, strict=True))


class Recorded(NamedTuple):
    """A file's row after `record`, and whether that content was there already."""

    row: Row
    unchanged: bool


class ArtifactStore:
    """The files of runs: (run, path) -> blob."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        quota_defaults: q.Limits | None = None,
        on_quota_exceeded: Callable[[str], None] | None = None,
    ) -> None:
        self.pool = pool
        self.quota_defaults = quota_defaults or q.Limits()
        self.on_quota_exceeded = on_quota_exceeded

    async def _charge(
        self, conn: asyncpg.Connection, workspace: str, delta: int, what: str
    ) -> None:
        """Move the workspace's stored bytes by delta (in this transaction);
        QuotaExceeded when that passes its stored-bytes quota."""
        usage = (await q.lock_usage(conn, [workspace], self.quota_defaults))[workspace]
        limit = usage.limits.stored_bytes
        if delta > 0 and limit and usage.stored_bytes + delta > limit:
            if self.on_quota_exceeded is not None:
                self.on_quota_exceeded(q.STORED_BYTES)
            raise q.QuotaExceeded(
                q.STORED_BYTES,
                q.hard_limit_message(q.STORED_BYTES, workspace, usage.stored_bytes, limit, what),
                "size",
            )
        usage.stored_bytes += delta
        await q.add_usage(conn, [usage])

    def _conn(self, transaction: bool = False) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return acquire(self.pool, transaction)

    @staticmethod
    async def _check_run(conn: asyncpg.Connection, workspace: str, run_id: str) -> None:
        found = await conn.fetchval(
            "SELECT 1 FROM runs WHERE run_id = $1 AND workspace = $2", run_id, workspace
        )
        if found is None:
            raise not_found("run_id", f"run {run_id!r} does not exist in workspace {workspace!r}")

    async def get(self, workspace: str, run_id: str, path: str) -> Row | None:
        """The file at path (None if there is none); NOT_FOUND for a missing run."""
        async with self._conn() as conn:
            await self._check_run(conn, workspace, run_id)
            row: Row | None = await conn.fetchrow(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE workspace = $3 AND run_id = $1 AND path = $2",
                run_id,
                path,
                workspace,
            )
            return row

    async def record(
        self,
        workspace: str,
        run_id: str,
        path: str,
        blob: StoredBlob,
        content_type: str,
        overwrite: bool,
    ) -> Recorded:
        """Point path at a stored blob. Returns the row and whether it was
        unchanged (that content was there already); ALREADY_EXISTS when
        other content is there and overwrite is not set."""
        async with self._conn(transaction=True) as conn:
            await self._check_run(conn, workspace, run_id)
            row = await conn.fetchrow(
                "INSERT INTO artifacts (run_id, path, sha256, size, content_type, workspace)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (workspace, run_id, path) DO NOTHING"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                run_id,
                path,
                blob.sha256,
                blob.size,
                content_type,
                workspace,
            )
            if row is not None:
                await self._charge(
                    conn, workspace, blob.size, f"this file ({blob.size} bytes) is not recorded"
                )
                return Recorded(row, False)
            row = await conn.fetchrow(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE workspace = $3 AND run_id = $1 AND path = $2 FOR UPDATE",
                run_id,
                path,
                workspace,
            )
            assert row is not None
            if row["sha256"] == blob.sha256:
                return Recorded(row, True)
            if not overwrite:
                raise conflict(path, row["sha256"])
            updated = await conn.fetchrow(
                "UPDATE artifacts SET sha256 = $3, size = $4, content_type = $5, updated_at = now()"
                " WHERE workspace = $6 AND run_id = $1 AND path = $2"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                run_id,
                path,
                blob.sha256,
                blob.size,
                content_type,
                workspace,
            )
            assert updated is not None
            await self._charge(
                conn,
                workspace,
                blob.size - row["size"],
                f"this file ({blob.size} bytes) does not replace the old one",
            )
            return Recorded(updated, False)

    async def list(self, workspace: str, run_id: str, prefix: str) -> list[Row]:
        async with self._conn() as conn:
            await self._check_run(conn, workspace, run_id)
            return list(
                await conn.fetch(
                    f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE workspace = $3"
                    " AND run_id = $1 AND starts_with(path, $2) ORDER BY path",
                    run_id,
                    prefix,
                    workspace,
                )
            )


def conflict(path: str, sha256: str) -> ApiError:
    return ApiError(
        "ALREADY_EXISTS",
        f"{path!r} already holds other content (sha256 {sha256}); upload with overwrite "
        "to replace it",
        "path",
    )
