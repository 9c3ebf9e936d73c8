"""Blobs in S3-compatible object storage: the only module that talks to S3.

Over 500 lines: one client class whose single-put, multipart, read, list and
delete paths share one session, one retry rule and one error mapping.

Keys are content addresses, `blobs/sha256/<2 hex>/<62 hex>` of the lower-case
hex SHA-256, so storing the same bytes twice (a retried batch, a resent file,
one image logged by many runs) is harmless and costs one object. Nothing
client-controlled ever reaches a key: names and paths live in the database.

- Small blobs (images) are one PutObject with x-amz-checksum-sha256, so the
  store itself refuses bytes that do not match the address, and with
  If-None-Match: * where the store supports it, so an existing object is not
  rewritten (a new version on a versioned bucket). A bounded set of recently
  stored hashes skips even that request for resends; an entry is trusted for
  `known_ttl_s` from the start of the call that stored it, less than the
  blob sweep's grace period, so a blob the sweep deleted is stored again
  (ingest/store/blob_sweep.py says why that suffices).
- Streams (files) are hashed as they arrive and become one PutObject when
  they fit in a part, else a multipart upload with a few parts in flight.
  The upload is completed only after the stream's SHA-256 matched the
  declared one; on any failure, cancellation included, it is aborted, so a
  half-uploaded file is never visible under any key. Without a declared hash
  the key is unknown until the end: the parts go to a staging key
  (`uploads/<uuid>`), which is copied to the content address and deleted.
- Failures: a missing object is BlobNotFound; everything else (connection
  refused, timeouts, 5xx, a refused request) is StoreUnavailable, which the
  servicers answer with UNAVAILABLE so clients retry. botocore retries each
  call a few times first (standard mode). Every call goes through
  `Metrics.s3_call` (latency and errors by operation).

Incomplete multipart uploads left by a killed process are aborted by `sweep`
(at start, those older than a day) and are invisible meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from ingest.config import Config
from ingest.core.errors import ApiError, StoreUnavailable, invalid
from ingest.observe.metrics import Metrics

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Parts in flight per multipart upload, and for the whole store: each holds a
# part's bytes in memory, so these bound the memory of all file uploads.
_PARTS_IN_FLIGHT = 4
_PARTS_IN_FLIGHT_TOTAL = 32
# Recently stored hashes remembered, so a resent batch costs no S3 request.
_KNOWN_HASHES = 100_000
# Hash chunks at least this big in a worker thread (hashlib releases the GIL),
# so the event loop keeps serving gRPC and S3 meanwhile.
_THREAD_HASH_BYTES = 256 * 1024
STALE_UPLOAD_AGE = timedelta(days=1)


def blob_key(sha256: str) -> str:
    """The object key of a blob: blobs/sha256/ab/cdef... (sha256 checked)."""
    if not _SHA256.match(sha256):
        raise ValueError(f"not a lower-case hex SHA-256: {sha256[:80]!r}")
    return f"blobs/sha256/{sha256[:2]}/{sha256[2:]}"


def part_size(part_bytes: int, size_hint: int, part_number: int = 1) -> int:
    """Bytes of part `part_number`: `part_bytes`, or more so a file of
    `size_hint` bytes fits in 10,000 parts. When the size is unknown (0),
    parts double every 1,000, so even a huge stream never runs out of parts."""
    size = max(MIN_PART_BYTES, part_bytes)
    if size_hint > 0:
        return max(size, math.ceil(size_hint / (MAX_PARTS - 100)))
    return size << min(10, (part_number - 1) // 1000)


class BlobNotFound(Exception):
    """No object under the blob's key."""


@dataclass(frozen=True)
class BlobSettings:
    endpoint: str
    bucket: str
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"
    part_bytes: int = 16 * 1024 * 1024
    # S3 requests in flight for the whole service (also the connection pool size).
    concurrency: int = 64
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    max_attempts: int = 3
    # How long a blob this process stored is taken as still there without asking.
    known_ttl_s: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> BlobSettings:
        return cls(
            endpoint=config.s3_endpoint,
            bucket=config.s3_bucket,
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
            region=config.s3_region,
            part_bytes=config.s3_part_bytes,
            concurrency=config.s3_concurrency,
            known_ttl_s=min(60.0, config.blob_sweep_grace_s / 4),
        )


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


@dataclass(frozen=True)
class ListedBlob:
    sha256: str
    size: int
    last_modified: datetime


def _is_code(exc: BaseException, *codes: str) -> bool:
    """Whether a botocore ClientError carries one of these S3 error codes or
    HTTP statuses (stores differ in which of the two they fill in)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code", ""))
    if code == "NoSuchBucket":
        return "NoSuchBucket" in codes
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    return code in codes or status in codes


class BlobStore:
    """An S3 bucket of content-addressed blobs, through one aiobotocore client."""

    def __init__(self, settings: BlobSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._part_slots = asyncio.Semaphore(_PARTS_IN_FLIGHT_TOTAL)
        # sha256 -> time.monotonic() at the start of the call that stored it.
        self._known: dict[str, float] = {}
        self._if_none_match = True
        self._sweeper: asyncio.Task[None] | None = None
        # Multipart uploads whose abort failed (S3 was down): retried until done.
        self._to_abort: dict[tuple[str, str], None] = {}
        self._aborter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the client; check the bucket (a warning, not a failure: the
        store may come up later, and until then image batches get UNAVAILABLE)."""
        s = self.settings
        config = AioConfig(
            max_pool_connections=s.concurrency,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"max_attempts": s.max_attempts, "mode": "standard"},
            # Integrity is ours: images carry x-amz-checksum-sha256, streams are
            # verified against their SHA-256 before an upload completes. So no
            # CRC32 trailers (which several S3-compatible stores reject) and no
            # second SHA-256 pass for SigV4 over plain HTTP.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path", "payload_signing_enabled": False},
        )
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=s.endpoint or None,
                region_name=s.region,
                aws_access_key_id=s.access_key or None,
                aws_secret_access_key=s.secret_key or None,
                config=config,
            )
        )
        try:
            await self._call("head_bucket", lambda c: c.head_bucket(Bucket=s.bucket))
        except (StoreUnavailable, BlobNotFound) as exc:
            log.warning("S3 bucket %r at %s is not reachable yet: %s", s.bucket, s.endpoint, exc)
        else:
            self._sweeper = asyncio.create_task(self._sweep_quietly(), name="steplog-s3-sweep")

    async def close(self) -> None:
        for task in (self._sweeper, self._aborter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self._stack.aclose()
        self._client = None

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload; if S3 cannot be reached, keep trying in
        the background, so an interrupted upload does not linger until the
        next sweep (it is invisible meanwhile either way)."""
        try:
            await self._call(
                "abort_multipart_upload",
                lambda c: c.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id
                ),
            )
        except BlobNotFound:
            pass
        except StoreUnavailable as exc:
            log.warning("could not abort multipart upload of %s (retrying): %s", key, exc)
            self._to_abort[(key, upload_id)] = None
            if self._aborter is None or self._aborter.done():
                self._aborter = asyncio.create_task(self._abort_pending(), name="steplog-s3-abort")

    async def _abort_pending(self) -> None:
        delay = 1.0
        while self._to_abort:
            await asyncio.sleep(delay)
            for key, upload_id in list(self._to_abort):
                try:
                    await self._call(
                        "abort_multipart_upload",
                        lambda c, k=key, u=upload_id: c.abort_multipart_upload(
                            Bucket=self.settings.bucket, Key=k, UploadId=u
                        ),
                    )
                except BlobNotFound:
                    pass
                except StoreUnavailable:
                    delay = min(delay * 2, 30.0)
                    break
                del self._to_abort[(key, upload_id)]
                log.info("aborted multipart upload of %s", key)

    async def _sweep_quietly(self) -> None:
        try:
            if n := await self.sweep():
                log.info("aborted %d stale uploads in the object store", n)
        except (StoreUnavailable, BlobNotFound) as exc:
            log.warning("could not sweep stale uploads: %s", exc)

    # -- calls -------------------------------------------------------------------------

    async def _call(self, operation: str, fn: Any) -> Any:
        """One S3 request: bounded concurrency, metrics, errors translated."""
        async with self._slots:
            with self.metrics.s3_call(operation):
                try:
                    return await fn(self._client)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if _is_code(exc, "NoSuchKey", "NotFound", "404", "NoSuchUpload"):
                        raise BlobNotFound(operation) from exc
                    if _is_code(exc, "PreconditionFailed", "412", "NotImplemented", "501"):
                        raise
                    raise StoreUnavailable(
                        f"object store unavailable ({operation}): {exc}"
                    ) from exc

    # -- small blobs -------------------------------------------------------------------

    def _is_known(self, sha256: str) -> bool:
        at = self._known.get(sha256)
        return at is not None and time.monotonic() - at < self.settings.known_ttl_s

    async def stat(self, sha256: str) -> int | None:
        """The stored size of a blob, or None when it is not stored."""
        started = time.monotonic()
        key = blob_key(sha256)
        try:
            head = await self._call(
                "head_object", lambda c: c.head_object(Bucket=self.settings.bucket, Key=key)
            )
        except BlobNotFound:
            return None
        self._remember(sha256, started)
        return int(head["ContentLength"])

    async def put(
        self, sha256: str, data: bytes, content_type: str = "", since: float | None = None
    ) -> None:
        """Store bytes under their address. `sha256` must be their hash: the
        store checks it (x-amz-checksum-sha256) and refuses other bytes."""
        if self._is_known(sha256):
            return
        started = time.monotonic() if since is None else since
        key = blob_key(sha256)
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        extra: dict[str, str] = {"ContentType": content_type} if content_type else {}
        while True:
            if self._if_none_match:
                extra["IfNoneMatch"] = "*"
            try:
                await self._call(
                    "put_object",
                    lambda c: c.put_object(
                        Bucket=self.settings.bucket,
                        Key=key,
                        Body=data,
                        ChecksumSHA256=checksum,
                        **extra,
                    ),
                )
            except Exception as exc:
                if _is_code(exc, "PreconditionFailed", "412"):
                    break  # already stored: the same bytes, by construction
                if _is_code(exc, "NotImplemented", "501") and self._if_none_match:
                    log.info("the object store does not support If-None-Match; plain PUTs")
                    self._if_none_match = False
                    extra.pop("IfNoneMatch", None)
                    continue
                if isinstance(exc, (StoreUnavailable, BlobNotFound)):
                    raise
                raise StoreUnavailable(f"object store refused put_object: {exc}") from exc
            break
        self._remember(sha256, started)

    def _remember(self, sha256: str, at: float) -> None:
        known = self._known
        known.pop(sha256, None)
        known[sha256] = at
        if len(known) > _KNOWN_HASHES:
            del known[next(iter(known))]

    async def get(self, sha256: str) -> bytes:
        """A whole blob in memory (images)."""
        chunks = [c async for c in self.open(sha256)]
        return b"".join(chunks)

    async def open(self, sha256: str, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """Stream a blob. BlobNotFound before the first chunk when it is missing;
        StoreUnavailable when the store fails, even mid-stream."""
        key = blob_key(sha256)
        response = await self._call(
            "get_object", lambda c: c.get_object(Bucket=self.settings.bucket, Key=key)
        )
        started = time.perf_counter()
        try:
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(chunk_bytes):
                    yield chunk
        except Exception as exc:  # only the body's transport runs in here
            self.metrics.s3_errors.labels("get_object_body", "unavailable").inc()
            raise StoreUnavailable(f"object store failed mid-download: {exc}") from exc
        finally:
            self.metrics.s3_seconds.labels("get_object_body").observe(time.perf_counter() - started)

    # -- streams -----------------------------------------------------------------------

    async def upload(
        self,
        chunks: AsyncIterator[bytes],
        *,
        expected_sha256: str = "",
        size_hint: int = 0,
        max_bytes: int,
        content_type: str = "",
        on_address: Callable[[str], Awaitable[None]] | None = None,
    ) -> StoredBlob:
        """Store a stream of unknown length under its content address.

        `on_address(sha256)` is awaited once the address is known and before
        anything is written to it or asked about it: at the start when the
        hash is declared, else after the whole stream arrived (the blob sweep's
        touch).

        Raises ApiError DATA_LOSS when the stream does not hash to
        `expected_sha256` (or is shorter or longer than `size_hint`, when
        given), INVALID_ARGUMENT past `max_bytes`; StoreUnavailable when S3
        fails. Whatever the failure, nothing becomes visible."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        if on_address is not None and expected_sha256:
            await on_address(expected_sha256)
        hasher = hashlib.sha256()
        hashing: asyncio.Future[None] | None = None
        staged = not expected_sha256
        key = f"uploads/{uuid.uuid4().hex}" if staged else blob_key(expected_sha256)
        pending: list[bytes] = []
        pending_bytes = 0
        total = 0
        upload: _Multipart | None = None
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                total += len(chunk)
                if total > max_bytes:
                    raise invalid(
                        "chunk", f"the file is larger than the limit of {max_bytes} bytes"
                    )
                if size_hint and total > size_hint:
                    raise ApiError(
                        "DATA_LOSS", f"received more than the declared {size_hint} bytes", "size"
                    )
                if hashing is not None:
                    await hashing
                    hashing = None
                if len(chunk) >= _THREAD_HASH_BYTES:
                    hashing = loop.run_in_executor(None, hasher.update, chunk)
                else:
                    hasher.update(chunk)
                pending.append(chunk)
                pending_bytes += len(chunk)
                number = 1 if upload is None else upload.next_number
                if pending_bytes >= part_size(self.settings.part_bytes, size_hint, number):
                    if upload is None:
                        upload = await self._create_multipart(key, content_type)
                    await upload.add(b"".join(pending))
                    pending, pending_bytes = [], 0
            if hashing is not None:
                await hashing
                hashing = None
            digest = hasher.hexdigest()
            if size_hint and total != size_hint:
                raise ApiError(
                    "DATA_LOSS", f"received {total} bytes; the header said {size_hint}", "size"
                )
            if expected_sha256 and digest != expected_sha256:
                raise ApiError(
                    "DATA_LOSS",
                    f"the received bytes hash to {digest}, not the declared {expected_sha256}",
                    "sha256",
                )
            if on_address is not None and not expected_sha256:
                await on_address(digest)
            if upload is None:
                # One part's worth: a single verified PUT straight to the address.
                await self.put(digest, b"".join(pending), content_type, since=started)
                return StoredBlob(digest, total)
            if pending:
                await upload.add(b"".join(pending))
            await upload.complete()
            upload = None
            if staged:
                await self._promote(key, digest, total, content_type)
            self._remember(digest, started)
            return StoredBlob(digest, total)
        except BaseException:
            if hashing is not None:
                with contextlib.suppress(BaseException):
                    await hashing
            if upload is not None:
                await _shielded(upload.abort())
            raise

    async def _create_multipart(self, key: str, content_type: str) -> _Multipart:
        extra = {"ContentType": content_type} if content_type else {}
        created = await self._call(
            "create_multipart_upload",
            lambda c: c.create_multipart_upload(Bucket=self.settings.bucket, Key=key, **extra),
        )
        return _Multipart(self, key, created["UploadId"])

    async def _promote(self, staging: str, sha256: str, size: int, content_type: str) -> None:
        """Copy a staged upload to its content address, then delete it."""
        bucket = self.settings.bucket
        try:
            if await self.stat(sha256) is None:
                if size <= 5 * 1024**3:
                    await self._call(
                        "copy_object",
                        lambda c: c.copy_object(
                            Bucket=bucket,
                            Key=blob_key(sha256),
                            CopySource={"Bucket": bucket, "Key": staging},
                        ),
                    )
                else:
                    await self._copy_multipart(staging, sha256, size, content_type)
        finally:
            await _shielded(self._delete(staging))

    async def _copy_multipart(self, source: str, sha256: str, size: int, content_type: str) -> None:
        bucket = self.settings.bucket
        upload = await self._create_multipart(blob_key(sha256), content_type)
        step = max(1024**3, math.ceil(size / (MAX_PARTS - 100)))
        try:
            for number, start in enumerate(range(0, size, step), start=1):
                span = f"bytes={start}-{min(size, start + step) - 1}"
                result = await self._call(
                    "upload_part_copy",
                    lambda c, n=number, r=span: c.upload_part_copy(
                        Bucket=bucket,
                        Key=upload.key,
                        UploadId=upload.upload_id,
                        PartNumber=n,
                        CopySource={"Bucket": bucket, "Key": source},
                        CopySourceRange=r,
                    ),
                )
                upload.parts.append(
                    _done({"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]})
                )
            await upload.complete()
        except BaseException:
            await _shielded(upload.abort())
            raise

    async def _delete(self, key: str) -> None:
        try:
            await self._call(
                "delete_object", lambda c: c.delete_object(Bucket=self.settings.bucket, Key=key)
            )
        except (StoreUnavailable, BlobNotFound) as exc:
            log.warning("could not delete staging object %s (the sweep will): %s", key, exc)

    async def list_blobs(self, token: str = "") -> tuple[list[ListedBlob], str]:
        """One page of the stored blobs (content addresses only) and the
        token of the next page ('' after the last)."""
        extra = {"ContinuationToken": token} if token else {}
        listed = await self._call(
            "list_objects_v2",
            lambda c: c.list_objects_v2(
                Bucket=self.settings.bucket, Prefix="blobs/sha256/", MaxKeys=1000, **extra
            ),
        )
        out: list[ListedBlob] = []
        for obj in listed.get("Contents", []):
            parts = str(obj["Key"]).split("/")
            sha = "".join(parts[2:]) if len(parts) == 4 else ""
            if _SHA256.match(sha):
                out.append(ListedBlob(sha, int(obj.get("Size", 0)), obj["LastModified"]))
        next_token = listed.get("NextContinuationToken") if listed.get("IsTruncated") else ""
        return out, str(next_token or "")

    async def delete_blob(self, sha256: str) -> None:
        """Delete a blob (the blob sweep; nothing else deletes blobs)."""
        key = blob_key(sha256)
        self._known.pop(sha256, None)
        await self._call(
            "delete_object", lambda c: c.delete_object(Bucket=self.settings.bucket, Key=key)
        )

    async def sweep(self, older_than: timedelta = STALE_UPLOAD_AGE) -> int:
        """Abort multipart uploads and delete staging objects older than
        `older_than`: what a killed service process left behind."""
        bucket = self.settings.bucket
        cutoff = datetime.now(UTC) - older_than
        aborted = 0
        for prefix in ("blobs/", "uploads/"):
            listed = await self._call(
                "list_multipart_uploads",
                lambda c, p=prefix: c.list_multipart_uploads(Bucket=bucket, Prefix=p),
            )
            for u in listed.get("Uploads", []):
                if u["Initiated"] < cutoff:
                    with contextlib.suppress(BlobNotFound):
                        await self._call(
                            "abort_multipart_upload",
                            lambda c, u=u: c.abort_multipart_upload(
                                Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]
                            ),
                        )
                    aborted += 1
        listed = await self._call(
            "list_objects_v2", lambda c: c.list_objects_v2(Bucket=bucket, Prefix="uploads/")
        )
        for obj in listed.get("Contents", []):
            if obj["LastModified"] < cutoff:
                await self._delete(obj["Key"])
                aborted += 1
        return aborted


def _done(value: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


async def _shielded(cleanup: Awaitable[None]) -> None:
    """Run cleanup to the end (30 s at most) even when the caller is being
    cancelled: an aborted upload must not stay behind because its client left."""
    task = asyncio.ensure_future(cleanup)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(task), 30.0)


class _Multipart:
    """One multipart upload: parts go up concurrently, a few at a time."""

    def __init__(self, store: BlobStore, key: str, upload_id: str) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.parts: list[asyncio.Future[dict[str, Any]]] = []
        self._room = asyncio.Semaphore(_PARTS_IN_FLIGHT)

    @property
    def next_number(self) -> int:
        return len(self.parts) + 1

    async def add(self, body: bytes) -> None:
        """Start uploading the next part; waits while too many are in flight,
        and raises the error of a part that already failed."""
        for part in self.parts:
            error = part.exception() if part.done() else None
            if error is not None:
                raise error
        await self._room.acquire()
        try:
            await self.store._part_slots.acquire()
        except BaseException:
            self._room.release()
            raise
        self.parts.append(asyncio.ensure_future(self._part(self.next_number, body)))

    async def _part(self, number: int, body: bytes) -> dict[str, Any]:
        try:
            s = self.store
            result = await s._call(
                "upload_part",
                lambda c: c.upload_part(
                    Bucket=s.settings.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    PartNumber=number,
                    Body=body,
                ),
            )
            return {"PartNumber": number, "ETag": result["ETag"]}
        finally:
            self.store._part_slots.release()
            self._room.release()

    async def complete(self) -> None:
        parts = await asyncio.gather(*self.parts)
        s = self.store
        await s._call(
            "complete_multipart_upload",
            lambda c: c.complete_multipart_upload(
                Bucket=s.settings.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            ),
        )

    async def abort(self) -> None:
        for part in self.parts:
            part.cancel()
        await asyncio.gather(*self.parts, return_exceptions=True)
        await self.store.abort_upload(self.key, self.upload_id)
