"""Quotas per workspace against the real service, TimescaleDB and S3: rates
slow a writer down without losing a point (RetryInfo on the wire), hard
quotas refuse with an error that names them and write nothing. Every test
uses a workspace of its own; the module uses a bucket of its own (listed
before and after)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from ingest.devstack import StackInfo
from steplog import Experiment
from steplog.client import Client
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import run_service_pb2 as rs
from tests import imagegen
from tests.blobtools import Bucket, artifacts_stub, image_batch, ingest_stub, sha, upload_requests
from tests.sql import fetch, fetchval
from tests.support import ROOT, ServiceProcess, free_port


@pytest.fixture(scope="module")
def bucket(stack_info: StackInfo) -> Iterator[Bucket]:
    b = Bucket(stack_info).create()
    yield b
    b.drop()


@pytest.fixture(scope="module")
def env(service_env: dict[str, str], bucket: Bucket) -> dict[str, str]:
    return {**service_env, "STEPLOG_S3_BUCKET": bucket.name}


@pytest.fixture
def workspace() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


def metric(port: int, sample: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not on /metrics")


def quota_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "quota", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def scalars(
    run_id: str, name: str, steps: list[int], writer: str, seq: int, ws: str
) -> pb.WriteRequest:
    return pb.WriteRequest(
        workspace=ws,
        batch=pb.Batch(
            writer_id=writer,
            sequence=seq,
            series=[
                pb.RunSeries(
                    run_id=run_id,
                    series=data_pb2.SeriesData(
                        name=name,
                        scalars=data_pb2.ScalarColumns(
                            steps=steps, values=[float(s) for s in steps]
                        ),
                    ),
                )
            ],
        ),
    )


def retry_delay(err: grpc.RpcError) -> float | None:
    """The RetryInfo delay in a status's details, if there is one."""
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def count_points(database_url: str, run_id: str) -> tuple[int, int]:
    """(points stored, distinct (series, step)) of a run."""
    row = fetch(
        database_url,
        "SELECT count(*) AS n, count(DISTINCT (p.series_id, p.step)) AS d"
        " FROM scalar_points p JOIN series s USING (series_id) WHERE s.run_id = $1",
        run_id,
    )[0]
    return row["n"], row["d"]


# -- rates -----------------------------------------------------------------------------------


def test_a_writer_over_its_points_quota_slows_down_and_loses_nothing(
    env: dict[str, str],
    workspace: str,
    experiment_name: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rate, n, batch = 1000, 8000, 2500
    # Batches of at most 2,500 points: a batch larger than a second's worth
    # passes alone on a full bucket, so the batch size bounds the burst.
    monkeypatch.setenv("STEPLOG_MAX_BATCH_POINTS", str(batch))
    mport = free_port()
    extra = {"STEPLOG_QUOTA_POINTS_PER_S": str(rate)}
    with ServiceProcess(env, metrics_port=mport, extra_env=extra) as svc:
        run = Experiment(workspace, experiment_name, url=svc.address).start_logging()
        started = time.monotonic()
        for step in range(n // 2):
            run.log("loss", 1.0 / (step + 1), step=step)
            run.log("acc", step / n, step=step)
        assert run.flush(120)
        elapsed = time.monotonic() - started
        # A second's worth and one batch pass at once; the rest at the quota's pace.
        assert elapsed >= 0.8 * (n - rate - batch) / rate, elapsed
        stats = run.writer_stats()
        assert stats.refused == 0 and stats.dropped == 0, stats
        assert stats.points_acked == n, stats
        assert count_points(database_url, run.id) == (n, n)  # every point, exactly once
        shed = metric(mport, 'steplog_quota_exceeded_total{quota="points_per_s"}')
        assert shed > 0  # the client was told to slow down, and did
        run.complete()


def test_over_a_rate_quota_the_answer_carries_retry_info(
    env: dict[str, str], workspace: str, experiment_name: str, database_url: str
) -> None:
    # The service's default is unlimited; the workspace's own quota is set by the CLI.
    out = quota_cli(env, "set", "--workspace", workspace, "--points-per-s", "100")
    assert workspace in out and "\t100\t" in out
    with ServiceProcess(env) as svc:
        run = Experiment(workspace, experiment_name, url=svc.address).start_logging()
        stub = ingest_stub(svc.address)
        writer = f"w-{uuid.uuid4().hex[:8]}"
        # A full bucket takes one large batch; the next must wait about 9 s.
        ok = stub.Write(scalars(run.id, "x", list(range(1000)), writer, 1, workspace), timeout=30)
        assert ok.result.accepted == 1000
        with pytest.raises(grpc.RpcError) as err:
            stub.Write(scalars(run.id, "x", [1000, 1001], writer, 2, workspace), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "points-per-second quota" in (err.value.details() or "")
        delay = retry_delay(err.value)
        assert delay is not None and 7 < delay <= 10, delay
        # On the stream too.
        with pytest.raises(grpc.RpcError) as err:
            request = pb.IngestRequest(
                workspace=workspace, batch=scalars(run.id, "x", [1000], writer, 2, workspace).batch
            )
            list(stub.Ingest(iter([request]), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay(err.value) is not None
        assert count_points(database_url, run.id) == (1000, 1000)
        # Another workspace is not held back by this one's quota.
        other = Experiment(f"{workspace}-b", experiment_name, url=svc.address).start_logging()
        ok = stub.Write(
            scalars(other.id, "x", list(range(1000)), writer + "b", 1, f"{workspace}-b")
        )
        assert ok.result.accepted == 1000
        assert stub.Write(scalars(other.id, "x", [1000], writer + "b", 2, f"{workspace}-b"))


# -- hard quotas ------------------------------------------------------------------------------


def test_the_runs_quota_refuses_a_new_run_and_names_the_quota(
    env: dict[str, str], workspace: str, experiment_name: str, database_url: str
) -> None:
    with ServiceProcess(env, extra_env={"STEPLOG_QUOTA_RUNS": "2"}) as svc:
        exp = Experiment(workspace, experiment_name, url=svc.address)
        first = exp.start_logging()
        exp.start_logging()
        client = Client(svc.address, workspace)
        with pytest.raises(grpc.RpcError) as err:
            client.runs.CreateRun(
                rs.CreateRunRequest(workspace=workspace, experiment_name=experiment_name),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "runs quota" in (err.value.details() or "")
        assert retry_delay(err.value) is None  # waiting does not help
        count = "SELECT count(*) FROM runs WHERE workspace = $1"
        assert fetchval(database_url, count, workspace) == 2
        # An existing run is still got, not created (idempotent create).
        again = client.runs.CreateRun(
            rs.CreateRunRequest(
                workspace=workspace, experiment_name=experiment_name, run_id=first.id
            ),
            timeout=30,
        )
        assert again.run.run_id == first.id
        # The workspace's own quota (CLI) lifts it at once.
        quota_cli(env, "set", "--workspace", workspace, "--runs", "3")
        exp.start_logging()
        assert fetchval(database_url, count, workspace) == 3
        out = quota_cli(env, "show", "--workspace", workspace)
        assert out.splitlines()[1].split("\t")[3] == "3"  # runs
        assert out.splitlines()[1].split("\t")[6] == "3"  # used_runs


def test_the_series_quota_rejects_new_series_and_keeps_the_rest(
    env: dict[str, str], workspace: str, experiment_name: str, database_url: str
) -> None:
    with ServiceProcess(env, extra_env={"STEPLOG_QUOTA_SERIES": "3"}) as svc:
        run = Experiment(workspace, experiment_name, url=svc.address).start_logging()
        stub = ingest_stub(svc.address)
        writer = f"w-{uuid.uuid4().hex[:8]}"
        batch = scalars(run.id, "s0", [0], writer, 1, workspace)
        for i in range(1, 5):
            batch.batch.series.append(
                pb.RunSeries(
                    run_id=run.id,
                    series=data_pb2.SeriesData(
                        name=f"s{i}", scalars=data_pb2.ScalarColumns(steps=[0], values=[1.0])
                    ),
                )
            )
        reply = stub.Write(batch, timeout=30)
        assert reply.result.accepted == 3 and reply.result.rejected == 2
        assert [c.reason for c in reply.result.reject_counts] == [pb.REJECT_REASON_LIMIT_EXCEEDED]
        assert "series quota" in reply.result.rejected_points[0].message
        assert fetchval(database_url, "SELECT count(*) FROM series WHERE run_id = $1", run.id) == 3
        # The series the workspace has keep taking points.
        reply = stub.Write(scalars(run.id, "s0", [1], writer, 2, workspace), timeout=30)
        assert reply.result.accepted == 1
        # A second run of the workspace cannot add one either.
        run2 = Experiment(workspace, experiment_name, url=svc.address).start_logging()
        reply = stub.Write(scalars(run2.id, "t", [0], writer, 3, workspace), timeout=30)
        assert (
            reply.result.rejected == 1 and "series quota" in reply.result.rejected_points[0].message
        )


def test_the_stored_bytes_quota_refuses_images_and_files_before_s3(
    env: dict[str, str],
    bucket: Bucket,
    workspace: str,
    experiment_name: str,
    database_url: str,
) -> None:
    small = imagegen.png(4, 4, seed=int(uuid.uuid4().int % 10**9))
    big = imagegen.png_of_size(30_000, seed=int(uuid.uuid4().int % 10**9))
    quota = len(small) + 10_000
    with ServiceProcess(env, extra_env={"STEPLOG_QUOTA_STORED_BYTES": str(quota)}) as svc:
        run = Experiment(workspace, experiment_name, url=svc.address).start_logging()
        stub = ingest_stub(svc.address)
        writer = f"w-{uuid.uuid4().hex[:8]}"
        reply = stub.Write(image_batch(run.id, "a", [small], [0], writer, 1, workspace))
        assert reply.result.accepted == 1
        before = bucket.keys()
        reply = stub.Write(image_batch(run.id, "b", [big], [0], writer, 2, workspace))
        assert [c.reason for c in reply.result.reject_counts] == [pb.REJECT_REASON_LIMIT_EXCEEDED]
        assert "stored-bytes quota" in reply.result.rejected_points[0].message
        data = os.urandom(20_000)
        with pytest.raises(grpc.RpcError) as err:
            artifacts_stub(svc.address).UploadArtifact(
                upload_requests(run.id, "f.bin", data, workspace, size=len(data), sha256=sha(data)),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stored-bytes quota" in (err.value.details() or "")
        assert bucket.keys() == before  # neither the image nor the file reached S3
        # Without a declared size the bytes arrive, and the row is refused all the same
        # (the sweep removes the blob).
        with pytest.raises(grpc.RpcError) as err:
            artifacts_stub(svc.address).UploadArtifact(
                upload_requests(run.id, "g.bin", data, workspace), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sha(big) not in bucket.blobs()
        assert not fetch(database_url, "SELECT 1 FROM artifacts WHERE run_id = $1", run.id)
        used = fetchval(
            database_url, "SELECT stored_bytes FROM workspace_usage WHERE workspace = $1", workspace
        )
        assert used == len(small)
        # A small file still fits.
        tiny = os.urandom(1000)
        artifacts_stub(svc.address).UploadArtifact(
            upload_requests(run.id, "t.bin", tiny, workspace, size=len(tiny)), timeout=30
        )
        assert (
            fetchval(
                database_url,
                "SELECT stored_bytes FROM workspace_usage WHERE workspace = $1",
                workspace,
            )
            == len(small) + 1000
        )
