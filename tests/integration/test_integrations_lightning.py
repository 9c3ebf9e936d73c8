"""SteplogLogger with real PyTorch Lightning on the CPU against the real
service: what the run stores equals, step for step, what Lightning's own
CSVLogger wrote in the same training; hyperparameters become properties,
checkpoints run files, the run ends Completed; under DDP (gloo, two
processes started by Lightning) with every rank logging and with rank zero
only."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from steplog import Run
from steplog.integrations.lightning import HANDOFF_ENV, SteplogLogger
from tests.integration import lightning_job

JOB = Path(lightning_job.__file__)


def csv_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {name: [(step, value), ...]}: one row per log_metrics
    call, an empty cell where the call had no such metric. An exact repeat
    of a series' last point (Lightning logs `epoch` with every call) is one
    point, as steplog stores it."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for name, cell in row.items():
                if cell == "":
                    continue
                point = (step, float(cell))
                if not out[name] or out[name][-1] != point:
                    out[name].append(point)
    return dict(out)


def stored(run: Run, name: str, labels: dict[str, str] | None = None) -> list[tuple[int, float]]:
    series = run.get_series(name, labels=labels)
    return list(zip(series["steps"], series["values"], strict=True))


def test_lightning_series_equal_csvlogger_step_for_step(
    url: str, experiment_name: str, tmp_path: Path
) -> None:
    logger = SteplogLogger(
        experiment_name, url=url, run_name="tiny", log_checkpoints=True, tags={"suite": "it"}
    )
    trainer, csv_logger = lightning_job.train(logger, tmp_path)
    expected = csv_series(Path(csv_logger.log_dir) / "metrics.csv")
    # What the model logs, and Lightning's epoch.
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "weight_norm", "epoch"} <= set(
        expected
    )
    run = Run.get(logger.run_id, url=url)
    names = set(run.get_metrics())
    assert names == set(expected)
    for name, points in expected.items():
        assert stored(run, name) == points, name
    assert len(expected["val_loss"]) == lightning_job.EPOCHS
    assert run.status == "Completed"
    assert run.type == "lightning" and run.display_name == "tiny" and run.tags["suite"] == "it"
    # save_hyperparameters() -> properties, nested dicts flattened.
    props = run.get_properties()
    assert props["lr"] == "0.05"
    assert props["optimizer/name"] == "sgd" and props["optimizer/momentum"] == "0.0"
    # The best checkpoint is a run file; the logger's name/version are the run's.
    best = Path(trainer.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
    assert f"checkpoints/{best.name}" in run.get_file_names()
    assert logger.name == experiment_name and logger.version == run.id
    assert logger.experiment.id == run.id
    assert not run.rejections()


def test_lightning_attaches_to_steplog_run_id_and_leaves_it_running(
    url: str, experiment_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steplog import Experiment

    owner = Experiment(experiment_name, url=url).start_logging(display_name="outer")
    monkeypatch.setenv("STEPLOG_RUN_ID", owner.id)
    logger = SteplogLogger(experiment_name, url=url)
    assert logger.run_id == owner.id
    lightning_job.train(logger, tmp_path, epochs=1)
    assert owner.get_status() == "Running"  # the creator completes it
    assert len(stored(owner, "val_loss")) == 1
    owner.complete()


def test_lightning_failure_marks_the_run_failed(
    url: str, experiment_name: str, tmp_path: Path
) -> None:
    import lightning.pytorch as pl

    class Boom(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            raise RuntimeError("boom")

    logger = SteplogLogger(experiment_name, url=url)
    with pytest.raises(RuntimeError, match="boom"):
        lightning_job.train(logger, tmp_path, callbacks=[Boom()])
    run = Run.get(logger.run_id, url=url)
    assert run.status == "Failed"
    assert run.get_details()["error"]["error"]["code"] == "LightningFailed"


@pytest.fixture(scope="module")
def ddp_runs(url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:
    """One `strategy="ddp", devices=2` job (gloo; Lightning starts rank one
    by running the script again) training twice: every rank logging, then
    rank zero only."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("STEPLOG_RUN_ID", HANDOFF_ENV)}
    env.update(STEPLOG_URL=url, PYTHONUNBUFFERED="1")
    experiment = f"ddp-{uuid.uuid4().hex[:12]}"
    done = subprocess.run(
        [sys.executable, str(JOB), experiment, str(out), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {
        mode: (Run.get((out / mode / "run_id").read_text(), url=url), out / mode)
        for mode in ("all", "zero")
    }


def test_ddp_every_rank_logs_to_one_run_with_its_rank_label(
    ddp_runs: dict[str, tuple[Run, Path]],
) -> None:
    run, out = ddp_runs["all"]
    assert run.status == "Completed"
    # CSVLogger writes rank zero's metrics; rank zero's series equal them.
    expected = csv_series(out / "csv" / "version_0" / "metrics.csv")
    names = set(run.get_metrics())
    assert names == {f"{n}{{rank={r}}}" for n in expected for r in ("0", "1")}
    for name, points in expected.items():
        assert stored(run, name, {"rank": "0"}) == points, name
        other = stored(run, name, {"rank": "1"})
        # Rank one logged at the same steps; its own batches, its own values.
        assert [s for s, _ in other] == [s for s, _ in points], name
    losses = [v for _, v in stored(run, "train_loss_step", {"rank": "1"})]
    assert losses != [v for _, v in stored(run, "train_loss_step", {"rank": "0"})]
    assert all(math.isfinite(v) for v in losses)


def test_ddp_rank_zero_only_by_default(ddp_runs: dict[str, tuple[Run, Path]]) -> None:
    run, out = ddp_runs["zero"]
    assert run.status == "Completed"
    expected = csv_series(out / "csv" / "version_0" / "metrics.csv")
    assert set(run.get_metrics()) == set(expected)  # no rank labels, no second rank
    for name, points in expected.items():
        assert stored(run, name) == points, name
