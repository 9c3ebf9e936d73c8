"""ArtifactService: the files of a run, streamed to and from S3.

Upload: a header, then chunks. Before any byte goes to S3 the run must
exist in the workspace and be active, and the declared size must fit in the
workspace's stored-bytes quota (`BlobGate.check_upload`); the blob is
touched for the sweep as soon as its address is known. The caller's token
and role were checked before the handler ran. The bytes go to S3 as they arrive (one PUT,
or a multipart upload) under their content address; the file is recorded
only after the whole stream hashed to the declared SHA-256 and the blob is
stored. A failure at any point (a bad hash, a size over the limit, the
client gone, S3 down) leaves nothing visible: no row, no object.

Paths are untrusted: relative, '/'-separated, no '.' or '..' segments, no
empty segments, no backslashes, NUL or other control characters. They only
ever reach the database as query parameters, never an object key.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from ingest.api.common import abort_with, handle_errors, timestamp
from ingest.core import model
from ingest.core.checks import CONTROL as _CONTROL
from ingest.core.errors import ApiError, StoreUnavailable, invalid, not_found
from ingest.store.artifacts import ArtifactStore, conflict
from ingest.store.blobs import BlobNotFound, BlobStore
from ingest.store.image_blobs import BlobGate
from steplog.v1 import artifact_service_pb2 as pb
from steplog.v1 import artifact_service_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_PATH_CHARS = 1024
MAX_SEGMENT_BYTES = 255
_DRIVE = re.compile(r"^[A-Za-z]:")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def artifact_path(value: str, field: str = "path") -> str:
    """A safe relative path, or INVALID_ARGUMENT naming what is wrong."""
    if not value:
        raise invalid(field, "path is required")
    if len(value) > MAX_PATH_CHARS:
        raise invalid(field, f"path is {len(value)} characters; the limit is {MAX_PATH_CHARS}")
    if "\x00" in value:
        raise invalid(field, "path contains NUL")
    if _CONTROL.search(value):
        raise invalid(field, "path contains a control character")
    if "\\" in value:
        raise invalid(field, f"path {value[:80]!r} contains a backslash; separate with '/'")
    if value.startswith("/") or _DRIVE.match(value):
        raise invalid(field, f"path {value[:80]!r} must be relative")
    for segment in value.split("/"):
        if segment in ("", ".", ".."):
            raise invalid(
                field,
                f"path {value[:80]!r} has an empty, '.' or '..' segment; "
                "paths are relative and name a file inside the run",
            )
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise invalid(field, f"a segment of path {value[:80]!r} is over 255 bytes")
    return value


def path_prefix(value: str) -> str:
    """A listing prefix: a path or a path's beginning ('' lists everything)."""
    if not value:
        return ""
    artifact_path(value.rstrip("/") or "/", "prefix")
    return value


def sha256_field(value: str) -> str:
    """'' (not declared) or a lower-case hex SHA-256."""
    if value and not _SHA256.match(value):
        raise invalid("sha256", "sha256 must be 64 hex digits")
    return value.lower()


def content_type(declared: str, path: str) -> str:
    if declared:
        if len(declared) > 255 or _CONTROL.search(declared):
            raise invalid("content_type", "content type must be up to 255 printable characters")
        return declared
    return mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"


def artifact_to_proto(row: Mapping[str, Any]) -> pb.Artifact:
    return pb.Artifact(
        run_id=row["run_id"],
        path=row["path"],
        size=row["size"],
        sha256=row["sha256"],
        content_type=row["content_type"],
        # When this content was stored (the time of the last overwrite).
        created_time=timestamp(row["updated_at"]),
    )


class ArtifactServicer(pb_grpc.ArtifactServiceServicer):
    def __init__(
        self,
        store: ArtifactStore,
        blobs: BlobStore,
        max_bytes: int,
        chunk_bytes: int = 1024 * 1024,
        gate: BlobGate | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.gate = gate

    @handle_errors
    async def UploadArtifact(
        self, request_iterator: AsyncIterator[pb.UploadArtifactRequest], context: Ctx
    ) -> pb.UploadArtifactResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("header", "the first message of an upload must be its header")
        h = first.header
        workspace = model.workspace_name(h.workspace)
        run_id = model.run_id(h.run_id)
        path = artifact_path(h.path)
        expected = sha256_field(h.sha256)
        ctype = content_type(h.content_type, path)
        if h.size < 0:
            raise invalid("size", "size must be >= 0")
        if h.size > self.max_bytes:
            raise invalid("size", f"the file is {h.size} bytes; the limit is {self.max_bytes}")
        existing = await self.store.get(workspace, run_id, path)
        if existing is not None and expected:
            # Known before any byte moves: a resend after a lost answer, or a clash.
            if existing["sha256"] == expected:
                return pb.UploadArtifactResponse(
                    artifact=artifact_to_proto(existing), unchanged=True
                )
            if not h.overwrite:
                raise conflict(path, existing["sha256"])
        if self.gate is not None:
            await self.gate.check_upload(workspace, run_id, h.size)
        blob = await self.blobs.upload(
            _chunks(requests),
            expected_sha256=expected,
            size_hint=h.size,
            max_bytes=self.max_bytes,
            content_type=ctype,
            on_address=self.gate.touch if self.gate is not None else None,
        )
        row, unchanged = await self.store.record(workspace, run_id, path, blob, ctype, h.overwrite)
        return pb.UploadArtifactResponse(artifact=artifact_to_proto(row), unchanged=unchanged)

    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadArtifactResponse]:
        """The header, then the bytes in chunks. A missing blob is found out
        before the header goes; S3 failing mid-way ends the stream with
        UNAVAILABLE, and the client checks the SHA-256 of what it got."""
        try:
            workspace = model.workspace_name(request.workspace)
            run_id = model.run_id(request.run_id)
            path = artifact_path(request.path)
            row = await self.store.get(workspace, run_id, path)
            if row is None:
                raise not_found("path", f"run {run_id!r} has no file {path!r}")
            chunks = self.blobs.open(row["sha256"], self.chunk_bytes)
            try:
                first = await anext(chunks, None)
            except BlobNotFound:
                raise ApiError(
                    "DATA_LOSS", f"the bytes of {path!r} are missing from the object store"
                ) from None
            yield pb.DownloadArtifactResponse(artifact=artifact_to_proto(row))
            if first is not None:
                yield pb.DownloadArtifactResponse(chunk=first)
                async for chunk in chunks:
                    yield pb.DownloadArtifactResponse(chunk=chunk)
        except (ApiError, StoreUnavailable) as exc:
            await abort_with(context, exc)

    @handle_errors
    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: Ctx
    ) -> pb.ListArtifactsResponse:
        workspace = model.workspace_name(request.workspace)
        run_id = model.run_id(request.run_id)
        rows = await self.store.list(workspace, run_id, path_prefix(request.prefix))
        return pb.ListArtifactsResponse(artifacts=[artifact_to_proto(r) for r in rows])


async def _chunks(requests: AsyncIterator[pb.UploadArtifactRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise invalid("header", "an upload has one header, before its chunks")
        yield request.chunk
