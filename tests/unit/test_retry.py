"""The one retry table (steplog._retry) and the client's unary calls that
follow it (steplog.client.Client.call), against fake call objects."""

from __future__ import annotations

from collections.abc import Iterator
from time import monotonic
from typing import Any

import grpc
import pytest

from steplog import client as client_module
from steplog._channel import ChannelSettings
from steplog._retry import is_transport_loss, retry_code, rule, should_retry
from steplog._writer.transport import TransportError
from steplog.client import Client, resend_safe, with_client_run_id
from steplog.errors import FailedPreconditionError, ServiceError, UnavailableError
from steplog.v1 import common_pb2
from steplog.v1 import experiment_service_pb2 as ex
from steplog.v1 import run_service_pb2 as rs

Code = grpc.StatusCode

# As gRPC reports them on the client (seen through nginx grpc_pass when the
# replica behind it is killed, and for other losses of the HTTP/2 stream).
LOST = [
    (Code.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"),
    (Code.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 0))"),
    (Code.INTERNAL, "Received RST_STREAM with error code 0"),
    (Code.INTERNAL, "Received unexpected EOS on DATA frame from server"),
    (Code.UNKNOWN, "Stream removed"),
    (Code.CANCELLED, "Received RST_STREAM with error code 8"),
    (Code.INTERNAL, "Internal error from Core"),  # grpc.aio: a write on a dead connection
]
# Statuses a service sent (or our own cancel): not transport loss.
ANSWERED = [
    (Code.INTERNAL, "commit failed; resend"),
    (Code.UNKNOWN, "Exception calling application: [Errno 104] Connection reset by peer"),
    (Code.INVALID_ARGUMENT, "stream removed"),  # not a code gRPC reports a lost stream with
    (Code.CANCELLED, "Locally cancelled by application!"),
    (Code.INTERNAL, ""),
]


@pytest.mark.parametrize(("code", "details"), LOST)
def test_a_lost_stream_is_transport_loss_retried_like_unavailable(code: Code, details: str) -> None:
    assert is_transport_loss(code, details)
    assert retry_code(code, details) == Code.UNAVAILABLE
    assert rule(code, details) == rule(Code.UNAVAILABLE)
    assert should_retry(code, retry_info=False, failures=1000, details=details)
    error = TransportError(code, details)
    assert error.retry_code == Code.UNAVAILABLE and error.retry_again(1000)


@pytest.mark.parametrize(("code", "details"), ANSWERED)
def test_a_status_the_service_sent_keeps_its_own_row(code: Code, details: str) -> None:
    assert not is_transport_loss(code, details)
    assert retry_code(code, details) == code
    error = TransportError(code, details)
    if code in (Code.INTERNAL, Code.UNKNOWN):  # a few times, then refused
        assert [error.retry_again(n) for n in (1, 2, 3)] == [True, True, False]
    else:
        assert not error.retryable


def test_the_rest_of_the_table() -> None:
    assert should_retry(Code.UNAVAILABLE, retry_info=False, failures=10**6)
    assert should_retry(Code.DEADLINE_EXCEEDED, retry_info=False, failures=10**6)
    assert should_retry(Code.RESOURCE_EXHAUSTED, retry_info=True, failures=50)
    assert not should_retry(Code.RESOURCE_EXHAUSTED, retry_info=False)
    assert [should_retry(Code.ABORTED, retry_info=False, failures=n) for n in (4, 5)] == [
        True,
        False,
    ]
    for code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.PERMISSION_DENIED, None):
        assert not should_retry(code, retry_info=True)


# ------------------------------------------------------------ unary calls


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: Code, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> Code:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


class Method:
    """A unary method that fails with `failures` (in order), then answers."""

    def __init__(self, failures: list[tuple[Code, str]], answer: Any = None) -> None:
        self.failures = list(failures)
        self.answer = answer
        self.requests: list[Any] = []
        self.timeouts: list[float] = []

    def __call__(self, request: Any, *, timeout: float, wait_for_ready: bool) -> Any:
        assert wait_for_ready
        self.requests.append(request)
        self.timeouts.append(timeout)
        if self.failures:
            raise FakeRpcError(*self.failures.pop(0))
        return self.answer


BAD_GATEWAY = (Code.UNAVAILABLE, "Received http2 header with status: 502")


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setattr(client_module, "CALL_BACKOFF_INITIAL", 0.001)
    monkeypatch.setattr(client_module, "CALL_BACKOFF_MAX", 0.01)
    c = Client("127.0.0.1:1", "ws", ChannelSettings("127.0.0.1:1"))
    yield c
    c.channel.close()


def status_request(status: int = common_pb2.RUN_STATUS_COMPLETED) -> rs.UpdateRunStatusRequest:
    return rs.UpdateRunStatusRequest(workspace="ws", run_id="r1", status=status)  # type: ignore[arg-type]


def test_a_call_is_retried_through_502s_and_lost_streams_within_its_timeout(
    client: Client,
) -> None:
    answer = rs.UpdateRunStatusResponse()
    method = Method([BAD_GATEWAY, LOST[0], BAD_GATEWAY, LOST[2]], answer)
    assert client.call(method, status_request(), timeout=5.0) is answer
    assert len(method.requests) == 5
    assert method.timeouts[0] <= 5.0 and method.timeouts == sorted(method.timeouts, reverse=True)


def test_retries_stop_at_the_timeout_with_the_last_error(client: Client) -> None:
    method = Method([BAD_GATEWAY] * 10_000)
    started = monotonic()
    with pytest.raises(UnavailableError, match="502"):
        client.call(method, status_request(), timeout=0.3)
    assert 0.25 <= monotonic() - started < 2.0
    assert len(method.requests) > 3


def test_an_internal_the_service_sent_is_tried_three_times(client: Client) -> None:
    method = Method([(Code.INTERNAL, "commit failed; resend")] * 5)
    with pytest.raises(ServiceError) as info:
        client.call(method, status_request(), timeout=5.0)
    assert info.value.code == Code.INTERNAL and len(method.requests) == 3


def test_a_refusal_is_not_retried(client: Client) -> None:
    method = Method([(Code.FAILED_PRECONDITION, "run is Completed, a terminal state")])
    with pytest.raises(FailedPreconditionError):  # complete() twice by hand: still an error
        client.call(method, status_request(), timeout=5.0)
    assert len(method.requests) == 1


def test_a_status_change_applied_before_its_answer_was_lost_is_done(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """complete() reached the service, the answer was lost (502), the resend
    is refused because the run is Completed already: that is success."""
    run = common_pb2.Run(run_id="r1", status=common_pb2.RUN_STATUS_COMPLETED)
    get_run = Method([], rs.GetRunResponse(run=run))

    class Runs:
        GetRun = get_run

    monkeypatch.setattr(client, "runs", Runs)
    method = Method([BAD_GATEWAY, (Code.FAILED_PRECONDITION, "run is Completed")])
    reply = client.call(method, status_request(), timeout=5.0)
    assert reply.run.status == common_pb2.RUN_STATUS_COMPLETED
    assert len(method.requests) == 2 and get_run.requests[0].run_id == "r1"
    # The run is in another state: the refusal stands.
    get_run.answer = rs.GetRunResponse(run=common_pb2.Run(status=common_pb2.RUN_STATUS_FAILED))
    method = Method([BAD_GATEWAY, (Code.FAILED_PRECONDITION, "run is Failed")])
    with pytest.raises(FailedPreconditionError):
        client.call(method, status_request(), timeout=5.0)


def test_create_run_gets_its_id_on_the_client_so_a_resend_finds_the_same_run(
    client: Client,
) -> None:
    request = rs.CreateRunRequest(workspace="ws", experiment_name="mnist")
    method = Method([BAD_GATEWAY, LOST[1]], rs.CreateRunResponse())
    client.call(method, request, timeout=5.0)
    ids = {r.run_id for r in method.requests}
    assert len(method.requests) == 3 and len(ids) == 1
    (run_id,) = ids
    assert run_id.startswith("mnist_") and len(run_id) == len("mnist_") + 20
    assert request.run_id == ""  # the caller's message is left alone
    given = rs.CreateRunRequest(experiment_name="mnist", run_id="mine")
    assert with_client_run_id(given) is given


def test_requests_a_resend_would_change_are_sent_once(client: Client) -> None:
    delete = ex.DeleteExperimentRequest(workspace="ws", experiment_id="7")
    rename = ex.ReactivateExperimentRequest(workspace="ws", name="a", new_name="b")
    assert not resend_safe(delete) and not resend_safe(rename)
    assert resend_safe(ex.ReactivateExperimentRequest(workspace="ws", name="a"))
    assert resend_safe(rs.AddRunPropertiesRequest(run_id="r1", properties={"k": "v"}))
    for request in (delete, rename):
        method = Method([BAD_GATEWAY])
        with pytest.raises(UnavailableError):
            client.call(method, request, timeout=5.0)
        assert len(method.requests) == 1
