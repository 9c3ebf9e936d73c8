"""PyTorch Lightning: `Trainer(logger=SteplogLogger("mnist"))`.

Metrics go to a steplog run at Lightning's step; hyperparameters become
properties of the run; `finalize` marks the run Completed (Failed when
Lightning reports a failure, Canceled when the service asked the run to
stop); checkpoints can be uploaded as run files.

Ranks. By default only global rank zero logs, as with every Lightning
logger. With `log_all_ranks=True` every rank logs to the same run, each
series with its `rank` label. The ranks agree on the run like this:
STEPLOG_RUN_ID names it when set (all ranks attach; whoever created it
completes it); otherwise the process that builds the logger picks the run
id and hands it on, as an attribute of the logger to the ranks `ddp_spawn`
/ `ddp_notebook` start (they receive the logger pickled) and through the
environment variable STEPLOG_LIGHTNING_RUN_ID to the ranks the `ddp`
strategy starts as subprocesses (they inherit its environment). Where a
launcher starts every rank itself (torchrun, SLURM, mpirun), set
STEPLOG_RUN_ID. Every rank creates the run with that id (creation with an
id is idempotent), rank zero completes it after a barrier, so no rank's
points arrive after the run ended.

Early termination: when the service moves the run to CancelRequested (a
sweep's policy, or anyone's cancel), `trainer.should_stop` is set on every
rank at the next logging call (the ranks agree through one small
all-reduce per logging call in a multi-process job).
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger

from steplog.experiment import Experiment
from steplog.integrations import _params
from steplog.run import TERMINAL_STATUSES, Run

log = logging.getLogger("steplog.integrations")

HANDOFF_ENV = "STEPLOG_LIGHTNING_RUN_ID"


def _global_rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _new_run_id(experiment: str) -> str:
    import uuid

    # The form the service (and the client) give a run id.
    return f"{experiment[:100]}_{uuid.uuid4().hex[:20]}"


class SteplogLogger(Logger):
    """A Lightning logger writing to one steplog run.

    experiment_name: the steplog experiment (created when missing).
    run_name: the run's display name. run_id: create or resume this run
    (else STEPLOG_RUN_ID, else a new one). tags: the run's tags.
    log_all_ranks: every rank logs, with a `rank` label (see the module).
    log_checkpoints: upload the checkpoints ModelCheckpoint saves as run
    files under `checkpoints/` ("all": every one as it is saved; True: the
    ones left at the end, the best among them). log_system_metrics: sample
    CPU, memory, disk, network and GPUs into the run (on local rank zero of
    each node that logs). prefix: put before every metric name, with "-"
    (as Lightning's loggers do). url / workspace / experiment: where the
    run lives (STEPLOG_URL, STEPLOG_WORKSPACE by default)."""

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        log_all_ranks: bool = False,
        log_checkpoints: bool | str = False,
        log_system_metrics: bool = False,
        stop_on_cancel: bool = True,
        prefix: str = "",
        url: str | None = None,
        workspace: str | None = None,
        experiment: Experiment | None = None,
    ) -> None:
        super().__init__()
        if log_checkpoints not in (True, False, "all"):
            raise ValueError(
                f"log_checkpoints must be True, False or 'all', not {log_checkpoints!r}"
            )
        self._experiment_name = experiment.name if experiment is not None else experiment_name
        self._experiment_obj = experiment
        self._run_name = run_name
        self._tags = dict(tags) if tags else None
        self._log_all_ranks = log_all_ranks
        self._log_checkpoints = log_checkpoints
        self._log_system_metrics = log_system_metrics
        self._stop_on_cancel = stop_on_cancel
        self._prefix = prefix
        self._url = url
        self._workspace = workspace
        self._run: Run | None = None
        self._trainer: Any = None
        self._checkpoint_callback: ModelCheckpoint | None = None
        self._uploaded: dict[str, float] = {}
        self._stop_noted = False
        # Who owns the run: True when this logger created it (it completes
        # it), False when it attached to STEPLOG_RUN_ID.
        attach = os.environ.get("STEPLOG_RUN_ID")
        if run_id:
            self._run_id, self._owns = run_id, True
        elif attach:
            self._run_id, self._owns = attach, False
        elif _global_rank() > 0 and log_all_ranks:
            handed = os.environ.get(HANDOFF_ENV)
            if not handed:
                raise RuntimeError(
                    "SteplogLogger(log_all_ranks=True) on rank "
                    f"{_global_rank()} was given no run id: under a launcher that starts every "
                    "rank itself (torchrun, SLURM, mpirun) set STEPLOG_RUN_ID to one run for "
                    "all ranks"
                )
            self._run_id, self._owns = handed, True
        else:
            self._run_id, self._owns = _new_run_id(self._experiment_name), True
            if log_all_ranks and _global_rank() == 0:
                # The ranks Lightning's `ddp` launcher starts inherit this.
                os.environ[HANDOFF_ENV] = self._run_id

    # -- what Lightning asks of a logger ----------------------------------------

    @property
    def name(self) -> str:
        return self._experiment_name

    @property
    def version(self) -> str:
        return self._run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def _logs_here(self) -> bool:
        return self._log_all_ranks or _global_rank() == 0

    @property
    def experiment(self) -> Run:
        """The steplog Run (created or attached on first use). On a rank that
        does not log, a Run is still returned only if this rank logs; else
        Lightning's dummy experiment, whose methods do nothing."""
        if self._run is not None:
            return self._run
        if not self._logs_here():
            from lightning.fabric.loggers.logger import _DummyExperiment

            return _DummyExperiment()  # type: ignore[return-value]
        self._run = self._open()
        if self._log_system_metrics and self._local_rank() == 0:
            from steplog.integrations import system

            system.start(self._run)
        return self._run

    def _open(self) -> Run:
        if not self._owns:
            run = Run.get(self._workspace, self._run_id, url=self._url)
            if run.status in TERMINAL_STATUSES:
                raise RuntimeError(
                    f"STEPLOG_RUN_ID names run {self._run_id!r}, which is {run.status}"
                )
            return run
        exp = self._experiment_obj or Experiment(self._experiment_name, url=self._url)
        if self._experiment_obj is None and self._workspace is not None:
            from steplog.experiment import Workspace

            exp = Experiment(Workspace(self._workspace, url=self._url), self._experiment_name)
        self._experiment_obj = exp
        return exp.start_logging(
            display_name=self._run_name,
            run_type="lightning",
            run_id=self._run_id,
            tags=self._tags,
        )

    def _local_rank(self) -> int:
        if self._trainer is not None:
            return int(self._trainer.local_rank)
        return int(os.environ.get("LOCAL_RANK", "0") or 0)

    def _labels(self) -> dict[str, str] | None:
        return {"rank": str(_global_rank())} if self._log_all_ranks else None

    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        """Hyperparameters as properties of the run (nested keys as `a/b`),
        from rank zero."""
        if _global_rank() != 0:
            return
        if not isinstance(params, (Mapping, Namespace)):
            return
        run = self.experiment
        _params.add_properties(run, _params.to_properties(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._logs_here():
            run = self.experiment
            labels = self._labels()
            for key, value in metrics.items():
                number = _params.numeric(value)
                if number is None:
                    continue  # Lightning's metrics are numbers; a string is skipped, as MLflow's
                name = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
                run.log(name, number, step=step, labels=labels)
        self._check_stop()

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Lightning calls this on every rank at the start of fit / validate /
        test with the LightningModule: the logger keeps its trainer, to set
        `trainer.should_stop` when the service asks the run to stop."""
        trainer = getattr(model, "_trainer", None)
        if trainer is not None:
            self._trainer = trainer

    def _check_stop(self) -> None:
        trainer = self._trainer
        if not self._stop_on_cancel or trainer is None:
            return
        local = self._run is not None and self._run.should_stop()
        decision = local
        if int(getattr(trainer, "world_size", 1)) > 1:
            # Every rank calls log_metrics at the same points: agree, or one
            # rank would stop while another waits for it in an all-reduce.
            decision = bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        if decision:
            trainer.should_stop = True
            if not self._stop_noted and _global_rank() == 0:
                self._stop_noted = True
                log.warning(
                    "steplog: run %s was asked to stop (CancelRequested); stopping training",
                    self._run_id,
                )

    def save(self) -> None:
        """Nothing to do: points are sent in the background; finalize flushes."""

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if not self._log_checkpoints or _global_rank() != 0:
            return
        if self._log_checkpoints == "all" or checkpoint_callback.save_top_k == -1:
            self._upload_checkpoints(checkpoint_callback)
        else:
            self._checkpoint_callback = checkpoint_callback

    def _upload_checkpoints(self, callback: ModelCheckpoint) -> None:
        """Upload the checkpoints saved since the last upload (by file name and
        modification time), as `checkpoints/<file name>`."""
        paths = [
            callback.best_model_path,
            callback.last_model_path,
            *callback.best_k_models,
        ]
        run = self.experiment
        for path in dict.fromkeys(p for p in paths if p):
            file = Path(path)
            if not file.is_file():
                continue
            mtime = file.stat().st_mtime
            if self._uploaded.get(str(file)) == mtime:
                continue
            # Waits: ModelCheckpoint may delete the file once a better one exists.
            run.upload_file(f"checkpoints/{file.name}", file, overwrite=True)
            self._uploaded[str(file)] = mtime

    def finalize(self, status: str) -> None:
        """Flush; rank zero (after every logging rank has flushed) marks the
        run Completed for "success" / "finished", Failed for "failed", and
        Canceled when the service had asked it to stop. A run attached
        through STEPLOG_RUN_ID is only flushed."""
        run = self._run
        if run is None and not (self._logs_here() and _global_rank() == 0):
            return
        if self._checkpoint_callback is not None and _global_rank() == 0:
            self._upload_checkpoints(self._checkpoint_callback)
        run = self._run
        if run is not None:
            run._stop_system_metrics()
            run.flush(None)
        if self._log_all_ranks and status != "failed":
            self._barrier()
        if run is None or _global_rank() != 0 or not self._owns:
            return
        run.refresh()
        if run.status in TERMINAL_STATUSES:
            return
        if status == "failed":
            run.fail("Lightning reported the training failed", "LightningFailed")
        elif run.should_stop():
            run.cancel()
        else:
            run.complete()

    @staticmethod
    def _barrier() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # -- ddp_spawn pickles the logger into every rank ----------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run"] = None
        state["_trainer"] = None
        state["_experiment_obj"] = None
        return state
