"""Hugging Face transformers: `Trainer(..., callbacks=[SteplogCallback()])`.

- on_train_begin: creates the run (or attaches to STEPLOG_RUN_ID, or uses
  the `run` given) and records the TrainingArguments as properties (tokens
  are already masked by `TrainingArguments.to_dict()`).
- on_log: every numeric value at `state.global_step` (what
  `trainer.state.log_history` holds); on_evaluate: the evaluation metrics
  (those on_log has not already sent at that step). A series keeps one
  value per step: when a name comes again at the step it was sent at
  (`trainer.evaluate()` after `train()` re-measures `eval_runtime` at the
  final step, where training's last evaluation was), the first stays.
- on_save: with `log_checkpoints=True`, uploads the checkpoint folder as
  run files under `checkpoints/checkpoint-<step>/`.
- on_train_end: flushes, and the run this callback created is completed
  (Canceled if the service had asked it to stop) when it is finished
  with: at `callback.finish()`, at the next `train()`, or at process exit,
  so the usual `trainer.train(); trainer.evaluate()` lands in one run.

Only the main process (`state.is_world_process_zero`) talks to the
service. When the service moves the run to CancelRequested (a sweep's
early-termination policy, or anyone's cancel) the callback sets
`control.should_training_stop` at the next logging step, on every process
(one small all-reduce per logging step in a multi-process job, so that no
rank trains on alone).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from steplog.experiment import Experiment
from steplog.integrations import _params
from steplog.run import TERMINAL_STATUSES, Run

log = logging.getLogger("steplog.integrations")


class SteplogCallback(TrainerCallback):
    """Logs a Trainer's metrics to a steplog run.

    experiment_name: the steplog experiment (created when missing).
    run: log to this run (the caller ends it). run_name: the new run's
    display name (default: TrainingArguments.run_name). tags: its tags.
    log_checkpoints: upload each saved checkpoint. log_system_metrics:
    sample CPU, memory, disk, network and GPUs into the run.
    stop_on_cancel: set control.should_training_stop when the service asks
    the run to stop. url / workspace: where the run lives (STEPLOG_URL,
    STEPLOG_WORKSPACE by default)."""

    def __init__(
        self,
        experiment_name: str = "huggingface",
        *,
        run: Run | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        log_checkpoints: bool = False,
        log_system_metrics: bool = False,
        stop_on_cancel: bool = True,
        url: str | None = None,
        workspace: str | None = None,
    ) -> None:
        self._experiment_name = experiment_name
        self._run = run
        self._owns = False
        self._run_name = run_name
        self._tags = dict(tags) if tags else None
        self._log_checkpoints = log_checkpoints
        self._log_system_metrics = log_system_metrics
        self._stop_on_cancel = stop_on_cancel
        self._url = url
        self._workspace = workspace
        # name -> (step, value) last sent, so on_evaluate does not resend
        # what on_log sent a moment before.
        self._sent: dict[str, tuple[int, float]] = {}
        self._kept_first: set[str] = set()
        self._finish_registered = False
        self._stop_noted = False

    @property
    def run(self) -> Run | None:
        return self._run

    # -- the run ---------------------------------------------------------------------

    def _open(self, args: TrainingArguments) -> Run:
        attach = os.environ.get("STEPLOG_RUN_ID")
        if attach:
            run = Run.get(self._workspace, attach, url=self._url)
            if run.status in TERMINAL_STATUSES:
                raise RuntimeError(f"STEPLOG_RUN_ID names run {attach!r}, which is {run.status}")
            return run
        if self._workspace is not None:
            from steplog.experiment import Workspace

            exp = Experiment(Workspace(self._workspace, url=self._url), self._experiment_name)
        else:
            exp = Experiment(self._experiment_name, url=self._url)
        run_name = self._run_name or getattr(args, "run_name", None) or ""
        self._owns = True
        return exp.start_logging(display_name=run_name, run_type="transformers", tags=self._tags)

    def finish(self) -> None:
        """Complete the run this callback created (Canceled if the service
        asked it to stop); a run it attached to or was given is only
        flushed. Safe to call twice."""
        run = self._run
        if run is None:
            return
        run._stop_system_metrics()
        if not self._owns:
            run.flush(None)
            return
        self._owns = False
        run.refresh()
        if run.status in TERMINAL_STATUSES:
            return
        if run.should_stop():
            run.cancel()
        else:
            run.complete()

    # -- Trainer events -------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        if self._run is not None and self._owns:
            # A second train() with this callback: the first run is done.
            self.finish()
            self._run = None
        if self._run is None:
            self._run = self._open(args)
            self._sent.clear()
            if self._log_system_metrics:
                from steplog.integrations import system

                system.start(self._run)
        _params.add_properties(self._run, _params.to_properties(args.to_dict()))  # type: ignore[no-untyped-call]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            self._log(logs, state.global_step)
        self._check_stop(args, control)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and metrics:
            self._log(metrics, state.global_step)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not (self._log_checkpoints and state.is_world_process_zero and self._run):
            return
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self._run.upload_folder(f"checkpoints/{folder.name}", folder, overwrite=True)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or self._run is None:
            return
        self._run.flush(None)
        if self._owns and not self._finish_registered:
            # Completed when finished with (an evaluate() may follow train()):
            # at finish(), the next train(), or exit. atexit runs handlers
            # last-registered first, so this runs before the client closes.
            self._finish_registered = True
            atexit.register(self.finish)

    # -- helpers ----------------------------------------------------------------------

    def _log(self, values: Mapping[str, Any], step: int) -> None:
        run = self._run
        if run is None:
            return
        for key, value in values.items():
            number = _params.numeric(value)
            if number is None:
                continue  # strings and lists in logs are not metrics
            last = self._sent.get(key)
            if last is not None and last[0] == step:
                # Sent at this step already (on_evaluate after on_log; an
                # evaluate() after train() measuring eval_runtime again at
                # the final step): a series keeps one value per step, the first.
                if last[1] != number and key not in self._kept_first:
                    self._kept_first.add(key)
                    log.info(
                        "steplog: %s at step %d was logged again with another value; the run "
                        "keeps the first (one value per step)",
                        key,
                        step,
                    )
                continue
            run.log(key, number, step=step)
            self._sent[key] = (step, number)

    def _check_stop(self, args: TrainingArguments, control: TrainerControl) -> None:
        if not self._stop_on_cancel:
            return
        local = self._run is not None and self._run.should_stop()
        decision = local
        world = int(getattr(args, "world_size", 1) or 1)
        if world > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([1.0 if local else 0.0], device=args.device)
                dist.all_reduce(flag)
                decision = bool(flag.item() > 0)
        if decision:
            control.should_training_stop = True
            if not self._stop_noted and self._run is not None:
                self._stop_noted = True
                log.warning(
                    "steplog: run %s was asked to stop (CancelRequested); stopping training",
                    self._run.id,
                )
