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


REASON = "steplog.early_termination.reason"
INTERVAL = "steplog.early_termination.interval"


def sweep(client: Client, experiment_name: str, policy: object, metric: str, goal: str) -> Run:
    parent = Experiment(experiment_name, _client=client).start_logging(display_name="sweep")
    parent.set_early_termination_policy(policy, primary_metric=metric, goal=goal)  # type: ignore[arg-type]
    return parent


def child(parent: Run, name: str, metric: str, values: list[float]) -> Run:
    """A child that logs its whole curve (steps 0..) and waits for the ack;
    children run one after the other, so the earlier ones are the reference."""
    run = parent.child_run(name)
    for step, value in enumerate(values):
        run.log(metric, value, step=step)
    assert run.flush(30)
    return run


def outcome(run: Run, timeout: float = 10.0) -> tuple[str, str | None, str]:
    """(status, interval, reason) once the service has judged the run: waits
    for CancelRequested up to `timeout` when expected by the caller."""
    details = run.get_details()
    props = details["properties"]
    return details["status"], props.get(INTERVAL), props.get(REASON, "")


def wait_cancelled(run: Run, timeout: float = 10.0) -> tuple[str | None, str]:
    wait_for(lambda: run.get_status() == "CancelRequested", timeout)
    _, interval, reason = outcome(run)
    return interval, reason


def test_bandit_slack_factor_cancels_the_runs_that_fall_behind(
    client: Client, experiment_name: str
) -> None:
    from steplog.sweep import BanditPolicy

    # slack_factor 0.2, every interval from interval 2 (delay_evaluation 2).
    parent = sweep(
        client, experiment_name, BanditPolicy(1, slack_factor=0.2, delay_evaluation=2), "acc",
        "maximize",
    )  # fmt: skip
    attached = parent.get_early_termination_policy()
    assert attached is not None and attached.primary_metric == "acc"
    assert attached.policy == BanditPolicy(1, slack_factor=0.2, delay_evaluation=2)
    # The leader is best at every interval, so it is the reference B of each
    # evaluation whatever order the others' points are judged in.
    leader = child(parent, "leader", "acc", [0.5, 0.6, 0.7, 0.8, 0.9])
    # close: 0.55*1.2=0.66 >= 0.6, 0.65*1.2=0.78 >= 0.7, 0.75*1.2=0.9 >= 0.8,
    # 0.85*1.2=1.02 >= 0.9: never cancelled.
    close = child(parent, "close", "acc", [0.45, 0.55, 0.65, 0.75, 0.85])
    # far: interval 1 is not evaluated (0.3*1.2 = 0.36 < 0.5 would cancel);
    # interval 2: 0.4*1.2 = 0.48 < 0.6 -> cancelled at 2.
    far = child(parent, "far", "acc", [0.3, 0.4, 0.5, 0.55, 0.6])
    # late: 2: 0.55*1.2=0.66 >= 0.6; 3: 0.6*1.2=0.72 >= 0.7;
    # 4: 0.62*1.2 = 0.744 < 0.8 -> cancelled at 4.
    late = child(parent, "late", "acc", [0.45, 0.55, 0.6, 0.62, 0.63])
    interval, reason = wait_cancelled(far)
    assert interval == "2"
    assert "bandit at interval 2" in reason and "0.4 * (1 + 0.2) < 0.6" in reason
    assert "'" + leader.id + "'" in reason
    interval, reason = wait_cancelled(late)
    assert interval == "4" and "0.62 * (1 + 0.2) < 0.8" in reason
    # The others were judged (their last interval was committed before the
    # last cancellation's) and kept.
    for kept in (leader, close):
        status, interval, _ = outcome(kept)
        assert status == "Running" and interval is None
    # The cancelled child's own process sees it within one heartbeat.
    wait_for(far.should_stop, BEAT + 1.5)
    assert not close.should_stop()


def test_bandit_slack_amount_minimize(client: Client, experiment_name: str) -> None:
    from steplog.sweep import BanditPolicy, PrimaryMetricGoal

    # Minimize a loss, slack_amount 0.5, every 2nd interval: applied at 2 and 4.
    parent = sweep(
        client, experiment_name, BanditPolicy(2, slack_amount=0.5), "loss",
        PrimaryMetricGoal.MINIMIZE,  # type: ignore[arg-type]
    )  # fmt: skip
    child(parent, "best", "loss", [3.0, 2.0, 1.5, 1.0])
    # ok: 2: min 2.4 <= 2.0 + 0.5; 4: min 1.4 <= 1.0 + 0.5: kept.
    ok = child(parent, "ok", "loss", [3.0, 2.4, 1.8, 1.4])
    # bad: 2: min 2.5 <= 2.5 (not above): kept; 4: min 1.6 > 1.5 -> cancelled at 4.
    bad = child(parent, "bad", "loss", [3.0, 2.5, 2.0, 1.6])
    interval, reason = wait_cancelled(bad)
    assert interval == "4" and "1.6 > 1 + 0.5" in reason and "slack_amount 0.5" in reason
    assert outcome(ok)[0] == "Running"


def test_median_stopping(client: Client, experiment_name: str) -> None:
    from steplog.sweep import MedianStoppingPolicy

    # Every 2nd interval from 4: applied at 4 and 6.
    parent = sweep(client, experiment_name, MedianStoppingPolicy(2, 4), "acc", "maximize")
    # Three references with the same rising curve: running average at 4 is
    # (0.5+0.7+0.9+1.1)/4 = 0.8, at 6 (0.5+...+1.5)/6 = 1.0; their best is
    # never below the median of equal averages.
    refs = [child(parent, f"ref{i}", "acc", [0.5, 0.7, 0.9, 1.1, 1.3, 1.5]) for i in range(3)]
    # x: best at 4 = 0.95 vs median(0.8, 0.8, 0.8, x's 0.9125) = 0.8: kept;
    # at 6: best 0.95 vs median(1.0, 1.0, 1.0, 0.925) = 1.0 -> cancelled at 6.
    x = child(parent, "x", "acc", [0.9, 0.9, 0.9, 0.95, 0.95, 0.95])
    interval, reason = wait_cancelled(x)
    assert interval == "6" and "median 1 of the running averages" in reason
    assert "4 runs compared" in reason
    for ref in refs:
        assert outcome(ref)[0] == "Running"


def test_truncation_selection(client: Client, experiment_name: str) -> None:
    from steplog.sweep import TruncationSelectionPolicy

    # 20%, every 2nd interval: applied at 2 and 4.
    parent = sweep(client, experiment_name, TruncationSelectionPolicy(20, 2), "acc", "maximize")
    # Four strong children, equal: each ties the others, never the lowest.
    strong = [child(parent, f"s{i}", "acc", [1.0, 2.0, 3.0, 4.0]) for i in range(4)]
    # w at 2: five compared, floor(5 * 20 / 100) = 1, w (best 1.0) is the
    # worst -> cancelled at 2.
    w = child(parent, "w", "acc", [0.5, 1.0, 1.5, 2.0])
    interval, reason = wait_cancelled(w)
    assert interval == "2" and "ranks 1 from the worst of 5" in reason
    # m at 2 and 4: six compared, cut 1; w is worse than m -> m ranks 2: kept.
    m = child(parent, "m", "acc", [0.9, 1.9, 2.9, 3.9])
    # z, judged after m (so m's evaluation is done when z is cancelled): seven
    # compared at 2, cut floor(7 * 0.2) = 1, z is the worst -> cancelled at 2.
    z = child(parent, "z", "acc", [0.1, 0.2, 0.3, 0.4])
    interval, reason = wait_cancelled(z)
    assert interval == "2" and "ranks 1 from the worst of 7" in reason
    assert outcome(m)[0] == "Running"
    for s in strong:
        assert outcome(s)[0] == "Running"


def test_policy_errors_and_removal(client: Client, experiment_name: str) -> None:
    from steplog.errors import InvalidArgumentError, NotFoundError
    from steplog.sweep import BanditPolicy, TruncationSelectionPolicy

    parent = Experiment(experiment_name, _client=client).start_logging()
    with pytest.raises(InvalidArgumentError) as err:
        parent.set_early_termination_policy(TruncationSelectionPolicy(100), primary_metric="a")
    assert err.value.field == "policy.truncation_selection.truncation_percentage"
    with pytest.raises(InvalidArgumentError) as err:
        parent.set_early_termination_policy(BanditPolicy(0, slack_factor=-0.5), primary_metric="a")
    assert err.value.field == "policy.bandit.slack_factor"
    with pytest.raises(InvalidArgumentError):
        parent.set_early_termination_policy(BanditPolicy(slack_factor=0.1))  # no metric
    raw = rs_request(parent.id, goal=0)
    with pytest.raises(InvalidArgumentError) as err:
        client.call(client.runs.SetEarlyTerminationPolicy, raw)
    assert err.value.field == "policy.goal"
    assert parent.get_early_termination_policy() is None
    parent.set_early_termination_policy(BanditPolicy(slack_factor=0.1), primary_metric="a")
    assert parent.get_early_termination_policy() is not None
    parent.set_early_termination_policy(None)
    assert parent.get_early_termination_policy() is None
    with pytest.raises(NotFoundError) as missing:
        client.call(client.runs.SetEarlyTerminationPolicy, rs_request("no-such-run", goal=1))
    assert missing.value.field == "run_id"


def rs_request(run_id: str, goal: int) -> run_service_pb2.SetEarlyTerminationPolicyRequest:
    request = run_service_pb2.SetEarlyTerminationPolicyRequest(workspace="default", run_id=run_id)
    request.policy.primary_metric = "a"
    request.policy.goal = goal  # type: ignore[assignment]
    request.policy.median_stopping.SetInParent()
    return request


def test_a_lightning_child_stops_training(
    url: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """A Lightning child of a sweep logs its `score` every step with
    SteplogLogger; the parent's bandit policy cancels it at interval 3 (its
    score 0 is far below the leader's 10), the run's heartbeat brings
    CancelRequested, the logger sets trainer.should_stop, training ends long
    before max_steps and finalize marks the run Canceled."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from steplog.integrations.lightning import SteplogLogger
    from steplog.sweep import BanditPolicy

    # A workspace of its own: a new client in this process, whose heartbeat
    # beats every BEAT seconds (read when the client is made).
    monkeypatch.setenv("STEPLOG_HEARTBEAT_INTERVAL", str(BEAT))
    workspace = "sweep-lightning"
    exp = Experiment(workspace, experiment_name, url=url)
    parent = exp.start_logging(display_name="sweep")
    # bandit, slack_amount 1, applied from interval 3: the child's best 0 is
    # below 10 - 1 = 9 at interval 3 -> cancelled at 3.
    parent.set_early_termination_policy(
        BanditPolicy(1, slack_amount=1.0, delay_evaluation=3), primary_metric="score"
    )
    leader = parent.child_run("leader")
    for step in range(5):
        leader.log("score", 10.0, step=step)
    assert leader.flush(30)
    learner = parent.child_run("lightning")

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("score", 0.0, on_step=True, on_epoch=False)
            time.sleep(0.005)  # about 200 steps a second at most
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
    logger = SteplogLogger(experiment_name, run_id=learner.id, url=url, workspace=workspace)
    max_steps = 20_000  # 100 s at least if it never stopped
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    start = time.monotonic()
    trainer.fit(Tiny(), DataLoader(data, batch_size=8))
    took = time.monotonic() - start
    assert trainer.should_stop and trainer.global_step < max_steps
    assert took < 30, took
    details = learner.get_details()
    assert details["properties"][INTERVAL] == "3"
    assert "slack_amount 1" in details["properties"][REASON]
    assert details["status"] == "Canceled"  # finalize: asked to stop -> Canceled
    assert leader.get_status() == "Running"
