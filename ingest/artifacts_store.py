"""The database side of images and files, and the step that stores image
blobs before their batch is queued (asyncpg; S3 only through BlobStore).

Order of writes. An image row may only ever point to a stored blob, and an
image batch is acknowledged only after both. The blobs of a batch are stored
by `BlobFirstPipeline.submit`, in the stream's handler, before the batch
enters the write pipeline, and so before the transaction that writes its
rows; that transaction stays short (S3 latency never holds series locks),
and the uploads of one stream overlap the commits of its earlier batches.
When S3 fails, submit raises StoreUnavailable: the stream ends with
UNAVAILABLE, nothing of the batch was written, and the client resends it.
Content addressing makes the resend harmless. The price: a blob whose points
are then rejected by the step rules (or whose batch was a duplicate) stays
stored without a row; it is unreachable, and a collector of unreferenced
blobs could remove it.

Files (`ArtifactStore`): the servicer streams the bytes to S3 first, then
`record` maps (run, path) to the blob in one transaction with the rule on
reuse: the same content is "unchanged", other content needs `overwrite`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np

from ingest.batch import KIND_IMAGE, DecodedBatch
from ingest.blobs import BlobNotFound, BlobStore, StoredBlob
from ingest.errors import ApiError, StoreUnavailable, invalid, not_found
from ingest.images import ImageInfo
from ingest.order import Accepted
from ingest.pipeline import Pipeline
from ingest.timescale import (
    CommitResult,
    Read,
    Window,
    acquire,
    hide_superseded,
    visible_points,
)
from steplog.v1 import data_pb2

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


async def store_image_blobs(blobs: BlobStore, batch: DecodedBatch) -> int:
    """Store the blob of every alive image point of the batch, concurrently;
    then drop the bytes from memory (the batch may wait in the queue).
    Raises StoreUnavailable when any blob could not be stored."""
    todo: dict[str, ImageInfo] = {}
    infos: list[ImageInfo] = []
    for chunk in batch.chunks:
        if chunk.kind != KIND_IMAGE or not chunk.payload:
            continue
        for i in np.flatnonzero(chunk.alive).tolist():
            info = chunk.payload[i]
            if isinstance(info, ImageInfo) and not info.stored:
                infos.append(info)
                todo.setdefault(info.sha256, info)
    if not todo:
        return 0
    results = await asyncio.gather(
        *(blobs.put(sha, info.data, info.content_type) for sha, info in todo.items()),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            if isinstance(result, (StoreUnavailable, asyncio.CancelledError)):
                raise result
            raise StoreUnavailable(f"could not store an image: {result}") from result
    for info in infos:
        info.stored = True
        info.data = b""
    return len(todo)


class BlobFirstPipeline(Pipeline):
    """The write pipeline, with one step in front: a batch's image blobs are
    stored before the batch is queued for its transaction."""

    def __init__(self, blobs: BlobStore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blobs = blobs

    async def submit(
        self, batch: DecodedBatch, cost: int | None = None, wait: float | None = None
    ) -> asyncio.Future[CommitResult]:
        held = _image_bytes(batch)
        await store_image_blobs(self.blobs, batch)
        # The stored images' bytes are gone from memory: the queue holds less.
        cost = (batch.nbytes if cost is None else cost) - held
        return await super().submit(batch, max(cost, 0), wait)


def _image_bytes(batch: DecodedBatch) -> int:
    return sum(
        len(info.data)
        for chunk in batch.chunks
        if chunk.kind == KIND_IMAGE and chunk.payload
        for info in chunk.payload
        if isinstance(info, ImageInfo)
    )


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

    async def read_images(self, series: Sequence[Row], window: Window) -> Read:
        """Visible image points of a window in step order; with include_bytes,
        their bytes from S3, counted in the window's byte budget."""
        ids = [s["series_id"] for s in series]
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
        out: dict[int, data_pb2.SeriesData] = {}
        for s in series:
            rows = got.rows.get(s["series_id"], [])
            points = data_pb2.ImagePoints(
                steps=[r["step"] for r in rows],
                times=[r["t"] for r in rows],
                images=[
                    data_pb2.Image(
                        data=data.get(r["sha256"], b""),
                        content_type=r["content_type"],
                        width=r["width"],
                        height=r["height"],
                        sha256=r["sha256"],
                        size=r["size"],
                    )
                    for r in rows
                ],
            )
            out[s["series_id"]] = data_pb2.SeriesData(
                name=s["name"], labels=s["labels"], description=s["description"], images=points
            )
        return Read(out, got)

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


class ArtifactStore:
    """The files of runs: (run, path) -> blob."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

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
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE run_id = $1 AND path = $2",
                run_id,
                path,
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
    ) -> tuple[Row, bool]:
        """Point path at a stored blob. Returns the row and whether it was
        unchanged (that content was there already); ALREADY_EXISTS when
        other content is there and overwrite is not set."""
        async with self._conn(transaction=True) as conn:
            await self._check_run(conn, workspace, run_id)
            row = await conn.fetchrow(
                "INSERT INTO artifacts (run_id, path, sha256, size, content_type)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (run_id, path) DO NOTHING"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                run_id,
                path,
                blob.sha256,
                blob.size,
                content_type,
            )
            if row is not None:
                return row, False
            row = await conn.fetchrow(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE run_id = $1 AND path = $2 FOR UPDATE",
                run_id,
                path,
            )
            assert row is not None
            if row["sha256"] == blob.sha256:
                return row, True
            if not overwrite:
                raise conflict(path, row["sha256"])
            updated = await conn.fetchrow(
                "UPDATE artifacts SET sha256 = $3, size = $4, content_type = $5, updated_at = now()"
                f" WHERE run_id = $1 AND path = $2 RETURNING {_ARTIFACT_COLUMNS}",
                run_id,
                path,
                blob.sha256,
                blob.size,
                content_type,
            )
            assert updated is not None
            return updated, False

    async def list(self, workspace: str, run_id: str, prefix: str) -> list[Row]:
        async with self._conn() as conn:
            await self._check_run(conn, workspace, run_id)
            return list(
                await conn.fetch(
                    f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE run_id = $1"
                    " AND starts_with(path, $2) ORDER BY path",
                    run_id,
                    prefix,
                )
            )


def conflict(path: str, sha256: str) -> ApiError:
    return ApiError(
        "ALREADY_EXISTS",
        f"{path!r} already holds other content (sha256 {sha256}); upload with overwrite "
        "to replace it",
        "path",
    )


def register(
    points: Any, queries: Any, pool: asyncpg.Pool, blobs: BlobStore, max_read_bytes: int
) -> ArtifactStore:
    """Wire the image kind into the write pipeline and queries."""
    images = ImageStore(pool, blobs, max_read_bytes)
    points.kind_writers[KIND_IMAGE] = images.write_images
    queries.readers[KIND_IMAGE] = images.read_images
    return ArtifactStore(pool)
