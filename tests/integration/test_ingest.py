"""Scalars end to end: the ingest stream, step order, exactly once, queries."""

from __future__ import annotations

import math
import threading
import uuid

import grpc
import pytest

from steplog import Experiment, Run
from steplog.client import Client
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import query_service_pb2 as qs
from tests.sql import fetchval, stored_points
from tests.support import ServiceProcess


def write(
    client: Client,
    run_id: str,
    writer: str,
    seq: int,
    name: str,
    steps: list[int],
    values: list[float],
    workspace: str = "default",
    wait_for_ready: bool = False,
    **series_kw: object,
) -> pb.WriteResponse:
    """One unary Write. `wait_for_ready`: a connection not yet up is waited
    for (within the call's 30 s), as the client library's calls do, instead
    of failing at once with UNAVAILABLE."""
    return client.ingest.Write(
        pb.WriteRequest(
            workspace=workspace,
            batch=pb.Batch(
                writer_id=writer,
                sequence=seq,
                series=[
                    pb.RunSeries(
                        run_id=run_id,
                        series=data_pb2.SeriesData(
                            name=name,
                            scalars=data_pb2.ScalarColumns(steps=steps, values=values),
                            **series_kw,
                        ),
                    )
                ],  # type: ignore[arg-type]
            ),
        ),
        timeout=30,
        wait_for_ready=wait_for_ready,
    )


def test_log_flush_and_get_metrics(url: str, experiment_name: str, database_url: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    for step in range(1000):
        run.log("loss", 1.0 / (step + 1), step=step)
        run.log("acc", step / 1000, step=step)
    run.log("nan_loss", math.nan, step=0)
    run.log("nan_loss", math.inf, step=1)
    run.log("nan_loss", -math.inf, step=2)
    run.log("final", 0.93)
    run.log("note", "converged")
    run.log_list("lrs", [0.1, 0.01, 0.001])
    assert run.flush(60)
    metrics = run.get_metrics()
    assert metrics["loss"] == [1.0 / (s + 1) for s in range(1000)]
    assert len(metrics["acc"]) == 1000
    nan_loss = metrics["nan_loss"]
    assert math.isnan(nan_loss[0]) and nan_loss[1] == math.inf and nan_loss[2] == -math.inf
    assert metrics["final"] == 0.93  # logged once: a value, not a list
    assert metrics["note"] == "converged"
    assert metrics["lrs"] == [0.1, 0.01, 0.001]
    assert run.get_metrics(name="final") == {"final": 0.93}
    # What the database holds, independently of the query path.
    assert (
        fetchval(
            database_url,
            "SELECT count(*) FROM scalar_points p JOIN series s"
            " USING (series_id) WHERE s.run_id = $1",
            run.id,
        )
        == 2000 + 3 + 1 + 3
    )
    run.complete()


def test_recursive_metrics_keyed_by_run(url: str, experiment_name: str) -> None:
    parent = Experiment(experiment_name, url=url).start_logging()
    child = parent.child_run("c")
    parent.log("a", 1.0)
    child.log("b", 2.0, step=5)
    got = parent.get_metrics(recursive=True)
    assert got == {parent.id: {"a": 1.0}, child.id: {"b": 2.0}}


def test_labels_and_rank_label(
    url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    ranked = Run.get(run.id, url=url)
    assert ranked.labels == {"rank": "3"}
    ranked.log("loss", 0.5, step=1)
    run.log("loss", 0.7, step=1)
    run.log("loss", 0.9, step=1, labels={"split": "val"})
    got = run.get_metrics()
    assert got == {"loss": 0.7, "loss{rank=3}": 0.5, "loss{split=val}": 0.9}


def test_step_rules_are_reported(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    client = run._client
    writer = f"t-{uuid.uuid4().hex}"
    r1 = write(client, run.id, writer, 1, "loss", [0, 1, 2], [1.0, 2.0, 3.0])
    assert (r1.result.accepted, r1.result.rejected) == (3, 0)
    r2 = write(client, run.id, writer, 2, "loss", [2, 2, 1, 3], [3.0, 9.0, 1.0, 4.0])
    assert (r2.result.accepted, r2.result.duplicates, r2.result.rejected) == (1, 1, 2)
    reasons = {c.reason: c.count for c in r2.result.reject_counts}
    assert reasons == {pb.REJECT_REASON_STEP_CONFLICT: 1, pb.REJECT_REASON_STEP_NOT_INCREASING: 1}
    assert {(p.index, p.step) for p in r2.result.rejected_points} == {(1, 2), (2, 1)}
    # Stepped and unstepped do not mix.
    r3 = client.ingest.Write(
        pb.WriteRequest(
            workspace="default",
            batch=pb.Batch(
                writer_id=writer,
                sequence=3,
                series=[
                    pb.RunSeries(
                        run_id=run.id,
                        series=data_pb2.SeriesData(
                            name="loss", scalars=data_pb2.ScalarColumns(values=[1.0])
                        ),
                    )
                ],
            ),
        )
    )
    assert r3.result.reject_counts[0].reason == pb.REJECT_REASON_STEP_MODE_MISMATCH
    assert run.get_metrics()["loss"] == [1.0, 2.0, 3.0, 4.0]


def test_rejections_reach_the_user(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    run.log("loss", 1.0, step=10)
    run.log("loss", 2.0, step=5)  # a regression
    run.log("loss", 1.0, step=10)  # an exact repeat: not an error
    with pytest.warns(UserWarning, match="STEP_NOT_INCREASING"):
        assert run.flush(30)
        run.log("other", 1.0)  # warnings surface on the next call into the client
    (rej,) = run.rejections()
    assert (rej.name, rej.step, rej.reason) == ("loss", 5, "STEP_NOT_INCREASING")
    assert "smaller than the last logged step" in rej.message
    stats = run.writer_stats()
    assert stats.rejected >= 1 and stats.duplicates >= 1
    assert run.get_metrics()["loss"] == 1.0


def test_resent_batch_is_a_duplicate_and_gap_aborts(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    client = run._client
    writer = f"t-{uuid.uuid4().hex}"
    write(client, run.id, writer, 1, "x", [0, 1], [1.0, 2.0])
    again = write(client, run.id, writer, 1, "x", [0, 1], [1.0, 2.0])
    assert again.duplicate_batch
    with pytest.raises(grpc.RpcError) as err:
        write(client, run.id, writer, 5, "x", [2], [3.0])
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "expected batch sequence 2" in (err.value.details() or "")
    assert [p[1] for p in stored_points(database_url, run.id)] == [0, 1]


def test_out_of_order_series_last_write_wins(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    client, writer = run._client, f"t-{uuid.uuid4().hex}"
    ooo = data_pb2.STEP_POLICY_OUT_OF_ORDER
    write(client, run.id, writer, 1, "eval", [10, 5], [1.0, 2.0], step_policy=ooo)
    r = write(client, run.id, writer, 2, "eval", [7, 5], [3.0, 4.0])
    assert r.result.accepted == 2 and r.result.rejected == 0
    assert run.get_metrics()["eval"] == [4.0, 3.0, 1.0]  # steps 5, 7, 10


def test_rewind_hides_points_and_logging_continues(
    url: str, experiment_name: str, database_url: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    for step in range(100):
        run.log("loss", float(step), step=step)
    assert run.flush(30)
    assert run.rewind(49) == 50
    for step in range(50, 60):
        run.log("loss", -float(step), step=step)
    assert run.flush(30)
    values = run.get_metrics()["loss"]
    assert values == [float(s) for s in range(50)] + [-float(s) for s in range(50, 60)]
    # The hidden points stay for audit.
    assert (
        fetchval(
            database_url,
            "SELECT count(*) FROM scalar_points p JOIN series s"
            " USING (series_id) WHERE s.run_id = $1 AND p.hidden",
            run.id,
        )
        == 50
    )
    assert not run.rejections()


def test_points_to_unknown_completed_and_foreign_runs_are_rejected(
    url: str, experiment_name: str
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    client, writer = run._client, f"t-{uuid.uuid4().hex}"
    r = write(client, "no-such-run", writer, 1, "x", [0], [1.0])
    assert r.result.reject_counts[0].reason == pb.REJECT_REASON_RUN_NOT_FOUND
    # The same writer id in another workspace is another writer (sequence 1).
    r = write(client, run.id, writer, 1, "x", [0], [1.0], workspace="other-team")
    assert r.result.reject_counts[0].reason == pb.REJECT_REASON_RUN_NOT_FOUND
    run.complete()
    r = write(client, run.id, writer, 2, "x", [0], [1.0])
    assert r.result.reject_counts[0].reason == pb.REJECT_REASON_RUN_NOT_ACTIVE
    assert "Completed" in r.result.rejected_points[0].message


def test_mixed_batch_keeps_the_valid_points(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    req = pb.WriteRequest(
        workspace="default",
        batch=pb.Batch(
            writer_id=f"t-{uuid.uuid4().hex}",
            sequence=1,
            series=[
                pb.RunSeries(
                    run_id=run.id,
                    series=data_pb2.SeriesData(
                        name="n" * 10_000, scalars=data_pb2.ScalarColumns(values=[1.0])
                    ),
                ),
                pb.RunSeries(
                    run_id=run.id,
                    series=data_pb2.SeriesData(
                        name="good",
                        scalars=data_pb2.ScalarColumns(
                            steps=[-5, 1, 2], values=[0.0, 1.0, math.nan]
                        ),
                    ),
                ),
                pb.RunSeries(run_id=run.id, series=data_pb2.SeriesData(name="empty")),
            ],
        ),
    )
    r = run._client.ingest.Write(req)
    assert (r.result.accepted, r.result.rejected) == (2, 2)
    assert {c.reason for c in r.result.reject_counts} == {
        pb.REJECT_REASON_INVALID_NAME,
        pb.REJECT_REASON_INVALID_STEP,
    }
    good = run.get_metrics()["good"]
    assert good[0] == 1.0 and math.isnan(good[1])


def test_empty_batches_are_acknowledged_and_advance_the_sequence(url: str) -> None:
    client = Client(url, "default")
    writer = f"t-{uuid.uuid4().hex}"
    for seq in (1, 2):
        reply = client.ingest.Write(
            pb.WriteRequest(workspace="default", batch=pb.Batch(writer_id=writer, sequence=seq))
        )
        assert not reply.duplicate_batch and reply.result.accepted == 0
    again = client.ingest.Write(
        pb.WriteRequest(workspace="default", batch=pb.Batch(writer_id=writer, sequence=2))
    )
    assert again.duplicate_batch


def test_bad_workspace_and_writer_are_invalid_argument(url: str) -> None:
    client = Client(url, "default")
    with pytest.raises(grpc.RpcError) as err:
        client.ingest.Write(
            pb.WriteRequest(workspace="Bad WS", batch=pb.Batch(writer_id="w", sequence=1))
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.ingest.Write(pb.WriteRequest(batch=pb.Batch(writer_id="", sequence=1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "writer_id" in (err.value.details() or "")


def test_oversize_message_is_resource_exhausted(
    service_env: dict[str, str], experiment_name: str
) -> None:
    with ServiceProcess(service_env, extra_env={"STEPLOG_MAX_MESSAGE_BYTES": "1048576"}) as svc:
        client = Client(svc.address, "default")
        run = Experiment(experiment_name, url=svc.address).start_logging()
        with pytest.raises(grpc.RpcError) as err:
            write(client, run.id, "w-big", 1, "x", list(range(200_000)), [1.0] * 200_000)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The service is fine afterwards and nothing was written.
        ok = write(client, run.id, "w-big", 1, "x", [0], [1.0])
        assert ok.result.accepted == 1


def test_read_series_range_and_downsampling(url: str, experiment_name: str) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    for step in range(10_000):
        run.log("loss", math.nan if step == 7777 else math.sin(step / 100), step=step)
    run.log("loss", 50.0, step=10_000)  # a spike at the end
    assert run.flush(60)
    client = run._client
    part = client.queries.ReadSeries(
        qs.ReadSeriesRequest(
            workspace="default", run_id=run.id, name="loss", start_step=100, end_step=199
        )
    )
    assert list(part.series.scalars.steps) == list(range(100, 200))
    assert not part.downsampled and part.total_points == 100
    small = client.queries.ReadSeries(
        qs.ReadSeriesRequest(workspace="default", run_id=run.id, name="loss", max_points=300)
    )
    assert small.downsampled and small.total_points == 10_001
    values = list(small.series.scalars.values)
    assert len(values) <= 300
    assert 50.0 in values and any(math.isnan(v) for v in values)  # spikes and NaNs survive
    steps = list(small.series.scalars.steps)
    assert steps == sorted(steps) and steps[0] == 0
    # The same through the client API.
    got = run.get_series("loss", start_step=9998, end_step=20_000)
    assert got["steps"] == [9998, 9999, 10_000] and got["values"][-1] == 50.0
    assert not got["downsampled"] and got["total_points"] == 3
    chart = run.get_series("loss", max_points=300)
    assert chart["downsampled"] and len(chart["values"]) <= 300


def test_two_service_processes_keep_step_order(
    service_env: dict[str, str], experiment_name: str, database_url: str
) -> None:
    """Two processes on one database receive interleaved, conflicting writes to
    one series: every step is stored exactly once, and the losers are told."""
    with ServiceProcess(service_env) as a, ServiceProcess(service_env) as b:
        run = Experiment(experiment_name, url=a.address).start_logging()
        results: dict[str, list[pb.WriteResponse]] = {"a": [], "b": []}

        def send(svc: ServiceProcess, key: str, value: float) -> None:
            client = Client(svc.address, "default")
            writer = f"{key}-{uuid.uuid4().hex}"
            for i in range(100):
                steps = [i * 5 + k for k in range(5)]
                # A fresh channel's first call waits for its connection (a CI
                # run saw one refused just after the health check passed).
                results[key].append(
                    write(
                        client,
                        run.id,
                        writer,
                        i + 1,
                        "loss",
                        steps,
                        [value] * 5,
                        wait_for_ready=True,
                    )
                )

        threads = [
            threading.Thread(target=send, args=(a, "a", 1.0)),
            threading.Thread(target=send, args=(b, "b", 2.0)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted = sum(r.result.accepted for rs in results.values() for r in rs)
        rejected = sum(r.result.rejected for rs in results.values() for r in rs)
        assert accepted + rejected == 1000
        assert rejected > 0  # the two really competed for the same steps
        points = stored_points(database_url, run.id)
        # Every step is stored exactly once, by one of the two, never both.
        assert [p[1] for p in points] == list(range(500))
        assert accepted == 500
