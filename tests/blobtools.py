"""Test helpers for blobs: a private bucket on the stack's S3 (so a test can
list it, and a sweep cannot touch other sessions' blobs), raw image batches
and raw uploads."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ingest.devstack import StackInfo
from steplog.v1 import artifact_service_pb2 as ap
from steplog.v1 import artifact_service_pb2_grpc as ag
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import ingest_service_pb2_grpc as ig


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Bucket:
    """A bucket of its own on the stack's S3 server."""

    def __init__(self, info: StackInfo, name: str | None = None) -> None:
        self.info = info
        self.name = name or f"steplog-test-{uuid.uuid4().hex[:12]}"

    def _call(self, method: str, **kwargs: Any) -> Any:
        from aiobotocore.session import get_session

        async def go() -> Any:
            async with get_session().create_client(
                "s3",
                endpoint_url=self.info.s3_endpoint,
                region_name=self.info.s3_region,
                aws_access_key_id=self.info.s3_access_key,
                aws_secret_access_key=self.info.s3_secret_key,
            ) as c:
                if method == "list_all":
                    keys: dict[str, int] = {}
                    token: dict[str, str] = {}
                    while True:
                        page = await c.list_objects_v2(Bucket=self.name, **token)
                        keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
                        if not page.get("IsTruncated"):
                            return keys
                        token = {"ContinuationToken": page["NextContinuationToken"]}
                return await getattr(c, method)(Bucket=self.name, **kwargs)

        return asyncio.run(go())

    def create(self) -> Bucket:
        self._call("create_bucket")
        return self

    def keys(self) -> dict[str, int]:
        """Every object key (and size) in the bucket."""
        return dict(self._call("list_all"))

    def blobs(self) -> set[str]:
        """The SHA-256 of every stored blob."""
        return {"".join(k.split("/")[2:]) for k in self.keys() if k.startswith("blobs/sha256/")}

    def drop(self) -> None:
        for key in self.keys():
            self._call("delete_object", Key=key)
        self._call("delete_bucket")


def image_batch(
    run_id: str,
    name: str,
    images: list[bytes],
    steps: list[int],
    writer_id: str,
    sequence: int,
    workspace: str = "default",
) -> pb.WriteRequest:
    series = data_pb2.SeriesData(
        name=name,
        images=data_pb2.ImagePoints(steps=steps, images=[data_pb2.Image(data=d) for d in images]),
    )
    return pb.WriteRequest(
        workspace=workspace,
        batch=pb.Batch(
            writer_id=writer_id,
            sequence=sequence,
            series=[pb.RunSeries(run_id=run_id, series=series)],
        ),
    )


def ingest_stub(url: str) -> ig.IngestServiceStub:
    return ig.IngestServiceStub(grpc.insecure_channel(url))


def artifacts_stub(url: str) -> ag.ArtifactServiceStub:
    return ag.ArtifactServiceStub(grpc.insecure_channel(url))


def upload_requests(
    run_id: str, path: str, data: bytes, workspace: str = "default", **header: Any
) -> Iterator[ap.UploadArtifactRequest]:
    yield ap.UploadArtifactRequest(
        header=ap.UploadArtifactHeader(workspace=workspace, run_id=run_id, path=path, **header)
    )
    for i in range(0, len(data), 1024 * 1024):
        yield ap.UploadArtifactRequest(chunk=data[i : i + 1024 * 1024])
