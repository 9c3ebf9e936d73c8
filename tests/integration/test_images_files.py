"""Images and files end to end: Python client -> real gRPC server ->
SeaweedFS S3 and TimescaleDB, checked against what S3 and SQL really hold.

The fault test stops the local S3 server in the middle of image logging and
file uploads and starts it again: every image is stored exactly once, every
file arrives whole, nothing half-written is left."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiobotocore.session import get_session

from ingest.devstack import LocalStack, StackInfo
from ingest.store.blobs import blob_key
from steplog import AlreadyExistsError, Experiment, InvalidArgumentError, NotFoundError, Run
from steplog._writer.transport import Rejection
from steplog.client import Client
from steplog.v1 import artifact_service_pb2 as ap
from steplog.v1 import artifact_service_pb2_grpc as ag
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import query_service_pb2 as qs
from tests import imagegen
from tests.sql import fetch, fetchval
from tests.support import ServiceProcess

MiB = 1024 * 1024


# -- helpers ------------------------------------------------------------------------------


def s3(info: StackInfo, method: str, **kwargs: Any) -> Any:
    """One call straight to the S3 server, bypassing the service."""

    async def go() -> Any:
        async with get_session().create_client(
            "s3",
            endpoint_url=info.s3_endpoint,
            region_name=info.s3_region,
            aws_access_key_id=info.s3_access_key,
            aws_secret_access_key=info.s3_secret_key,
        ) as c:
            result = await getattr(c, method)(Bucket=info.s3_bucket, **kwargs)
            if method == "get_object":
                async with result["Body"] as body:
                    return await body.read()
            return result

    return asyncio.run(go())


def s3_has(info: StackInfo, sha256: str) -> bool:
    try:
        s3(info, "head_object", Key=blob_key(sha256))
    except Exception as exc:
        if "404" in str(exc) or "Not Found" in str(exc):
            return False
        raise
    return True


def multipart_uploads(info: StackInfo) -> list[str]:
    listed = s3(info, "list_multipart_uploads")
    return [u["Key"] for u in listed.get("Uploads", [])]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_run(url: str, experiment_name: str) -> Run:
    return Experiment(experiment_name, url=url).start_logging()


def rejections(run: Run) -> list[Rejection]:
    run.flush()
    return [r for r in run._client.writer.rejections() if r.run_id == run.id]


def read_images(url: str, run: Run, name: str, include_bytes: bool = True) -> data_pb2.ImagePoints:
    client = Client(url, "default")
    reply = client.call(
        client.queries.ReadSeries,
        qs.ReadSeriesRequest(
            workspace="default", run_id=run.id, name=name, include_bytes=include_bytes
        ),
    )
    return reply.series.images


class RawWriter:
    """The unary Write with its own writer id, for images the client would not send."""

    def __init__(self, url: str) -> None:
        self.client = Client(url, "default")
        self.writer_id = f"raw-{uuid.uuid4().hex[:12]}"
        self.sequence = 0

    def images(
        self,
        run_id: str,
        name: str,
        images: list[data_pb2.Image],
        steps: list[int] | None = None,
        policy: int = data_pb2.STEP_POLICY_UNSPECIFIED,
    ) -> pb.BatchResult:
        self.sequence += 1
        series = data_pb2.SeriesData(
            name=name,
            step_policy=policy,  # type: ignore[arg-type]
            images=data_pb2.ImagePoints(steps=steps or [], images=images),
        )
        batch = pb.Batch(
            writer_id=self.writer_id,
            sequence=self.sequence,
            series=[pb.RunSeries(run_id=run_id, series=series)],
        )
        reply = self.client.call(self.client.ingest.Write, pb.WriteRequest(batch=batch))
        return reply.result


def upload_requests(
    run_id: str, path: str, data: bytes, **header: Any
) -> Iterator[ap.UploadArtifactRequest]:
    yield ap.UploadArtifactRequest(
        header=ap.UploadArtifactHeader(run_id=run_id, path=path, **header)
    )
    for i in range(0, len(data), 4 * MiB):
        yield ap.UploadArtifactRequest(chunk=data[i : i + 4 * MiB])


def artifacts_stub(url: str) -> ag.ArtifactServiceStub:
    return ag.ArtifactServiceStub(grpc.insecure_channel(url))


class Figure:
    """What log_image needs of a matplotlib figure."""

    def savefig(self, out: io.BytesIO, format: str) -> None:
        out.write(imagegen.png(8, 8, seed=99))


# -- images -------------------------------------------------------------------------------


def test_log_image_from_path_bytes_stream_and_plot(
    url: str, experiment_name: str, stack_info: StackInfo, database_url: str, tmp_path: Path
) -> None:
    run = new_run(url, experiment_name)
    sources = [imagegen.png(20, 10, seed=1), imagegen.jpeg(5, 7), imagegen.gif(6, 2)]
    (tmp_path / "a.png").write_bytes(sources[0])
    run.log_image("samples", path=str(tmp_path / "a.png"), step=0, description="predictions")
    run.log_image("samples", path=sources[1], step=1)
    run.log_image("samples", path=io.BytesIO(sources[2]), step=2)
    run.log_image("samples", plot=Figure(), step=3)
    assert run.flush(60)
    assert rejections(run) == []

    got = read_images(url, run, "samples")
    expected = [*sources, imagegen.png(8, 8, seed=99)]
    assert list(got.steps) == [0, 1, 2, 3]
    assert [i.data for i in got.images] == expected
    assert [(i.content_type, i.width, i.height) for i in got.images] == [
        ("image/png", 20, 10),
        ("image/jpeg", 5, 7),
        ("image/gif", 6, 2),
        ("image/png", 8, 8),
    ]
    assert [i.sha256 for i in got.images] == [sha(d) for d in expected]
    assert [i.size for i in got.images] == [len(d) for d in expected]
    # The rows point at blobs S3 really holds, at their content addresses.
    for data in expected:
        assert s3(stack_info, "get_object", Key=blob_key(sha(data))) == data
    # Without include_bytes: the references only.
    assert [i.data for i in read_images(url, run, "samples", include_bytes=False).images] == [
        b""
    ] * 4
    rows = fetchval(
        database_url,
        "SELECT count(*) FROM image_points p JOIN series s USING (series_id) WHERE s.run_id = $1",
        run.id,
    )
    assert rows == 4


def test_image_series_follow_the_step_rules(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    a, b = imagegen.png(4, 4, seed=1), imagegen.png(4, 4, seed=2)
    run.log_image("img", a, step=5)
    run.log_image("img", a, step=5)  # exact repeat: a duplicate
    run.log_image("img", b, step=5)  # same step, another image: a conflict
    run.log_image("img", b, step=3)  # smaller step
    run.log_image("img", b, step=6)
    run.log_image("free", a)  # unstepped: indices 0, 1
    run.log_image("free", b)
    assert run.flush(60)
    reasons = sorted(r.reason for r in rejections(run))
    assert reasons == ["STEP_CONFLICT", "STEP_NOT_INCREASING"]
    assert run._client.writer.stats.duplicates >= 1
    got = read_images(url, run, "img")
    assert list(got.steps) == [5, 6] and [i.data for i in got.images] == [a, b]
    free = Client(url, "default").call(
        Client(url, "default").queries.ReadSeries,
        qs.ReadSeriesRequest(run_id=run.id, name="free", start_step=0, include_bytes=True),
    )
    assert list(free.series.images.steps) == [0, 1]
    assert [i.data for i in free.series.images.images] == [a, b]


def test_out_of_order_image_series_keep_the_last_write(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = RawWriter(url)
    a, b, c = (imagegen.png(3, 3, seed=s) for s in (1, 2, 3))
    ooo = data_pb2.STEP_POLICY_OUT_OF_ORDER
    raw.images(run.id, "ooo", [data_pb2.Image(data=a), data_pb2.Image(data=b)], [2, 1], ooo)
    result = raw.images(run.id, "ooo", [data_pb2.Image(data=c)], [2], ooo)
    assert result.accepted == 1 and result.rejected == 0
    got = read_images(url, run, "ooo")
    assert list(got.steps) == [1, 2] and [i.data for i in got.images] == [b, c]


def test_bad_images_are_rejected_one_by_one(
    url: str, experiment_name: str, stack_info: StackInfo
) -> None:
    run = new_run(url, experiment_name)
    good = imagegen.png(6, 6, seed=7)
    truncated = imagegen.png(6, 6, seed=8)[:-20]
    images = [
        data_pb2.Image(data=good, content_type="image/png", width=6, height=6, sha256=sha(good)),
        data_pb2.Image(data=b"not an image at all"),
        data_pb2.Image(data=truncated),
        data_pb2.Image(data=good, content_type="image/jpeg"),
        data_pb2.Image(data=good, width=7),
        data_pb2.Image(data=good, sha256=sha(b"other")),
    ]
    result = RawWriter(url).images(run.id, "mixed", images, list(range(6)))
    assert result.accepted == 1 and result.rejected == 5
    assert {c.reason: c.count for c in result.reject_counts} == {pb.REJECT_REASON_INVALID_IMAGE: 5}
    messages = [p.message for p in result.rejected_points]
    assert "unknown image format" in messages[0] and "truncated" in messages[1]
    assert "content type" in messages[2] and "declared size" in messages[3]
    assert "sha256" in messages[4]
    assert [i.data for i in read_images(url, run, "mixed").images] == [good]
    assert not s3_has(stack_info, sha(truncated))  # rejected before anything was stored


def test_limits_on_images_and_files(
    service_env: dict[str, str], experiment_name: str, tmp_path: Path
) -> None:
    small = {"STEPLOG_MAX_IMAGE_BYTES": "2000", "STEPLOG_MAX_ARTIFACT_BYTES": "100000"}
    with ServiceProcess(service_env, extra_env=small, log_path=tmp_path / "svc.log") as svc:
        run = new_run(svc.address, experiment_name)
        result = RawWriter(svc.address).images(
            run.id, "big", [data_pb2.Image(data=imagegen.png_of_size(5000))], [0]
        )
        assert [c.reason for c in result.reject_counts] == [pb.REJECT_REASON_LIMIT_EXCEEDED]
        assert "limit is 2000" in result.rejected_points[0].message
        with pytest.raises(InvalidArgumentError, match="limit is 100000"):
            run.upload_file("big.bin", os.urandom(100_001))
        # A client that does not say the size is stopped by the bytes it sends.
        stub = artifacts_stub(svc.address)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadArtifact(upload_requests(run.id, "big2.bin", os.urandom(200_000)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert run.get_file_names() == []
        run.upload_file("ok.bin", os.urandom(100_000))
        assert run.get_file_names() == ["ok.bin"]


# -- files ----------------------------------------------------------------------------------


def test_upload_and_download_files(
    url: str, experiment_name: str, stack_info: StackInfo, tmp_path: Path
) -> None:
    run = new_run(url, experiment_name)
    big = os.urandom(40 * MiB + 7)  # several parts of a multipart upload
    (tmp_path / "model.pt").write_bytes(big)
    info = run.upload_file("outputs/model.pt", tmp_path / "model.pt").result()
    assert (info.name, info.size, info.sha256, info.unchanged) == (
        "outputs/model.pt",
        len(big),
        sha(big),
        False,
    )
    run.upload_file("config.json", io.BytesIO(b'{"lr": 0.1}'))
    run.upload_file("notes/readme.txt", b"hello")
    assert run.get_file_names() == ["config.json", "notes/readme.txt", "outputs/model.pt"]
    assert s3(stack_info, "head_object", Key=blob_key(sha(big)))["ContentLength"] == len(big)

    out = Path(run.download_file("outputs/model.pt", tmp_path / "copy.pt"))
    assert out.read_bytes() == big
    (tmp_path / "d").mkdir()
    assert Path(run.download_file("config.json", tmp_path / "d")).read_bytes() == b'{"lr": 0.1}'

    # The same content again: "unchanged", at once. Other content: an error...
    assert run.upload_file("outputs/model.pt", big).result().unchanged
    with pytest.raises(AlreadyExistsError, match="overwrite"):
        run.upload_file("notes/readme.txt", b"goodbye")
    # ...unless overwriting is asked for.
    run.upload_file("notes/readme.txt", b"goodbye", overwrite=True)
    assert Path(run.download_file("notes/readme.txt", tmp_path / "r")).read_bytes() == b"goodbye"

    with pytest.raises(NotFoundError):
        run.download_file("outputs/missing.pt", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    for bad in ("../escape", "/abs/path", "a\x00b", "a\\b"):
        with pytest.raises(InvalidArgumentError):
            run.upload_file(bad, b"x")


def test_upload_folder_and_download_files(url: str, experiment_name: str, tmp_path: Path) -> None:
    run = new_run(url, experiment_name)
    src = tmp_path / "src"
    files = {"a.txt": b"a", "sub/b.bin": os.urandom(3 * MiB), "sub/deeper/c": b""}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uploads = run.upload_folder("outputs", src)
    assert sorted(u.name for u in uploads) == sorted(f"outputs/{f}" for f in files)
    run.upload_file("logs/train.log", b"log")

    kept = tmp_path / "kept"
    paths = run.download_files(prefix="outputs/", output_directory=kept)
    assert sorted(paths) == sorted(str((kept / "outputs" / f).resolve()) for f in files)
    cut = tmp_path / "cut"
    run.download_files(prefix="outputs/", output_directory=cut, append_prefix=False)
    everything = tmp_path / "all"
    run.download_files(output_directory=everything)
    for rel, data in files.items():
        assert (kept / "outputs" / rel).read_bytes() == data
        assert (cut / rel).read_bytes() == data
        assert (everything / "outputs" / rel).read_bytes() == data
    assert (everything / "logs" / "train.log").read_bytes() == b"log"


def test_a_wrong_hash_is_data_loss_and_leaves_nothing(
    url: str, experiment_name: str, stack_info: StackInfo
) -> None:
    run = new_run(url, experiment_name)
    stub = artifacts_stub(url)
    for size in (1000, 40 * MiB):  # one PUT, and a multipart upload
        data = os.urandom(size)
        claimed = sha(data[:-1] + b"!")
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadArtifact(upload_requests(run.id, f"f{size}", data, sha256=claimed))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert not s3_has(stack_info, claimed) and not s3_has(stack_info, sha(data))
    with pytest.raises(grpc.RpcError) as err:  # fewer bytes than the header said
        stub.UploadArtifact(upload_requests(run.id, "short", b"x" * 50, size=100))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert run.get_file_names() == []
    wait_until(lambda: multipart_uploads(stack_info) == [], 30, "aborted multipart uploads")


def test_an_interrupted_upload_is_aborted(
    url: str, experiment_name: str, stack_info: StackInfo
) -> None:
    run = new_run(url, experiment_name)
    data = os.urandom(40 * MiB)
    hold = threading.Event()

    def requests() -> Iterator[ap.UploadArtifactRequest]:
        yield from upload_requests(run.id, "partial.bin", data[: 24 * MiB], sha256=sha(data))
        hold.wait(60)  # the client stalls, then goes away

    call = artifacts_stub(url).UploadArtifact.future(requests())
    wait_until(lambda: len(multipart_uploads(stack_info)) == 1, 30, "the multipart upload")
    call.cancel()
    hold.set()
    wait_until(lambda: multipart_uploads(stack_info) == [], 30, "the upload to be aborted")
    assert run.get_file_names() == [] and not s3_has(stack_info, sha(data))


# -- S3 down ------------------------------------------------------------------------------------


def test_s3_restart_in_the_middle_of_uploads(
    stack: LocalStack,
    url: str,
    experiment_name: str,
    stack_info: StackInfo,
    database_url: str,
    tmp_path: Path,
) -> None:
    run = new_run(url, experiment_name)
    writer = run._client.writer
    pictures = [imagegen.png(12, 12, seed=1000 + i) for i in range(300)]
    # One PUT each, and multipart uploads (parts of 16 MiB) cut by the outage.
    files = {f"ckpt/{i}.pt": os.urandom((12 if i % 2 else 40) * MiB + i) for i in range(4)}
    for step in range(100):
        run.log_image("frames", pictures[step], step=step)
    wait_until(lambda: writer.stats.points_acked > 0, 30, "a first acknowledgement")
    # A raw upload held in the middle: its multipart upload is open when S3 stops.
    held = os.urandom(40 * MiB)
    hold = threading.Event()

    def held_requests() -> Iterator[ap.UploadArtifactRequest]:
        requests = upload_requests(run.id, "held.bin", held, sha256=sha(held), size=len(held))
        for i, request in enumerate(requests):
            if i == 6:  # 20 MiB sent: the first part is in S3
                hold.wait(120)
            yield request

    held_call = artifacts_stub(url).UploadArtifact.future(held_requests())
    wait_until(lambda: len(multipart_uploads(stack_info)) == 1, 30, "a multipart upload")
    uploads = [run.upload_file(n, d, wait=False) for n, d in list(files.items())[:2]]
    stack.stop_s3()
    try:
        for step in range(100, 200):
            run.log_image("frames", pictures[step], step=step)
        uploads += [run.upload_file(n, d, wait=False) for n, d in list(files.items())[2:]]
        hold.set()
        with pytest.raises(grpc.RpcError) as err:
            held_call.result(60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: writer.stats.reconnects >= 1, 60, "UNAVAILABLE while S3 is down")
    finally:
        hold.set()
        stack.start_s3()
    for step in range(200, 300):
        run.log_image("frames", pictures[step], step=step)
    assert run.flush(180), writer.stats
    for u in uploads:
        u.result(180)
    assert rejections(run) == []

    rows = fetch(
        database_url,
        "SELECT p.step, p.sha256 FROM image_points p JOIN series s USING (series_id)"
        " WHERE s.run_id = $1 ORDER BY p.step",
        run.id,
    )
    assert [(r["step"], r["sha256"]) for r in rows] == [(i, sha(p)) for i, p in enumerate(pictures)]
    got = read_images(url, run, "frames")
    assert [i.data for i in got.images] == pictures
    assert run.get_file_names() == sorted(files)  # not held.bin: it never completed
    for name, data in files.items():
        assert Path(run.download_file(name, tmp_path / "dl")).read_bytes() == data
    # Uploads cut by the outage were aborted once S3 was back (the abort is retried).
    wait_until(lambda: multipart_uploads(stack_info) == [], 90, "no upload left half-done")


def test_get_metrics_returns_image_references(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    data = imagegen.png(7, 5)
    run.log_image("sample", data, step=3)
    got = run.get_metrics()["sample"]
    assert got == {
        "step": 3,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "content_type": "image/png",
        "width": 7,
        "height": 5,
    }


def test_flush_waits_for_background_uploads(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    blob = os.urandom(3 * 1024 * 1024)
    pending = run.upload_file("outputs/late.bin", blob, wait=False)
    assert run.flush(120)
    assert pending.done()
    assert "outputs/late.bin" in run.get_file_names()
