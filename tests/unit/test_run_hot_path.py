"""Run.log's and Run.log_row's hot paths (a series or table the run logged
before writes its point itself, steplog._writer.series.NumericBuffer.log and
Buffers.row_appender) keep every semantic of the general path: value types,
errors, text series of the same name, the memory bound's slow path, exactly
once, and a forked child's points going to the child's writer."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from steplog._writer import BatchWriter
from steplog.client import Client
from steplog.errors import InvalidArgumentError
from steplog.run import Run
from steplog.v1 import common_pb2
from tests.unit.test_writer import WAIT, FakeTransport, make, stored


@pytest.fixture(autouse=True)
def default_spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def writers() -> Iterator[list[BatchWriter]]:
    made: list[BatchWriter] = []
    yield made
    for w in made:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.close(timeout=2)


def run_on(w: BatchWriter) -> Run:
    client = Client("127.0.0.1:1", "ws")
    client._writer = w
    return Run(_proto=common_pb2.Run(run_id="r1"), _client=client)


def test_hot_path_values_errors_and_text(fake: FakeTransport, writers: list[BatchWriter]) -> None:
    w = make(writers, fake, max_batch_points=7)
    run = run_on(w)
    run.log("loss", 0.5, step=0)  # the general path: the series is created
    assert "loss" in run._hot
    run.log("loss", 2, step=1)  # int
    run.log("loss", True, step=2)  # bool
    run.log("loss", np.float32(0.25), step=3)
    run.log("loss", float("nan"), step=4)
    run.log("loss", float("-inf"), step=np.int64(5))
    with pytest.raises(InvalidArgumentError, match="must be a number"):
        run.log("loss", object(), step=6)
    with pytest.raises(TypeError):
        run.log("loss", 1.0, step=6.5)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        run.log("loss", 1.0, step=2**63)
    run.log("note", "text", step=0)  # a text series is never hot
    assert "note" not in run._hot
    for i in range(1, 200):  # the slow path every 7 points, chunks sealed on the way
        run.log("loss", float(i), step=5 + i)
    assert w.flush(WAIT)
    got = stored(fake)
    assert got[:4] == [0.5, 2.0, 1.0, 0.25]
    assert np.isnan(got[4]) and got[5] == float("-inf")
    assert got[6:] == [float(i) for i in range(1, 200)]
    assert stored(fake, "note") == ["text"]
    assert w.stats.points_acked == 206


def test_hot_rows_check_cells_and_arrive_once(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    w = make(writers, fake, max_batch_points=5)
    run = run_on(w)
    for i in range(23):
        run.log_row("t", epoch=i, loss=0.5 * i, tag="é" if i % 2 else "x", ok=None)
    with pytest.raises(InvalidArgumentError, match="'bad'"):
        run.log_row("t", epoch=99, bad=object())
    run.log_row("t", other=1.5)  # new columns: a new segment
    assert w.flush(WAIT)
    assert w.stats.points_acked == 24


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_logs_to_its_own_writer(
    fake: FakeTransport, writers: list[BatchWriter]
) -> None:
    fake.hold_acks = True
    w = make(writers, fake)
    run = run_on(w)
    for i in range(10):
        run.log("loss", float(i), step=i)  # hot after the first
        run.log_row("t", epoch=i)
    parent_hot: Any = run._hot
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return to pytest
        code = 1
        try:
            # steplog._lifecycle's at-fork hook has reset the writer.
            checks = [not parent_hot, w.stats.points_buffered == 0]
            fake.hold_acks = False
            run.log("loss", 100.0, step=100)
            run.log("loss", 101.0, step=101)  # hot again, on the child's buffers
            run.log_row("t", epoch=100)
            checks.append(w.flush(WAIT))
            checks.append(stored(fake) == [100.0, 101.0])
            checks.append(w.stats.points_acked == 3)
            code = 0 if all(checks) else 10 + checks.index(False)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fake.release_acks()
    assert w.flush(WAIT)
    assert stored(fake) == [float(i) for i in range(10)]
