"""Early termination against the real service: a parent run carries a
policy, its children log synthetic curves, the service moves the children
that fall behind to CancelRequested with the reason, and the children's
clients see it within one heartbeat (`Run.should_stop()`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from steplog import Experiment, Run
from steplog.client import Client, get_client, resolve_url
from steplog.v1 import common_pb2, run_service_pb2

BEAT = 0.5  # seconds between heartbeats of the test's own client


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    """A client of the test's own whose heartbeat beats every BEAT seconds
    (the shared one beats every 30 s and may be waiting out a beat already)."""
    client = Client(resolve_url(url), "default")
    client.heartbeat.interval = BEAT
    yield client


def wait_for(predicate: object, timeout: float) -> float:
    """Seconds until predicate() is true; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout} s")


def test_should_stop_turns_true_within_one_heartbeat(
    client: Client, url: str, experiment_name: str
) -> None:
    run = Experiment(experiment_name, _client=client).start_logging()
    called: list[Run] = []
    event = threading.Event()
    run.on_cancel_requested(lambda r: (called.append(r), event.set()))
    assert not run.should_stop()
    # Someone else (here the process's shared client) requests the cancel.
    other = get_client(url)
    reply = other.runs.UpdateRunStatus(
        run_service_pb2.UpdateRunStatusRequest(
            workspace="default", run_id=run.id, status=common_pb2.RUN_STATUS_CANCEL_REQUESTED
        )
    )
    assert reply.run.status == common_pb2.RUN_STATUS_CANCEL_REQUESTED
    # One beat later (plus the beat's own call), the run knows.
    wait_for(run.should_stop, BEAT + 1.5)
    assert event.wait(2.0) and called == [run]
    # The local object was never refreshed: should_stop() read the beat.
    assert run.status == "Running"
    # Registered after the fact: called at once, on this thread.
    late: list[Run] = []
    run.on_cancel_requested(late.append)
    assert late == [run]
    run.cancel()
    assert run.get_status() == "Canceled" and run.should_stop()
