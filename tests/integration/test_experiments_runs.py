"""Experiments and runs end to end: Python client -> real gRPC server -> TimescaleDB."""

from __future__ import annotations

import uuid

import grpc
import pytest

import steplog
from steplog import Experiment, Run
from steplog.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from steplog.v1 import common_pb2, run_service_pb2


def test_experiment_get_or_create_is_idempotent(url: str, experiment_name: str) -> None:
    a = Experiment(experiment_name, url=url)
    b = Experiment(experiment_name, url=url)
    assert a.id == b.id
    assert a.name == experiment_name
    assert a.workspace == "default"
    assert not a.archived


def test_experiment_name_validation(url: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        Experiment("bad name/with spaces", url=url)
    assert err.value.field == "name"
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid experiment name" in str(err.value)


def test_experiment_tags_and_list_filters(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    exp.tag("team", "vision")
    exp.set_tags({"priority": "high", "flag": None})
    assert exp.tags == {"team": "vision", "priority": "high", "flag": None}
    exp.remove_tags(["priority"])
    assert exp.tags == {"team": "vision", "flag": None}
    other = Experiment(experiment_name + "-other", url=url)
    other.tag("team", "nlp")
    names = {e.name for e in Experiment.list(url=url, tags={"team": "vision"})}
    assert experiment_name in names and other.name not in names
    names = {e.name for e in Experiment.list(url=url, tags=["flag"])}
    assert names == {experiment_name} or (experiment_name in names and other.name not in names)


def test_archive_and_reactivate(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    exp.archive()
    assert exp.archived
    assert experiment_name not in {e.name for e in Experiment.list(url=url)}
    assert experiment_name in {e.name for e in Experiment.list(url=url, view_type="archived_only")}
    assert experiment_name in {e.name for e in Experiment.list(url=url, view_type="all")}
    with pytest.raises(FailedPreconditionError, match="archived"):
        exp.start_logging()
    exp.reactivate()
    assert not exp.archived
    assert experiment_name in {e.name for e in Experiment.list(url=url)}
    with pytest.raises(ValueError):
        Experiment.list(url=url, view_type="nonsense")


def test_run_lifecycle_and_details(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    run = exp.start_logging(display_name="first", description="a run")
    assert run.status == "Running"
    assert run.number == 1
    run2 = exp.start_logging(display_name="second")
    assert run2.number == 2
    details = run.get_details()
    assert details["runId"] == run.id
    assert details["status"] == "Running"
    assert details["displayName"] == "first"
    assert details["startTimeUtc"] is not None and "endTimeUtc" not in details
    run.complete()
    assert run.get_status() == "Completed"
    details = run.get_details()
    assert details["endTimeUtc"] is not None
    # Terminal states are final.
    with pytest.raises(FailedPreconditionError) as err:
        run.start()
    assert err.value.field == "status"
    with pytest.raises(FailedPreconditionError):
        run.fail("too late")
    assert run.get_status() == "Completed"
    assert run.wait_for_completion()["status"] == "Completed"


def test_fail_and_cancel_record_error(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    run = exp.start_logging()
    run.fail(error_details="diverged", error_code="NaNLoss")
    details = run.get_details()
    assert details["status"] == "Failed"
    assert details["error"]["error"] == {"code": "NaNLoss", "message": "diverged"}
    with pytest.raises(FailedPreconditionError, match="failed: diverged"):
        run.wait_for_completion()
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Failed"
    other = exp.start_logging()
    other.cancel()
    assert other.get_status() == "Canceled"


def test_context_manager_completes_or_fails(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    with exp.start_logging() as run:
        pass
    assert run.get_status() == "Completed"
    with pytest.raises(ZeroDivisionError), exp.start_logging() as bad:
        1 / 0  # noqa: B018
    assert bad.get_status() == "Failed"
    assert bad.get_details()["error"]["error"]["code"] == "ZeroDivisionError"


def test_tags_and_add_only_properties(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    run.tag("lr", "0.001")
    run.tag("baseline")
    run.set_tags({"opt": "adam", "lr": "0.01"})
    assert run.get_tags() == {"lr": "0.01", "baseline": None, "opt": "adam"}
    run.remove_tags(["baseline"])
    assert run.get_tags() == {"lr": "0.01", "opt": "adam"}
    run.add_properties({"git": "abc123", "host": "node1"})
    run.add_properties({"git": "abc123"})  # same value: a no-op
    with pytest.raises(FailedPreconditionError) as err:
        run.add_properties({"git": "def456", "new": "x"})
    assert err.value.field == "properties[git]"
    # Nothing of the rejected request was written.
    props = run.get_properties()
    assert props.pop("steplog.submitted_by")  # set at creation, like Azure's system properties
    assert props == {"git": "abc123", "host": "node1"}


def test_child_runs(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    parent = exp.start_logging(display_name="sweep")
    with parent.child_run(name="trial-0") as child:
        assert child.parent is not None and child.parent.id == parent.id
        grandchild = child.child_run(name="fold-0")
        grandchild.complete()
    assert child.get_status() == "Completed"
    tagged = parent.create_children(tag_key="lr", tag_values=["0.1", "0.01"])
    assert [c.tags for c in tagged] == [{"lr": "0.1"}, {"lr": "0.01"}]
    plain = parent.create_children(count=2)
    assert len(plain) == 2
    direct = list(parent.get_children())
    assert {c.id for c in direct} == {child.id, *(c.id for c in tagged), *(c.id for c in plain)}
    assert {c.id for c in parent.get_children(recursive=True)} >= {grandchild.id}
    assert [c.id for c in parent.get_children(tags={"lr": "0.01"})] == [tagged[1].id]
    assert {c.id for c in parent.get_children(status="Completed")} == {child.id}
    # Runs of the experiment, newest first; children only on request.
    top = Run.list(exp)
    assert [r.id for r in top] == [parent.id]
    everything = list(exp.get_runs(include_children=True))
    assert len(everything) == 7
    numbers = [r.number for r in everything]
    assert numbers == sorted(numbers, reverse=True)


def test_run_list_filters(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    a = exp.start_logging(run_type="train", tags={"k": "1"}, properties={"p": "x"})
    b = exp.start_logging(run_type="eval")
    b.complete()
    assert [r.id for r in Run.list(exp, type="train")] == [a.id]
    assert [r.id for r in Run.list(exp, status="Completed")] == [b.id]
    assert [r.id for r in Run.list(exp, tags={"k": "1"})] == [a.id]
    assert [r.id for r in Run.list(exp, properties={"p": "x"})] == [a.id]
    assert Run.get(a.id, url=url).id == a.id


def test_unknown_ids_and_workspaces(url: str, experiment_name: str) -> None:
    with pytest.raises(NotFoundError) as err:
        Run.get("no-such-run", url=url)
    assert err.value.field == "run_id"
    run = Experiment(experiment_name, url=url).start_logging()
    # Another workspace cannot see the run.
    with pytest.raises(NotFoundError):
        Run.get("other-team", run.id, url=url)
    with pytest.raises(InvalidArgumentError) as err:
        Run.get("bad id!", url=url)
    assert err.value.field == "run_id"
    with pytest.raises(InvalidArgumentError) as err:
        Experiment("Bad Workspace", "x", url=url)
    assert err.value.field == "workspace"


def test_client_chosen_run_id_is_idempotent(url: str, experiment_name: str) -> None:
    exp = Experiment(experiment_name, url=url)
    rid = f"job-{uuid.uuid4().hex[:8]}"
    a = exp.start_logging(run_id=rid)
    b = exp.start_logging(run_id=rid)
    assert a.id == b.id == rid and a.number == b.number
    with pytest.raises(AlreadyExistsError):
        Experiment(experiment_name + "-x", url=url).start_logging(run_id=rid)


def test_heartbeat_not_responding_and_back(
    service_env: dict[str, str], experiment_name: str
) -> None:
    from tests.support import ServiceProcess

    # A service whose heartbeat timeout is one second.
    with ServiceProcess(service_env, extra_env={"STEPLOG_HEARTBEAT_TIMEOUT_S": "1"}) as svc:
        client = steplog.client.Client(svc.address, "default")
        run = Run._create(client, experiment_name)
        client.heartbeat.remove(run.id)
        deadline_status = ""
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            deadline_status = run.get_status()
            if deadline_status == "NotResponding":
                break
            time.sleep(0.2)
        assert deadline_status == "NotResponding"
        assert [r.id for r in Run.list(run.experiment, status="NotResponding")] == [run.id]
        reply = client.runs.Heartbeat(
            run_service_pb2.HeartbeatRequest(workspace="default", run_ids=[run.id])
        )
        assert list(reply.statuses) == [common_pb2.RUN_STATUS_RUNNING]
        assert run.get_status() == "Running"
        # Completing it works from NotResponding (the stored status is Running).
        run.complete()
        assert run.get_status() == "Completed"


def test_get_context(
    url: str,
    experiment_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("STEPLOG_RUN_ID", raising=False)
    offline = Run.get_context()
    offline.log("loss", 0.5)
    assert "Attempted to log scalar metric loss" in capsys.readouterr().out
    run = Experiment(experiment_name, url=url).start_logging()
    monkeypatch.setenv("STEPLOG_RUN_ID", run.id)
    monkeypatch.setenv("STEPLOG_URL", url)
    attached = Run.get_context()
    assert attached.id == run.id
    run.complete()
    with pytest.raises(FailedPreconditionError):
        Run.get_context()
