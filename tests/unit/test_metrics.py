"""The service's metrics on a fresh registry: names, S3 timing and error kinds."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ingest.observe.metrics import S3_ERROR_KINDS, Metrics, s3_error_kind


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def test_metrics_live_on_the_injected_registry(metrics: Metrics) -> None:
    other = Metrics(CollectorRegistry())  # a second instance: no duplicate-name clash
    metrics.points.labels("scalar", "accepted").inc(3)
    r = metrics.registry
    accepted = {"kind": "scalar", "outcome": "accepted"}
    assert r.get_sample_value("steplog_ingest_points_total", accepted) == 3
    assert other.registry.get_sample_value("steplog_ingest_points_total", accepted) is None
    assert r.get_sample_value("steplog_build_info", {"version": _version(r)}) == 1
    assert r.get_sample_value("process_cpu_seconds_total") is not None


def _version(registry: CollectorRegistry) -> str:
    for family in registry.collect():
        if family.name == "steplog_build":
            return family.samples[0].labels["version"]
    raise AssertionError("no steplog_build_info")


def test_names_follow_prometheus_conventions(metrics: Metrics) -> None:
    types = {f.name: f.type for f in metrics.registry.collect() if f.name.startswith("steplog_")}
    for family in metrics.registry.collect():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
    for name, kind in types.items():
        assert re.fullmatch(r"steplog(_[a-z0-9]+)+", name), name
        if kind == "histogram":
            assert name.endswith(("_seconds", "_batches")), name
    expected = {
        "steplog_ingest_points": "counter",
        "steplog_ingest_rejected_points": "counter",
        "steplog_ingest_queue_bytes": "gauge",
        "steplog_s3_operation_duration_seconds": "histogram",
        "steplog_s3_errors": "counter",
        "steplog_grpc_server_handling_seconds": "histogram",
        "steplog_grpc_server_handled": "counter",
        "steplog_grpc_server_started": "counter",
        "steplog_progress_refresh_errors": "counter",
        "steplog_progress_refresh_duration_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, name
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE steplog_ingest_points_total counter" in text


def test_s3_call_times_successes(metrics: Metrics) -> None:
    with metrics.s3_call("put_object"):
        pass
    r = metrics.registry
    labels = {"operation": "put_object"}
    assert r.get_sample_value("steplog_s3_operation_duration_seconds_count", labels) == 1
    assert r.get_sample_value("steplog_s3_errors_total", {**labels, "kind": "other"}) is None


def test_s3_call_counts_failures_by_kind(metrics: Metrics) -> None:
    with pytest.raises(ConnectionRefusedError), metrics.s3_call("upload_part"):
        raise ConnectionRefusedError("no S3 here")
    r = metrics.registry
    labels = {"operation": "upload_part"}
    assert r.get_sample_value("steplog_s3_errors_total", {**labels, "kind": "unavailable"}) == 1
    assert r.get_sample_value("steplog_s3_operation_duration_seconds_count", labels) == 1


def test_s3_call_does_not_count_cancellation_as_an_error(metrics: Metrics) -> None:
    with pytest.raises(asyncio.CancelledError), metrics.s3_call("get_object"):
        raise asyncio.CancelledError
    for kind in S3_ERROR_KINDS:
        labels = {"operation": "get_object", "kind": kind}
        assert metrics.registry.get_sample_value("steplog_s3_errors_total", labels) is None


class ClientError(Exception):
    """Shaped like botocore's: the parsed response rides on the exception."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    pass


class ConnectTimeoutError(EndpointConnectionError):
    pass


@pytest.mark.parametrize(
    "exc,kind",
    [
        (ClientError("NoSuchKey", 404), "not_found"),
        (ClientError("NoSuchUpload", 404), "not_found"),
        (ClientError("AccessDenied", 403), "client"),
        (ClientError("SlowDown", 503), "server"),
        (ClientError("WeirdNewCode", 500), "server"),
        (EndpointConnectionError("down"), "unavailable"),
        (ConnectTimeoutError("slow"), "timeout"),
        (TimeoutError(), "timeout"),
        (OSError("reset"), "unavailable"),
        (ValueError("bug"), "other"),
    ],
)
def test_s3_error_kinds_are_a_fixed_set(exc: BaseException, kind: str) -> None:
    assert s3_error_kind(exc) == kind
    assert kind in S3_ERROR_KINDS
