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
stored without a row; it is unreachable, and the sweep removes it
(ingest/store/blob_sweep.py).

Before any byte goes to S3 (`BlobGate`): the run of every image chunk must
exist in the batch's workspace and be active (else its points are rejected
RUN_NOT_FOUND / RUN_NOT_ACTIVE and its blobs are not stored), the workspace
must have room under its stored-bytes quota (else LIMIT_EXCEEDED), and the
blobs are touched (`blob_touches`), so a sweep running at the same time
keeps them. A run found active is trusted from memory for RUN_ACTIVE_TTL_S:
a run that finished takes blobs on a process that saw it active for at
most that long (the commit's own check rejects the points all the same).
The caller's token, role and workspace were checked before the handler ran
(ingest/api/auth.py), so a client that may not write stores nothing.

Files (`ArtifactStore`): the servicer checks the run (exists, active) and
the stored-bytes quota, streams the bytes to S3, then `record` maps (run,
path) to the blob in one transaction with the rule on reuse: the same
content is "unchanged", other content needs `overwrite`; the workspace's
usage moves in that transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np

from ingest.core.batch import (
    KIND_IMAGE,
    LIMIT_EXCEEDED,
    RUN_NOT_ACTIVE,
    RUN_NOT_FOUND,
    Chunk,
    DecodedBatch,
)
from ingest.core.errors import ApiError, StoreUnavailable, invalid, not_found, precondition
from ingest.core.images import ImageInfo
from ingest.core.model import RunStatus
from ingest.core.order import Accepted
from ingest.store import quotas as q
from ingest.store.blobs import BlobNotFound, BlobStore, StoredBlob
from ingest.store.db import acquire
from ingest.store.points import hide_superseded
from ingest.store.queries import Read, Window, visible_points
from ingest.store.writers import CommitResult
from ingest.write.pipeline import Pipeline
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


# A run found active is trusted from memory this long (seconds).
RUN_ACTIVE_TTL_S = 2.0
_MAX_CACHED_RUNS = 100_000


async def touch_blobs(conn: asyncpg.Connection, hashes: Iterable[str]) -> None:
    """Say "about to store or rely on these blobs" (blob_sweep.py): before
    any S3 request for them. Waits while a sweep is deleting one of them."""
    shas = sorted(set(hashes))
    if shas:
        await conn.execute(
            "INSERT INTO blob_touches (sha256, touched_at)"
            " SELECT s, clock_timestamp() FROM unnest($1::text[]) AS s ORDER BY s"
            " ON CONFLICT (sha256) DO UPDATE"
            " SET touched_at = GREATEST(blob_touches.touched_at, EXCLUDED.touched_at)",
            shas,
        )


class BlobGate:
    """What is checked before any byte goes to S3 (on the service's loop)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        quotas: q.Quotas | None = None,
        active_ttl_s: float = RUN_ACTIVE_TTL_S,
    ) -> None:
        self.pool = pool
        self.quotas = quotas
        self.active_ttl_s = active_ttl_s
        # (workspace, run_id) -> (status, when read); terminal statuses are final.
        self._runs: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    async def _statuses(
        self, conn: asyncpg.Connection, workspace: str, run_ids: Sequence[str]
    ) -> dict[str, str]:
        """Status of each run that exists in the workspace (missing: absent)."""
        now = time.monotonic()
        out: dict[str, str] = {}
        ask: list[str] = []
        for run_id in run_ids:
            cached = self._runs.get((workspace, run_id))
            if cached is not None and (
                RunStatus(cached[0]).terminal or now - cached[1] < self.active_ttl_s
            ):
                out[run_id] = cached[0]
            else:
                ask.append(run_id)
        if ask:
            rows = await conn.fetch(
                "SELECT run_id, status FROM runs WHERE workspace = $1 AND run_id = ANY($2::text[])",
                workspace,
                ask,
            )
            for r in rows:
                out[r["run_id"]] = r["status"]
                self._runs[(workspace, r["run_id"])] = (r["status"], now)
                self._runs.move_to_end((workspace, r["run_id"]))
            while len(self._runs) > _MAX_CACHED_RUNS:
                self._runs.popitem(last=False)
        return out

    async def check_images(self, batch: DecodedBatch) -> None:
        """Reject the image points that may not be stored (their run is missing
        or finished, or the workspace is over its stored-bytes quota), then
        touch the blobs of the rest. Their blobs are not stored."""
        chunks = [c for c in batch.chunks if c.kind == KIND_IMAGE and c.payload and c.alive.any()]
        if not chunks:
            return
        ws = batch.workspace
        rejected = False
        async with acquire(self.pool) as conn:
            statuses = await self._statuses(conn, ws, sorted({c.run_id for c in chunks}))
            for c in chunks:
                status = statuses.get(c.run_id)
                if status is None:
                    rejected = True
                    batch.outcome.reject(
                        c,
                        None,
                        RUN_NOT_FOUND,
                        f"run {c.run_id[:130]!r} does not exist in workspace {ws!r}",
                        steps=False,
                    )
                elif RunStatus(status).terminal:
                    rejected = True
                    batch.outcome.reject(
                        c,
                        None,
                        RUN_NOT_ACTIVE,
                        f"run {c.run_id!r} is {status}; a finished run takes no more points",
                        steps=False,
                    )
            limits = await self.quotas.limits(ws) if self.quotas is not None else None
            if limits is not None and limits.stored_bytes:
                held = await q.stored_bytes(conn, ws)
                for c in chunks:
                    n = _alive_image_bytes(c)
                    if n and held + n > limits.stored_bytes:
                        rejected = True
                        batch.outcome.reject(
                            c,
                            None,
                            LIMIT_EXCEEDED,
                            q.hard_limit_message(
                                q.STORED_BYTES,
                                ws,
                                held,
                                limits.stored_bytes,
                                f"these images ({n} bytes) are not stored",
                            ),
                            steps=False,
                        )
                        assert self.quotas is not None
                        self.quotas.exceeded(q.STORED_BYTES)
                    else:
                        held += n
            if rejected:
                batch.snapshot()  # a retried transaction starts from here, not before
            await touch_blobs(
                conn,
                (
                    c.payload[i].sha256
                    for c in chunks
                    if c.payload
                    for i in np.flatnonzero(c.alive).tolist()
                    if isinstance(c.payload[i], ImageInfo) and not c.payload[i].stored
                ),
            )

    async def check_upload(self, workspace: str, run_id: str, size: int) -> None:
        """Before a file's bytes go to S3: its run is active, and the declared
        size fits in the workspace's stored-bytes quota."""
        async with acquire(self.pool) as conn:
            status = (await self._statuses(conn, workspace, [run_id])).get(run_id)
            if status is None:
                raise not_found(
                    "run_id", f"run {run_id!r} does not exist in workspace {workspace!r}"
                )
            if RunStatus(status).terminal:
                raise precondition(
                    "run_id", f"run {run_id!r} is {status}; a finished run takes no more files"
                )
            limits = await self.quotas.limits(workspace) if self.quotas is not None else None
            if limits is not None and limits.stored_bytes:
                held = await q.stored_bytes(conn, workspace)
                if held + max(size, 0) > limits.stored_bytes or held >= limits.stored_bytes:
                    assert self.quotas is not None
                    self.quotas.exceeded(q.STORED_BYTES)
                    raise q.QuotaExceeded(
                        q.STORED_BYTES,
                        q.hard_limit_message(
                            q.STORED_BYTES,
                            workspace,
                            held,
                            limits.stored_bytes,
                            f"this file ({size} bytes) is not stored",
                        ),
                        "size",
                    )

    async def touch(self, sha256: str) -> None:
        async with acquire(self.pool) as conn:
            await touch_blobs(conn, [sha256])


def _alive_image_bytes(chunk: Chunk) -> int:
    payload = chunk.payload or []
    return sum(
        payload[i].size
        for i in np.flatnonzero(chunk.alive).tolist()
        if isinstance(payload[i], ImageInfo)
    )


class BlobFirstPipeline(Pipeline):
    """The write pipeline, with one step in front: a batch's image points
    are checked (`BlobGate`) and their blobs stored before the batch is
    queued for its transaction."""

    def __init__(
        self, blobs: BlobStore, *args: Any, gate: BlobGate | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.blobs = blobs
        self.gate = gate

    async def submit(
        self, batch: DecodedBatch, cost: int | None = None, wait: float | None = None
    ) -> asyncio.Future[CommitResult]:
        held = image_bytes(batch)
        if self.gate is not None:
            await self.gate.check_images(batch)
        await store_image_blobs(self.blobs, batch)
        # The stored images' bytes are gone from memory: the queue holds less.
        cost = (batch.nbytes if cost is None else cost) - held
        return await super().submit(batch, max(cost, 0), wait)


def image_bytes(batch: DecodedBatch) -> int:
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

    def __init__(
        self,
        pool: asyncpg.Pool,
        quota_defaults: q.Limits | None = None,
        on_quota_exceeded: Any = None,
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
    ) -> tuple[Row, bool]:
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
                return row, False
            row = await conn.fetchrow(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE workspace = $3 AND run_id = $1 AND path = $2 FOR UPDATE",
                run_id,
                path,
                workspace,
            )
            assert row is not None
            if row["sha256"] == blob.sha256:
                return row, True
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
            return updated, False

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


def register(
    points: Any,
    queries: Any,
    pool: asyncpg.Pool,
    blobs: BlobStore,
    max_read_bytes: int,
    quota_defaults: q.Limits | None = None,
    on_quota_exceeded: Any = None,
) -> ArtifactStore:
    """Wire the image kind into the write pipeline and queries."""
    images = ImageStore(pool, blobs, max_read_bytes)
    points.kind_writers[KIND_IMAGE] = images.write_images
    queries.readers[KIND_IMAGE] = images.read_images
    return ArtifactStore(pool, quota_defaults, on_quota_exceeded)
