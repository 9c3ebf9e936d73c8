"""The sweep of unreferenced blobs: deletes from S3 the blobs no row points to.

Blobs are stored before the rows that point to them (image_blobs.py),
so some stay without a row: images whose points were rejected by the step
rules or came in a duplicate batch, a file whose row was refused (another
file at the path, a run that finished, a quota). Content addressing makes a
blob shared: the next upload of the same bytes may rely on the object being
there (a PUT answered "already exists", or this process's memory of having
stored it) and commit a row pointing to it. The sweep must never delete a
blob such an upload is about to point to.

The protocol (the `blob_touches` table, one row per blob):

- Writer. Before any S3 request about a blob (storing it, or finding it is
  there), an image batch or file upload upserts the blob's row with
  `touched_at = clock_timestamp()` (`image_blobs.touch_blobs`), in a
  statement of its own that commits before the S3 request. Its row pointing
  to the blob commits later, within the grace period (the grace is longer
  than any batch or upload takes).
- Sweep. For a blob listed in the bucket, older than the grace and with no
  referencing row (image_points, artifacts) and no touch within the grace,
  it locks the blob's touch row (inserting one if there is none), reads it
  again under the lock, checks again that no row references the blob,
  deletes the object from S3 while it holds the lock, then deletes the touch
  row and commits.

Why it is safe. A writer's touch either commits before the sweep takes the
lock — then the sweep reads a touch within the grace and keeps the blob — or
it waits on the lock (the row's, or the unique index's for a row the sweep
inserted) until the sweep has deleted the object and committed; the writer's
S3 request comes after its touch, so it finds the object gone and stores it
again. A row that committed before the sweep's check is seen by the check;
one that commits after it belongs to a writer whose touch is within the
grace (it touched, then committed within the grace), which the check saw.
The one shortcut is the blob store's memory of blobs it stored
(`BlobStore._known`): an entry is trusted for `known_ttl_s` (at most a
quarter of the grace) from the start of the call that stored the blob, which
came after that call's touch. The sweep deletes a blob only when its latest
touch is older than the grace, so any memory of it is older than the grace
too, and expired.

Bounds and settings: the grace (`--blob-sweep-grace-s`, default one day)
must be longer than the longest batch or upload, from its first byte to its
commit; the same value must be given to every process that sweeps
(`steplog-ingest sweep-blobs` reads the same settings). A bucket belongs to
one steplog database: a sweep cannot see rows of another database.

Only one process sweeps at a time (a PostgreSQL advisory lock, held by the
sweeping connection). The service sweeps every `--blob-sweep-interval-s`
(0, the default: never); `steplog-ingest sweep-blobs [--dry-run]` sweeps
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest.core.errors import StoreUnavailable
from ingest.observe.metrics import Metrics
from ingest.store.blobs import BlobNotFound, BlobStore, ListedBlob
from ingest.store.db import acquire
from ingest.store.periodic import Periodic

log = logging.getLogger(__name__)

# pg_try_advisory_lock key of the sweep (migrations use 7324118).
SWEEP_LOCK = 7324120
# Blobs checked and deleted under one transaction at most.
_GROUP = 500
# S3 deletes in flight at once.
_DELETES_IN_FLIGHT = 16


@dataclass
class SweepResult:
    listed: int = 0
    referenced: int = 0
    recent: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    failed: int = 0


async def _referenced(conn: asyncpg.Connection, shas: Sequence[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT sha256 FROM image_points WHERE sha256 = ANY($1::text[])"
        " UNION SELECT sha256 FROM artifacts WHERE sha256 = ANY($1::text[])",
        list(shas),
    )
    return {r["sha256"] for r in rows}


async def _touched(conn: asyncpg.Connection, shas: Sequence[str], grace_s: float) -> set[str]:
    rows = await conn.fetch(
        "SELECT sha256 FROM blob_touches WHERE sha256 = ANY($1::text[])"
        " AND touched_at >= now() - make_interval(secs => $2)",
        list(shas),
        grace_s,
    )
    return {r["sha256"] for r in rows}


async def _delete_group(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    group: Sequence[ListedBlob],
    grace_s: float,
    result: SweepResult,
) -> list[ListedBlob]:
    """Lock, check again, delete: what was deleted."""
    shas = sorted({b.sha256 for b in group})
    sizes = {b.sha256: b.size for b in group}
    deleted: list[ListedBlob] = []
    async with acquire(pool, transaction=True) as conn:
        await conn.execute(
            "INSERT INTO blob_touches (sha256, touched_at)"
            " SELECT s, '-infinity' FROM unnest($1::text[]) AS s ORDER BY s"
            " ON CONFLICT (sha256) DO NOTHING",
            shas,
        )
        rows = await conn.fetch(
            "SELECT sha256, touched_at < now() - make_interval(secs => $2) AS stale"
            " FROM blob_touches WHERE sha256 = ANY($1::text[]) ORDER BY sha256 FOR UPDATE",
            shas,
            grace_s,
        )
        stale = [r["sha256"] for r in rows if r["stale"]]
        result.recent += len(shas) - len(stale)
        refs = await _referenced(conn, stale) if stale else set()
        result.referenced += len(refs)
        dead = [s for s in stale if s not in refs]
        room = asyncio.Semaphore(_DELETES_IN_FLIGHT)

        async def delete(sha: str) -> bool:
            async with room:
                try:
                    await blobs.delete_blob(sha)
                except BlobNotFound:
                    pass
                except StoreUnavailable as exc:
                    log.warning("blob sweep: could not delete %s: %s", sha, exc)
                    return False
                return True

        done = await asyncio.gather(*(delete(s) for s in dead))
        for sha, ok in zip(dead, done, strict=True):
            if ok:
                deleted.append(ListedBlob(sha, sizes.get(sha, 0), datetime.now(UTC)))
            else:
                result.failed += 1
        # Touch rows older than the grace mean nothing: drop those locked here.
        if stale:
            await conn.execute(
                "DELETE FROM blob_touches WHERE sha256 = ANY($1::text[])", list(stale)
            )
    return deleted


async def sweep_once(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    grace_s: float,
    *,
    dry_run: bool = False,
    metrics: Metrics | None = None,
) -> SweepResult | None:
    """One sweep of the whole bucket; None when another process is sweeping.
    With dry_run nothing is deleted: `deleted` counts what would be."""
    result = SweepResult()
    async with acquire(pool) as leader:
        if not await leader.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK):
            return None
        try:
            token = ""
            while True:
                page, token = await blobs.list_blobs(token)
                result.listed += len(page)
                cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
                old = [b for b in page if b.last_modified < cutoff]
                result.recent += len(page) - len(old)
                for i in range(0, len(old), _GROUP):
                    await _sweep_group(
                        pool, blobs, old[i : i + _GROUP], grace_s, dry_run, result, metrics
                    )
                if not token:
                    break
            if not dry_run:
                async with acquire(pool) as conn:
                    await conn.execute(
                        "DELETE FROM blob_touches"
                        " WHERE touched_at < now() - make_interval(secs => $1)",
                        grace_s,
                    )
        finally:
            with contextlib.suppress(Exception):
                await leader.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK)
    return result


async def _sweep_group(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    group: Sequence[ListedBlob],
    grace_s: float,
    dry_run: bool,
    result: SweepResult,
    metrics: Metrics | None,
) -> None:
    shas = [b.sha256 for b in group]
    # A first look without locks: most old blobs are referenced.
    async with acquire(pool) as conn:
        refs = await _referenced(conn, shas)
        touched = await _touched(conn, [s for s in shas if s not in refs], grace_s)
    result.referenced += len(refs)
    result.recent += len(touched)
    rest = [b for b in group if b.sha256 not in refs and b.sha256 not in touched]
    if not rest:
        return
    if dry_run:
        result.deleted += len(rest)
        result.deleted_bytes += sum(b.size for b in rest)
        return
    deleted = await _delete_group(pool, blobs, rest, grace_s, result)
    result.deleted += len(deleted)
    result.deleted_bytes += sum(b.size for b in deleted)
    if metrics is not None:
        metrics.blob_sweep_deleted.inc(len(deleted))
        metrics.blob_sweep_deleted_bytes.inc(sum(b.size for b in deleted))
    for b in deleted:
        log.debug("blob sweep: deleted %s (%d bytes)", b.sha256, b.size)


class BlobSweeper(Periodic):
    """The service's periodic sweep (every `interval_s`; one replica at a time)."""

    name = "steplog-blob-sweep"

    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        metrics: Metrics,
        interval_s: float,
        grace_s: float,
    ) -> None:
        super().__init__(interval_s)
        self.pool = pool
        self.blobs = blobs
        self.metrics = metrics
        self.grace_s = grace_s

    async def round(self) -> None:
        started = time.monotonic()
        result = await sweep_once(self.pool, self.blobs, self.grace_s, metrics=self.metrics)
        if result is None:
            self.metrics.blob_sweeps.labels("skipped").inc()
            return
        self.metrics.blob_sweeps.labels("done").inc()
        if result.deleted or result.failed:
            log.info(
                "blob sweep: %d blobs listed, %d deleted (%d bytes), %d failed, in %.1f s",
                result.listed,
                result.deleted,
                result.deleted_bytes,
                result.failed,
                time.monotonic() - started,
            )

    def failed(self, exc: Exception) -> None:
        self.metrics.blob_sweeps.labels("failed").inc()
        log.warning("blob sweep failed (next in %.0f s): %s", self.interval_s, exc)


# -- `steplog-ingest sweep-blobs [--dry-run]` ----------------------------------------------


def add_cli(sub: Any) -> None:
    from ingest import config as config_mod

    sweep = sub.add_parser(
        "sweep-blobs",
        help="delete blobs no row references (once; the service does it every"
        " --blob-sweep-interval-s)",
        description="Delete from S3 the blobs that no image point or file references and"
        " that no upload touched within --blob-sweep-grace-s (give it the service's value)."
        " Reads the same settings as `serve`. Exits 1 when another process is sweeping.",
    )
    config_mod.add_arguments(sweep)
    sweep.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )


def run_cli(ns: Any) -> int:
    import sys

    from ingest import config as config_mod
    from ingest.store import db, migrate
    from ingest.store.blobs import BlobSettings

    try:
        cfg = config_mod.from_sources(ns)
    except config_mod.ConfigError as exc:
        print(f"steplog-ingest sweep-blobs: configuration error: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        metrics = Metrics(process=False)
        pool = await db.connect_pool(cfg.database_url, 3)
        blobs = BlobStore(BlobSettings.from_config(cfg), metrics)
        try:
            await migrate.migrate(pool)
            await blobs.start()
            result = await sweep_once(
                pool, blobs, cfg.blob_sweep_grace_s, dry_run=ns.dry_run, metrics=metrics
            )
        finally:
            await blobs.close()
            await pool.close()
        if result is None:
            print("steplog-ingest sweep-blobs: another process is sweeping", file=sys.stderr)
            return 1
        verb = "would delete" if ns.dry_run else "deleted"
        print(
            f"{result.listed} blobs listed; {verb} {result.deleted}"
            f" ({result.deleted_bytes} bytes); kept {result.referenced} referenced and"
            f" {result.recent} recent" + (f"; {result.failed} failed" if result.failed else "")
        )
        return 0 if not result.failed else 1

    try:
        return asyncio.run(run())
    except (StoreUnavailable, OSError) as exc:
        print(f"steplog-ingest sweep-blobs: {config_mod.scrub(str(exc), cfg)}", file=sys.stderr)
        return 1
