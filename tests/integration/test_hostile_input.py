"""Untrusted input against the real service: each reproduction from issue 9
("nothing from a client is trusted before it is checked") as a test.

- NUL in a series description, a run id, a text value: a per-point rejection
  with its own reason; the writer goes on and its later points are stored.
- NUL (or a control character) in any string field of a query or metadata
  request: INVALID_ARGUMENT with a BadRequest detail naming the field.
- Garbage bytes and invalid UTF-8: INVALID_ARGUMENT, never UNKNOWN.
- A 60-byte table batch claiming two billion rows: rejected at once, the
  service's memory barely moves.
- A 4 MiB name: the answer names it in a few hundred bytes, not 80 MB.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from steplog import Experiment
from steplog.v1 import (
    artifact_service_pb2,
    common_pb2,
    data_pb2,
    experiment_service_pb2,
    ingest_service_pb2_grpc,
    query_service_pb2,
    run_service_pb2,
)
from steplog.v1 import ingest_service_pb2 as pb
from tests.sql import fetchval
from tests.support import ServiceProcess

pytestmark = pytest.mark.integration


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def channel(url: str) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(url)
    yield ch
    ch.close()


@pytest.fixture
def run(url: str, experiment_name: str) -> Any:
    yield Experiment(experiment_name, url=url).start_logging()


def _violation(err: grpc.RpcError) -> str:
    """The field named by the BadRequest detail of a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return str(bad.field_violations[0].field)
    raise AssertionError(f"no BadRequest detail in {status}")


def _write(client: Any, *series: pb.RunSeries, seq: int = 1, writer: str = "") -> Any:
    """Write on a Client (its .ingest stub) or an IngestService stub."""
    stub = getattr(client, "ingest", client)
    return stub.Write(
        pb.WriteRequest(
            batch=pb.Batch(
                writer_id=writer or f"h-{uuid.uuid4().hex}", sequence=seq, series=list(series)
            )
        ),
        timeout=30,
    )


def _scalars(run_id: str, name: str, steps: list[int], **kw: Any) -> pb.RunSeries:
    values = kw.pop("values", [float(s) for s in steps])
    return pb.RunSeries(
        run_id=run_id,
        series=data_pb2.SeriesData(
            name=name, scalars=data_pb2.ScalarColumns(steps=steps, values=values), **kw
        ),
    )


def _count(database_url: str, run_id: str, name: str, table: str = "scalar_points") -> int:
    return int(
        fetchval(
            database_url,
            f"SELECT count(*) FROM {table} p JOIN series s USING (series_id)"
            " WHERE s.run_id = $1 AND s.name = $2",
            run_id,
            name,
        )
    )


# -- NUL in ingest batches: a rejection with a reason, never a failed commit ------------


def test_nul_in_a_description_does_not_stall_the_writer(run: Any, database_url: str) -> None:
    """The issue's reproduction: after this one call, 0 of the next 1,000
    points were stored and run.complete() never returned."""
    run.log("bad", 1.0, description="a\x00b", step=0)
    for step in range(1000):
        run.log("loss", 1.0 / (step + 1), step=step)
    assert run.flush(60)
    assert _count(database_url, run.id, "loss") == 1000
    assert _count(database_url, run.id, "bad") == 0
    (rejection,) = [r for r in run.rejections() if r.name == "bad"]
    assert rejection.reason == "INVALID_VALUE" and "description" in rejection.message
    run.complete()
    assert run.get_status() == "Completed"


def test_nul_in_run_ids_and_text_values_is_rejected_per_series(run: Any, database_url: str) -> None:
    client = run._client
    result = _write(
        client,
        _scalars("run\x00x", "a", [0, 1]),
        _scalars(run.id + "\n", "a", [0]),
        _scalars(run.id, "ok", [0, 1, 2]),
        pb.RunSeries(
            run_id=run.id,
            series=data_pb2.SeriesData(
                name="note", scalars=data_pb2.ScalarColumns(text_values=["fine", "a\x00b"])
            ),
        ),
    ).result
    reasons = {c.reason: c.count for c in result.reject_counts}
    assert reasons == {pb.REJECT_REASON_RUN_NOT_FOUND: 3, pb.REJECT_REASON_INVALID_VALUE: 1}
    assert result.accepted == 4
    nul = [p for p in result.rejected_points if p.reason == pb.REJECT_REASON_INVALID_VALUE]
    assert "NUL" in nul[0].message and nul[0].name == "note" and nul[0].index == 1
    assert (
        _count(database_url, run.id, "ok") == 3
        and _count(database_url, run.id, "note", "text_points") == 1
    )


def test_a_bad_batch_does_not_fail_its_neighbours(url: str, run: Any, database_url: str) -> None:
    """Writers whose batches share a group commit with a hostile one all
    commit (the hostile strings never reach SQL)."""
    import threading

    errors: list[BaseException] = []

    def writer(i: int) -> None:
        with grpc.insecure_channel(url) as ch:
            _neighbour(ch, i)

    def _neighbour(ch: grpc.Channel, i: int) -> None:
        c = ingest_service_pb2_grpc.IngestServiceStub(ch)
        try:
            hostile = [
                _scalars(run.id, f"d{i}", [0], description="x\x00"),
                _scalars(run.id, "l", [0], labels={"k": "v\x00"}),
                _scalars("\x00", "x", [0]),
            ]
            for seq in range(1, 6):
                _write(
                    c,
                    *hostile,
                    _scalars(run.id, f"w{i}", [seq]),
                    seq=seq,
                    writer=f"nb-{i}-{run.id}",
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(6):
        assert _count(database_url, run.id, f"w{i}") == 5


# -- NUL and control characters in unary requests: INVALID_ARGUMENT naming the field ---

_RUN = "run-does-not-matter"


def _unary_cases() -> list[tuple[str, str, Message, str]]:
    q, r, e, a = query_service_pb2, run_service_pb2, experiment_service_pb2, artifact_service_pb2
    tag = common_pb2.Tag
    return [
        (
            "RunService",
            "ListRuns",
            r.ListRunsRequest(experiment_name="e", run_type="a\x00"),
            "run_type",
        ),
        ("QueryService", "ReadSeries", q.ReadSeriesRequest(run_id=_RUN, name="lo\x00ss"), "name"),
        (
            "QueryService",
            "ReadSeries",
            q.ReadSeriesRequest(run_id=_RUN, name="x", labels={"k": "\x00"}),
            "labels[k]",
        ),
        (
            "QueryService",
            "GetMetrics",
            q.GetMetricsRequest(run_id=_RUN, names=["ok", "a\x00b"]),
            "names[1]",
        ),
        ("QueryService", "ListSeries", q.ListSeriesRequest(run_id="r\x00"), "run_id"),
        ("RunService", "RewindRun", r.RewindRunRequest(run_id=_RUN, names=["a\x00"]), "names[0]"),
        (
            "RunService",
            "RewindRun",
            r.RewindRunRequest(run_id=_RUN, names=["tab\there"]),
            "names[0]",
        ),
        (
            "RunService",
            "CreateRun",
            r.CreateRunRequest(experiment_name="e", description="d\x00"),
            "description",
        ),
        (
            "RunService",
            "CreateRun",
            r.CreateRunRequest(experiment_name="e", display_name="\x00"),
            "display_name",
        ),
        (
            "RunService",
            "CreateRun",
            r.CreateRunRequest(experiment_name="e", properties={"k": "v\x00"}),
            "properties[k]",
        ),
        (
            "RunService",
            "UpdateRunStatus",
            r.UpdateRunStatusRequest(
                run_id=_RUN, status=7, error=common_pb2.RunError(message="m\x00")
            ),
            "error.message",
        ),
        ("RunService", "Heartbeat", r.HeartbeatRequest(run_ids=["ok", "r\x00"]), "run_ids[1]"),
        (
            "RunService",
            "UpdateRunTags",
            r.UpdateRunTagsRequest(run_id=_RUN, set_tags=[tag(key="k", value="\x00")]),
            "set_tags[0].value",
        ),
        (
            "ExperimentService",
            "GetOrCreateExperiment",
            e.GetOrCreateExperimentRequest(name="e", tags=[tag(key="k\x00")]),
            "tags[0].key",
        ),
        (
            "ExperimentService",
            "ListExperiments",
            e.ListExperimentsRequest(name_prefix="p\x00"),
            "name_prefix",
        ),
        (
            "ExperimentService",
            "GetExperiment",
            e.GetExperimentRequest(workspace="w\x00", name="e"),
            "workspace",
        ),
        (
            "ArtifactService",
            "ListArtifacts",
            a.ListArtifactsRequest(run_id=_RUN, prefix="a\x00"),
            "prefix",
        ),
    ]


@pytest.mark.parametrize(
    "svc,method,request_,field",
    _unary_cases(),
    ids=[f"{c[1]}.{c[3]}" for c in _unary_cases()],
)
def test_nul_in_any_field_is_invalid_argument_naming_it(
    channel: grpc.Channel, svc: str, method: str, request_: Message, field: str
) -> None:
    call = channel.unary_unary(
        f"/steplog.v1.{svc}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        call(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert _violation(err.value) == field
    assert field in err.value.details()


def test_nul_in_an_upload_header_and_download_is_invalid_argument(channel: grpc.Channel) -> None:
    a = artifact_service_pb2
    upload = channel.stream_unary(
        "/steplog.v1.ArtifactService/UploadArtifact",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    header = a.UploadArtifactHeader(run_id=_RUN, path="a\x00b", size=1)
    with pytest.raises(grpc.RpcError) as err:
        upload(iter([a.UploadArtifactRequest(header=header)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violation(err.value) == "header.path"
    download = channel.unary_stream(
        "/steplog.v1.ArtifactService/DownloadArtifact",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(download(a.DownloadArtifactRequest(run_id="r\x01", path="x"), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violation(err.value) == "run_id"


# -- malformed protobuf and invalid UTF-8: INVALID_ARGUMENT, never UNKNOWN -------------

_UNARY_METHODS = [
    "/steplog.v1.ExperimentService/GetOrCreateExperiment",
    "/steplog.v1.ExperimentService/ListExperiments",
    "/steplog.v1.RunService/CreateRun",
    "/steplog.v1.RunService/GetRun",
    "/steplog.v1.RunService/ListRuns",
    "/steplog.v1.RunService/RewindRun",
    "/steplog.v1.QueryService/GetMetrics",
    "/steplog.v1.QueryService/ReadSeries",
    "/steplog.v1.ArtifactService/ListArtifacts",
    "/steplog.v1.IngestService/Write",
]
# A string field (number 2, length-delimited) holding bytes that are not UTF-8,
# and bytes that are no protobuf at all (a truncated length, a bad wire type).
_INVALID_UTF8 = b"\x12\x02\xc3\x28"
_GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x7f", b"\x0f", _INVALID_UTF8]


def _raw(channel: grpc.Channel, method: str) -> Callable[..., Any]:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    return channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)


@pytest.mark.parametrize("method", _UNARY_METHODS)
def test_garbage_bytes_and_invalid_utf8_are_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    call = _raw(channel, method)
    for data in _GARBAGE:
        with pytest.raises(grpc.RpcError) as err:
            call(data, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, err.value.details())
        details = err.value.details() or ""
        assert "Unexpected" not in details and "<class" not in details
        assert "malformed" in details or "not a valid" in details, details


def test_invalid_utf8_in_a_field_says_so(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _raw(channel, "/steplog.v1.RunService/GetRun")(_INVALID_UTF8, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (err.value.details() or "")


def test_garbage_in_a_stream_ends_it_with_invalid_argument(channel: grpc.Channel) -> None:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    upload = channel.stream_unary(
        "/steplog.v1.ArtifactService/UploadArtifact",
        request_serializer=identity,
        response_deserializer=identity,
    )
    with pytest.raises(grpc.RpcError) as err:
        upload(iter([b"\xff\xff\xff"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ingest = channel.stream_stream(
        "/steplog.v1.IngestService/Ingest",
        request_serializer=identity,
        response_deserializer=identity,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(ingest(iter([b"\x12\x02\xc3\x28"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_service_still_answers_after_all_that(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    run.log("after", 1.0, step=1)
    run.complete()
    assert run.get_metrics()["after"] == 1.0


# -- counts trusted before they were checked ----------------------------------------


def test_a_60_byte_table_batch_is_rejected_without_allocating(
    run: Any, service: ServiceProcess
) -> None:
    """The issue's reproduction: a ~60-byte table batch took the service from
    0.6 to 1.3 GiB and blocked it for 3 s; eight held 2.8 GiB."""
    assert service.proc is not None
    pid = service.proc.pid
    client = run._client
    series = pb.RunSeries(
        run_id=run.id,
        series=data_pb2.SeriesData(name="t", table=data_pb2.TableColumns(row_count=2**31 - 1)),
    )
    request = pb.WriteRequest(batch=pb.Batch(writer_id="w-table", sequence=1, series=[series]))
    # About 60 bytes: most of it is the run id.
    assert request.ByteSize() - len(run.id) <= 40
    before = _rss_kib(pid)
    peak = before
    for _ in range(8):
        request.batch.writer_id = f"t-{uuid.uuid4().hex}"
        started = time.monotonic()
        result = client.ingest.Write(request, timeout=30).result
        assert time.monotonic() - started < 2.0
        peak = max(peak, _rss_kib(pid))
        assert [(c.reason, c.count) for c in result.reject_counts] == [
            (pb.REJECT_REASON_LIMIT_EXCEEDED, 2**31 - 1)
        ]
        assert "rows in one request" in result.rejected_points[0].message
    assert peak - before < 64 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"


def test_huge_names_come_back_clipped(run: Any) -> None:
    """A rejected point used to echo its full name, labels and run id up to 20
    times: a 4 MiB name made an 80 MB answer."""
    name = "n" * (4 * 1024 * 1024)
    series = [
        pb.RunSeries(
            run_id=run.id,
            series=data_pb2.SeriesData(
                name=name,
                labels={"k": "v" * 1000},
                scalars=data_pb2.ScalarColumns(values=[float(i) for i in range(25)]),
            ),
        )
    ]
    response = _write(run._client, *series)
    assert response.result.rejected == 25
    assert response.ByteSize() < 64 * 1024
    point = response.result.rejected_points[0]
    assert point.reason == pb.REJECT_REASON_INVALID_NAME
    assert point.name.startswith("nnn") and len(point.name) < 200
