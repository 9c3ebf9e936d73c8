"""The step that stores image blobs before their batch is queued: the
write pipeline's Admission (ingest/write/ports.py), asyncpg for the checks,
S3 only through BlobStore.

Order of writes. An image row may only ever point to a stored blob, and an
image batch is acknowledged only after both. The blobs of a batch are stored
by `BlobFirst.admit`, in the stream's handler, before the batch
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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import asyncpg
import numpy as np

from ingest.core.batch import (
    KIND_IMAGE,
    LIMIT_EXCEEDED,
    Chunk,
    DecodedBatch,
)
from ingest.core.errors import StoreUnavailable, not_found, precondition
from ingest.core.images import ImageInfo
from ingest.core.model import RunStatus
from ingest.core.order import reject_unwritable_run
from ingest.store import quotas as q
from ingest.store.blobs import BlobStore
from ingest.store.db import acquire

log = logging.getLogger(__name__)


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
                if reject_unwritable_run(batch.outcome, c, ws, statuses.get(c.run_id)):
                    rejected = True
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


class BlobFirst:
    """The step in front of the write pipeline's queue (its `Admission`): a
    batch's image points are checked (`BlobGate`) and their blobs stored
    before the batch is queued for its transaction."""

    def __init__(self, blobs: BlobStore, gate: BlobGate | None = None) -> None:
        self.blobs = blobs
        self.gate = gate

    async def admit(self, batch: DecodedBatch) -> int:
        """Returns the bytes of the stored images, gone from memory now."""
        held = image_bytes(batch)
        if self.gate is not None:
            await self.gate.check_images(batch)
        await store_image_blobs(self.blobs, batch)
        return held


def image_bytes(batch: DecodedBatch) -> int:
    return sum(
        len(info.data)
        for chunk in batch.chunks
        if chunk.kind == KIND_IMAGE and chunk.payload
        for info in chunk.payload
        if isinstance(info, ImageInfo)
    )
