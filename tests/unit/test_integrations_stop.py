"""The integrations' side of early termination, beside the Run boundary: a
run whose should_stop() is True makes the Lightning logger set
trainer.should_stop and the transformers callback set
control.should_training_stop (the end-to-end sweep test is
test_early_termination.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from transformers import TrainerControl

from steplog.integrations.lightning import SteplogLogger
from steplog.integrations.transformers import SteplogCallback


class FakeRun:
    id = "r1"

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.logged: list[tuple[str, float, int | None]] = []

    def should_stop(self) -> bool:
        return self.stop

    def log(self, name: str, value: float, step: int | None = None, **kw: Any) -> None:
        self.logged.append((name, value, step))


def test_lightning_logger_sets_trainer_should_stop() -> None:
    logger = SteplogLogger("e", run_id="e_1")
    trainer = SimpleNamespace(world_size=1, should_stop=False, local_rank=0)
    logger.log_graph(SimpleNamespace(_trainer=trainer))
    run = FakeRun(stop=False)
    logger._run = run  # type: ignore[assignment]
    logger.log_metrics({"loss": 1.0}, step=3)
    assert not trainer.should_stop and run.logged == [("loss", 1.0, 3)]
    run.stop = True
    logger.log_metrics({"loss": 0.5}, step=4)
    assert trainer.should_stop
    # stop_on_cancel=False leaves the trainer alone
    quiet = SteplogLogger("e", run_id="e_2", stop_on_cancel=False)
    other = SimpleNamespace(world_size=1, should_stop=False, local_rank=0)
    quiet.log_graph(SimpleNamespace(_trainer=other))
    quiet._run = FakeRun(stop=True)  # type: ignore[assignment]
    quiet.log_metrics({"loss": 1.0}, step=0)
    assert not other.should_stop


def test_transformers_callback_sets_should_training_stop() -> None:
    callback = SteplogCallback("e")
    run = FakeRun(stop=False)
    callback._run = run  # type: ignore[assignment]
    args = SimpleNamespace(world_size=1)
    state = SimpleNamespace(is_world_process_zero=True, global_step=7)
    control = TrainerControl()
    callback.on_log(args, state, control, logs={"loss": 0.25, "note": "x"})  # type: ignore[arg-type]
    assert not control.should_training_stop and run.logged == [("loss", 0.25, 7)]
    run.stop = True
    callback.on_log(args, state, control, logs={"loss": 0.25})  # type: ignore[arg-type]
    assert control.should_training_stop
