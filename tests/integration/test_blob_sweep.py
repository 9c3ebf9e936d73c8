"""Blobs only for active runs, and the sweep of unreferenced blobs, against
the real service, TimescaleDB and S3. Each test module uses a bucket of its
own: the shared bucket holds other sessions' blobs, which a sweep from this
session's database would see as unreferenced."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest

from ingest.devstack import StackInfo
from steplog import Experiment, Run
from steplog.v1 import ingest_service_pb2 as pb
from tests import imagegen
from tests.blobtools import (
    Bucket,
    artifacts_stub,
    image_batch,
    ingest_stub,
    sha,
    upload_requests,
    wait_until,
)
from tests.sql import fetch
from tests.support import ROOT, ServiceProcess, free_port


@pytest.fixture(scope="module")
def bucket(stack_info: StackInfo) -> Iterator[Bucket]:
    b = Bucket(stack_info).create()
    yield b
    b.drop()


@pytest.fixture(scope="module")
def env(service_env: dict[str, str], bucket: Bucket) -> dict[str, str]:
    return {**service_env, "STEPLOG_S3_BUCKET": bucket.name}


def new_run(url: str, experiment_name: str) -> Run:
    return Experiment(experiment_name, url=url).start_logging()


def metric(port: int, sample: str) -> float:
    """One sample of /metrics, e.g. 'steplog_blob_sweep_runs_total{outcome="done"}'."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not on /metrics")


def referenced(database_url: str, run_ids: list[str]) -> set[str]:
    """The blobs the rows of these runs point to (image points and files)."""
    rows = fetch(
        database_url,
        "SELECT i.sha256 FROM image_points i JOIN series s USING (series_id)"
        " WHERE s.run_id = ANY($1::text[])"
        " UNION SELECT sha256 FROM artifacts WHERE run_id = ANY($1::text[])",
        run_ids,
    )
    return {r["sha256"] for r in rows}


def sweep_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", "sweep-blobs", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- blobs only for active runs --------------------------------------------------------------


def test_image_batches_for_missing_or_completed_runs_store_no_blob(
    env: dict[str, str], bucket: Bucket, experiment_name: str, database_url: str
) -> None:
    with ServiceProcess(env) as svc:
        stub = ingest_stub(svc.address)
        done = new_run(svc.address, experiment_name)
        done.complete()
        live = new_run(svc.address, experiment_name)
        before = bucket.keys()
        missing_img = imagegen.png(5, 5, seed=random.randrange(10**9))
        done_img = imagegen.png(6, 5, seed=random.randrange(10**9))
        ok_img = imagegen.png(7, 5, seed=random.randrange(10**9))
        writer = f"w-{uuid.uuid4().hex[:8]}"

        reply = stub.Write(image_batch("no-such-run", "img", [missing_img], [1], writer, 1))
        assert [c.reason for c in reply.result.reject_counts] == [pb.REJECT_REASON_RUN_NOT_FOUND]
        reply = stub.Write(image_batch(done.id, "img", [done_img], [1], writer, 2))
        assert [c.reason for c in reply.result.reject_counts] == [pb.REJECT_REASON_RUN_NOT_ACTIVE]
        assert "Completed" in reply.result.rejected_points[0].message
        assert bucket.keys() == before  # not one byte went to S3

        # An active run's image is stored (the check is not a blanket refusal).
        reply = stub.Write(image_batch(live.id, "img", [ok_img], [1], writer, 3))
        assert reply.result.accepted == 1
        assert set(bucket.keys()) - set(before) == {
            f"blobs/sha256/{sha(ok_img)[:2]}/{sha(ok_img)[2:]}"
        }

        # A file upload to a completed run stores nothing, declared hash or not.
        data = os.urandom(300_000)
        before = bucket.keys()
        for header in ({"sha256": sha(data), "size": len(data)}, {}):
            with pytest.raises(grpc.RpcError) as err:
                artifacts_stub(svc.address).UploadArtifact(
                    upload_requests(done.id, "late.bin", data, **header), timeout=30
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "Completed" in (err.value.details() or "")
        assert bucket.keys() == before
        assert not fetch(database_url, "SELECT 1 FROM artifacts WHERE run_id = $1", done.id)
        live.complete()


# -- the sweep -------------------------------------------------------------------------------


def test_sweep_deletes_unreferenced_blobs_and_keeps_referenced_ones(
    env: dict[str, str], bucket: Bucket, experiment_name: str, database_url: str
) -> None:
    grace = {"STEPLOG_BLOB_SWEEP_GRACE_S": "5"}
    with ServiceProcess(env, extra_env=grace) as svc:
        stub = ingest_stub(svc.address)
        run = new_run(svc.address, experiment_name)
        writer = f"w-{uuid.uuid4().hex[:8]}"
        kept_img, lost_img = (imagegen.png(8, 8, seed=random.randrange(10**9)) for _ in range(2))
        assert stub.Write(image_batch(run.id, "img", [kept_img], [5], writer, 1)).result.accepted
        # Step 3 after step 5: rejected by the step rules, after its blob was stored.
        reply = stub.Write(image_batch(run.id, "img", [lost_img], [3], writer, 2))
        assert reply.result.rejected == 1
        kept_file, lost_file = os.urandom(200_000), os.urandom(200_000)
        files = artifacts_stub(svc.address)
        files.UploadArtifact(upload_requests(run.id, "a.bin", kept_file), timeout=30)
        # Other content at the same path without overwrite: stored, then refused.
        with pytest.raises(grpc.RpcError) as err:
            files.UploadArtifact(upload_requests(run.id, "a.bin", lost_file), timeout=30)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        stored = bucket.blobs()
        assert {sha(kept_img), sha(lost_img), sha(kept_file), sha(lost_file)} <= stored

        # Within the grace period nothing goes.
        stored_at = time.monotonic()
        result = sweep_cli({**env, **grace})
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - stored_at < 5, "the check ran too late to mean anything"
        assert bucket.blobs() >= {sha(lost_img), sha(lost_file)}
        time.sleep(max(0.0, 5.2 - (time.monotonic() - stored_at)))
        dry = sweep_cli({**env, **grace}, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would delete" in dry.stdout
        assert bucket.blobs() >= {sha(lost_img), sha(lost_file)}
        result = sweep_cli({**env, **grace})
        assert result.returncode == 0, result.stderr
        after = bucket.blobs()
        assert sha(lost_img) not in after and sha(lost_file) not in after
        assert {sha(kept_img), sha(kept_file)} <= after
        assert referenced(database_url, [run.id]) <= after
        # The kept ones still read back.
        assert run.get_file_names() == ["a.bin"]
        run.complete()


def test_sweep_raced_against_uploads_never_deletes_a_committed_rows_blob(
    env: dict[str, str], bucket: Bucket, experiment_name: str, database_url: str
) -> None:
    """Each round stores new content as garbage (an image point the step
    rules refuse, a file refused at a taken path), waits about as long as the
    grace period, so the sweep (every 0.2 s, grace 1 s) may be deleting it
    right then, and stores it again in a row that commits. The sweep runs in
    a second service process (a replica), so the writers' process knows
    nothing of what it deletes. Many rounds in parallel; afterwards every
    committed row's blob is in the bucket, and the sweep did delete blobs
    meanwhile (the race was run, not avoided)."""
    mport = free_port()
    grace = {"STEPLOG_BLOB_SWEEP_GRACE_S": "1"}
    sweeping = {**grace, "STEPLOG_BLOB_SWEEP_INTERVAL_S": "0.2"}
    stop = threading.Event()
    errors: list[BaseException] = []
    runs: list[str] = []
    rounds = [0]
    with (
        ServiceProcess(env, extra_env=grace) as svc,
        ServiceProcess(env, metrics_port=mport, extra_env=sweeping),
    ):

        def image_writer(k: int) -> None:
            r = random.Random(k)
            stub = ingest_stub(svc.address)
            run = new_run(svc.address, experiment_name)
            runs.append(run.id)
            writer, seq, step = f"img-{k}-{uuid.uuid4().hex[:6]}", 0, 1_000_000
            try:
                while not stop.is_set():
                    img = imagegen.png(6, 6, seed=r.randrange(10**12))
                    seq += 1
                    # A step below the last: refused after its blob was stored.
                    reply = stub.Write(
                        image_batch(run.id, "img", [img], [0], writer, seq), timeout=30
                    )
                    assert reply.result.rejected == 1 or seq == 1, reply
                    time.sleep(r.uniform(0.7, 1.6))
                    seq += 1
                    step += 1
                    reply = stub.Write(
                        image_batch(run.id, "img", [img], [step], writer, seq), timeout=30
                    )
                    assert reply.result.accepted == 1, reply
                    rounds[0] += 1
            except BaseException as exc:
                errors.append(exc)

        def file_writer(k: int) -> None:
            r = random.Random(100 + k)
            files = artifacts_stub(svc.address)
            run = new_run(svc.address, experiment_name)
            runs.append(run.id)
            files.UploadArtifact(upload_requests(run.id, "taken.bin", b"first"), timeout=30)
            n = 0
            try:
                while not stop.is_set():
                    n += 1
                    data = os.urandom(50_000 + r.randrange(100_000))
                    with pytest.raises(grpc.RpcError) as err:
                        files.UploadArtifact(upload_requests(run.id, "taken.bin", data), timeout=30)
                    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
                    time.sleep(r.uniform(0.7, 1.6))
                    header = {"sha256": sha(data)} if n % 2 else {}
                    files.UploadArtifact(
                        upload_requests(run.id, f"f{n}.bin", data, **header), timeout=30
                    )
                    rounds[0] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=image_writer, args=(k,)) for k in range(3)]
        threads += [threading.Thread(target=file_writer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(
                lambda: (
                    bool(errors)
                    or (rounds[0] >= 60 and metric(mport, "steplog_blob_sweep_deleted_total") >= 15)
                ),
                150,
                "60 rounds and 15 blobs deleted by the sweep",
            )
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors
        assert metric(mport, 'steplog_blob_sweep_runs_total{outcome="done"}') > 0
        assert metric(mport, "steplog_blob_sweep_deleted_bytes_total") > 0
        rows = referenced(database_url, runs)
        assert len(rows) >= 60
        missing = rows - bucket.blobs()
        assert not missing, f"{len(missing)} committed rows point to deleted blobs"
