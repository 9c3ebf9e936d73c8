"""Run: one execution of a training script, after Azure ML's `Run`.

Logging calls (`log`, `log_list`, ...) only append to in-memory column
buffers; a background thread sends them (see steplog._writer.writer). Everything
else is a unary call that raises a typed steplog error on failure.

Over 500 lines because Azure ML's `Run` is one class of about 80 public
methods that scripts call unchanged; each method here checks its arguments
and delegates (the writer, steplog._tables, steplog._histograms,
steplog.query), so the class is wide, not deep. Its run files
(steplog._run_files) and the methods of the rest of Azure ML
(steplog._run_azure) are parts of it kept in modules of their own.
"""

from __future__ import annotations

import builtins
import operator
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Unpack

from steplog import _azure, _settings
from steplog._batch import batch_columns
from steplog._run_azure import AzureOnly
from steplog._run_files import RunFiles
from steplog._writer.outcomes import WriterStats
from steplog._writer.series import NumericBuffer
from steplog._writer.transport import Rejection
from steplog.client import Client, Connection, get_client
from steplog.errors import FailedPreconditionError, InvalidArgumentError
from steplog.experiment import Experiment, Workspace, _client_of, tags_from_proto, tags_to_proto
from steplog.v1 import common_pb2
from steplog.v1 import run_service_pb2 as rs

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from steplog.sweep import AttachedPolicy, EarlyTerminationPolicy, PrimaryMetricGoal

STATUS_NAMES: dict[int, str] = {
    common_pb2.RUN_STATUS_NOT_STARTED: "NotStarted",
    common_pb2.RUN_STATUS_QUEUED: "Queued",
    common_pb2.RUN_STATUS_RUNNING: "Running",
    common_pb2.RUN_STATUS_FINALIZING: "Finalizing",
    common_pb2.RUN_STATUS_CANCEL_REQUESTED: "CancelRequested",
    common_pb2.RUN_STATUS_COMPLETED: "Completed",
    common_pb2.RUN_STATUS_FAILED: "Failed",
    common_pb2.RUN_STATUS_CANCELED: "Canceled",
    common_pb2.RUN_STATUS_NOT_RESPONDING: "NotResponding",
}
STATUS_VALUES = {v: k for k, v in STATUS_NAMES.items()}
TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Canceled"})

Labels = tuple[tuple[str, str], ...]
_wall_time = time.time


def _status_value(status: str) -> int:
    try:
        return STATUS_VALUES[status]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown status {status!r}; one of {sorted(STATUS_VALUES)}", field="status"
        ) from None


def _iso(ts: Timestamp) -> str | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def distributed_labels() -> dict[str, str]:
    """Under a distributed launcher (RANK and WORLD_SIZE set, world > 1) every
    series gets a rank label, so ranks logging "loss" do not collide."""
    rank = os.environ.get("RANK")
    world = os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None and world.isdigit() and int(world) > 1:
        return {"rank": rank}
    return {}


# The property that get_details() reports as "submittedBy" (Azure ML's
# system properties are set at creation too): STEPLOG_SUBMITTED_BY, else the
# local user name.
SUBMITTED_BY = "steplog.submitted_by"


def _submitter() -> str:
    who = os.environ.get("STEPLOG_SUBMITTED_BY")
    if who:
        return who
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return ""


# What get_detailed_status says about a status that is not Running.
_STATUS_DETAILS = {
    "NotStarted": "The run was created and has not started.",
    "Queued": "The run is waiting to start.",
    "Finalizing": "The run's code has finished; it is being finalized.",
    "CancelRequested": "Cancellation was requested.",
    "NotResponding": "No data or heartbeat from the run recently.",
}

# Run.add_type_provider: run type -> factory(experiment, run) -> Run.
_TYPE_PROVIDERS: dict[str, Any] = {}


def _rehydrate(runs: list[Run], experiment: Experiment | None) -> list[Run]:
    if not _TYPE_PROVIDERS:
        return runs
    return [
        _TYPE_PROVIDERS[r.type](experiment or r.experiment, r) if r.type in _TYPE_PROVIDERS else r
        for r in runs
    ]


def _freeze(labels: Mapping[str, str] | None) -> Labels:
    if not labels:
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


class Run(RunFiles, AzureOnly):
    """A run of an experiment. Create one with `Experiment.start_logging()`,
    attach to one with `Run.get_context()` or `Run.get(run_id)`."""

    def __init__(
        self,
        experiment: Experiment | None = None,
        run_id: str | None = None,
        outputs: str | None = None,
        *,
        _proto: common_pb2.Run | None = None,
        _client: Client | None = None,
        labels: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if _proto is None:
            if run_id is None:
                raise InvalidArgumentError("run_id is required", field="run_id")
            client = _client or (experiment._client if experiment else get_client())
            _proto = client.call(
                client.runs.GetRun, rs.GetRunRequest(workspace=client.workspace, run_id=run_id)
            ).run
            _client = client
        assert _client is not None
        self._client = _client
        self._proto = _proto
        self._experiment = experiment
        merged = distributed_labels()
        merged.update(labels or {})
        self._labels: Labels = _freeze(merged)
        self._label_cache: dict[Labels, Labels] = {}
        # {name: series} of the writer's stepped numeric series of this run
        # (default labels), filled by the first log of each: Run.log's hot path.
        self._hot: dict[str, NumericBuffer] = {}
        self._hot_rows: dict[str, Callable[[Mapping[str, Any], float, str], int | None]] = {}
        # An offline run (Run.get_context with STEPLOG_OFFLINE): status, tags
        # and properties go to the spool, in order with the points; no call.
        self._offline = False
        # Azure's `outputs`: a directory uploaded as run files at the end.
        self._outputs = outputs
        # Run.get_context(used_for_context_manager=True): `with run:` only
        # flushes (and marks the run Failed on an exception); the process that
        # created the run completes it.
        self._attached = False
        self._stream = False  # a handle from new_stream(), with a writer of its own
        # start_logging(log_system_metrics=True): steplog.integrations.system's
        # sampler, stopped (after one last sample) before the run ends.
        self._system_metrics: Any = None
        for key in sorted(kwargs):
            if not key.startswith("_"):
                _azure.ignored("Run", key, "not a steplog run setting")

    @classmethod
    def _create(
        cls,
        client: Client,
        experiment: str,
        *,
        display_name: str = "",
        description: str = "",
        run_type: str = "",
        run_id: str | None = None,
        parent_run_id: str = "",
        tags: Mapping[str, str | None] | None = None,
        properties: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        status: int = common_pb2.RUN_STATUS_RUNNING,
        outputs: str | None = None,
    ) -> Run:
        reply = client.call(
            client.runs.CreateRun,
            rs.CreateRunRequest(
                workspace=client.workspace,
                experiment_name=experiment,
                run_id=run_id or "",
                display_name=display_name,
                description=description,
                run_type=run_type,
                parent_run_id=parent_run_id,
                tags=tags_to_proto(tags),
                properties={SUBMITTED_BY: _submitter(), **dict(properties or {})},
                status=status,  # type: ignore[arg-type]
            ),
        )
        run = cls(outputs=outputs, _proto=reply.run, _client=client, labels=labels)
        if run.status == "Running":
            client.heartbeat.add(run.id)
            client.connect_streams()
        return run

    # -- identity --------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._proto.run_id

    @property
    def number(self) -> int:
        return self._proto.number

    @property
    def display_name(self) -> str:
        return self._proto.display_name

    @property
    def name(self) -> str:
        return self._proto.display_name

    @property
    def description(self) -> str:
        return self._proto.description

    @property
    def type(self) -> str:
        return self._proto.run_type

    @property
    def status(self) -> str:
        return STATUS_NAMES.get(self._proto.status, "Unknown")

    @property
    def tags(self) -> dict[str, str | None]:
        return tags_from_proto(self._proto.tags)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._proto.properties)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._labels)

    @property
    def experiment(self) -> Experiment:
        if self._experiment is None:
            self._experiment = Experiment(self._proto.experiment_name, _client=self._client)
        return self._experiment

    @property
    def parent(self) -> Run | None:
        if not self._proto.parent_run_id:
            return None
        return Run(run_id=self._proto.parent_run_id, _client=self._client)

    def __repr__(self) -> str:
        return (
            f"Run(experiment={self._proto.experiment_name!r}, id={self.id!r}, "
            f"number={self.number}, status={self.status!r})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _set(self, proto: common_pb2.Run) -> None:
        self._proto = proto

    def refresh(self) -> None:
        if self._offline:
            return  # what this process set is all it knows
        self._set(
            self._client.call(
                self._client.runs.GetRun,
                rs.GetRunRequest(workspace=self._client.workspace, run_id=self.id),
            ).run
        )

    # -- metrics (the hot path: no I/O) ----------------------------------------------

    def _series_labels(self, labels: Mapping[str, str] | None) -> Labels:
        if not labels:
            return self._labels
        key = _freeze(labels)
        cached = self._label_cache.get(key)
        if cached is None:
            merged = dict(self._labels)
            merged.update(key)
            cached = self._label_cache[key] = _freeze(merged)
        return cached

    def log(
        self,
        name: str,
        value: float | int | str | bool,
        description: str = "",
        step: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log a scalar (or string) metric value; with `step`, at that step.

        Returns at once: the value is sent in the background."""
        if labels is None and step is not None:
            # The hot path: a stepped numeric series this run logged before
            # writes its point itself (steplog._writer.series.NumericBuffer.log).
            series = self._hot.get(name)
            if series is not None:
                try:
                    cost = series.log(value, step, _wall_time())  # type: ignore[arg-type]
                except (TypeError, ValueError, OverflowError):
                    pass  # nothing recorded: the general path converts or says why
                else:
                    if cost is not None:
                        self._client.writer.after_hot(cost)
                    return
        if not isinstance(value, (float, str)):
            if isinstance(value, (int, bool)):
                value = float(value)
            else:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise InvalidArgumentError(
                        f"metric {name!r}: value must be a number or a string, not "
                        f"{type(value).__name__}",
                        field="value",
                    ) from None
        writer = self._client.writer
        writer.log_scalar(
            self.id,
            name,
            self._series_labels(labels),
            value,
            step,
            _wall_time(),
            description,
        )
        if labels is None and step is not None:
            self._hot = writer.hot_table(self.id, self._labels)

    def log_metric(
        self,
        name: str,
        value: float | int | str | bool,
        description: str = "",
        step: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """The same as log(): the spelling Azure ML's start_logging example uses."""
        self.log(name, value, description, step, labels=labels)

    def log_list(
        self,
        name: str,
        value: Sequence[float | int | str],
        description: str = "",
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log a list of values as an unstepped series (Azure's `log_list`):
        all numbers, or all strings (a text series)."""
        values: list[float] | list[str]
        items = list(value)
        if items and all(isinstance(v, str) for v in items):
            values = [str(v) for v in items]
        else:
            numbers: list[float] = []
            for i, v in enumerate(items):
                if isinstance(v, str):
                    raise InvalidArgumentError(
                        f"metric {name!r}: log_list values must be all numbers or all strings; "
                        f"value {i} is the string {v!r} among numbers",
                        field="value",
                    )
                try:
                    numbers.append(float(v))
                except (TypeError, ValueError):
                    raise InvalidArgumentError(
                        f"metric {name!r}: value {i} must be a number or a string, not "
                        f"{type(v).__name__}",
                        field="value",
                    ) from None
            values = numbers
        now = time.time()
        self._client.writer.log_scalars(
            self.id,
            name,
            self._series_labels(labels),
            values,
            None,
            [now] * len(values),
            description=description,
        )

    def log_batch(
        self,
        metrics: str | Mapping[str, Any],
        values: Any = None,
        *,
        steps: Any = None,
        times: Any = None,
        description: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log many numeric points at once, from arrays (numpy or sequences):
        `run.log_batch("loss", values, steps=steps)` for one series, or
        `run.log_batch({"loss": a, "acc": b}, steps=steps)` for several that
        share their steps (and `times`). Without `steps` the series are
        unstepped; without `times` every point gets the current time. The
        arrays are copied into the series' columns as they are (no Python
        object per point), so this is the fast way to log what is already in
        arrays. Checked here with numpy before anything is logged
        (steplog._batch: numeric dtypes only, lengths, steps integers >= 0
        that never decrease within the call, finite times), so a bad call
        raises InvalidArgumentError naming the field and logs nothing; across
        calls the step rules are `log`'s (the service checks them)."""
        checked, step_col, time_col = batch_columns(metrics, values, steps, times)
        series_labels = self._series_labels(labels)
        for name, arr in checked:
            if arr.size == 0:
                continue
            self._client.writer.log_scalars(
                self.id,
                name,
                series_labels,
                arr,
                step_col,
                time_col,
                description=description,
            )

    # -- tables and evaluation results (no I/O either) -------------------------------

    def log_row(self, name: str, description: str | None = None, **kwargs: Any) -> None:
        """Add a row to table `name` (Azure's `log_row`): each keyword is a
        column, `None` a missing cell. Rows are buffered and sent many to a
        message; a column's type is fixed by its first value. Only the cells'
        types are checked here (the error names the column) and the values
        appended; the background writer encodes the rows."""
        append = self._hot_rows.get(name)
        if append is not None:  # the hot path: a table this run logged before
            cost = append(kwargs, _wall_time(), description or "")
            if cost is not None:
                self._client.writer.after_hot(cost)
            return
        writer = self._client.writer
        run_id = self._proto.run_id
        writer.log_row(run_id, name, self._labels, kwargs, _wall_time(), description or "")
        self._hot_rows = writer.hot_rows(run_id, self._labels)

    def log_table(
        self,
        name: str,
        value: Mapping[str, Any],
        description: str = "",
        *,
        steps: Sequence[int] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log rows given as columns, {"col": [v0, v1, ...]} (Azure's
        `log_table`; numpy arrays too); with `steps`, one step per row. The
        columns are checked and copied here, encoded in the background, in
        order with the rows `log_row` added before."""
        from steplog._tables import table_item

        item = table_item(name, value, description, steps, time.time())
        if item.points:
            self._client.writer.log_item(self.id, name, self._series_labels(labels), "table", item)

    def log_confusion_matrix(
        self,
        name: str,
        value: Mapping[str, Any] | str,
        description: str = "",
        *,
        step: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log a confusion matrix document (a dict or JSON string, as in Azure;
        `steplog.evaluation.confusion_matrix` computes one from labels)."""
        self._log_evaluation("confusion_matrix", name, value, description, step, labels)

    def log_accuracy_table(
        self,
        name: str,
        value: Mapping[str, Any] | str,
        description: str = "",
        *,
        step: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log an accuracy table document (see `steplog.evaluation.accuracy_table`)."""
        self._log_evaluation("accuracy_table", name, value, description, step, labels)

    def log_predictions(
        self,
        name: str,
        value: Mapping[str, Any] | str,
        description: str = "",
        *,
        step: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log a predictions document (see `steplog.evaluation.predictions`)."""
        self._log_evaluation("predictions", name, value, description, step, labels)

    def log_residuals(
        self,
        name: str,
        value: Mapping[str, Any] | str,
        description: str = "",
        *,
        step: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log a residuals document (see `steplog.evaluation.residuals`)."""
        self._log_evaluation("residuals", name, value, description, step, labels)

    def _log_evaluation(
        self,
        schema: str,
        name: str,
        value: Mapping[str, Any] | str,
        description: str,
        step: int | None,
        labels: Mapping[str, str] | None,
    ) -> None:
        from steplog._tables import evaluation_item

        item = evaluation_item(schema, value, description, step, time.time())
        self._client.writer.log_item(
            self.id, name, self._series_labels(labels), "evaluations", item
        )

    # -- histograms (steplog._histograms; no I/O) ------------------------------------------

    def log_histogram(
        self,
        name: str,
        values: Any = None,
        *,
        bins: Any = 64,
        edges: Any = None,
        counts: Any = None,
        step: int | None = None,
        description: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log a histogram as one point of series `name`: from raw `values`
        (any array-like, flattened; binned here with numpy) or from `edges`
        and `counts` already computed (len(edges) == len(counts) + 1).

        `bins`: a number of equal-width bins over the finite values' range
        (default 64), "auto" (numpy's rule, at most 10,000 bins), or a
        sequence of edges. NaN values are counted in `nan_count`, -inf/+inf
        (and values outside given edges) in `underflow`/`overflow`. Checked
        here (InvalidArgumentError naming the field), sent in the background,
        under the same step rules as every other kind."""
        from steplog._histograms import histogram_item

        item = histogram_item(name, values, bins, edges, counts, step, description, time.time())
        series_labels = self._series_labels(labels)
        self._client.writer.log_item(
            self.id,
            name,
            series_labels,
            "histograms",
            item,
            item.encoded_bound(name, series_labels),
        )

    def get_histograms(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        max_points: int = 0,
    ) -> builtins.list[dict[str, Any]]:
        """The histograms of series `name` with start_step <= step <= end_step
        (unset: open), in step order: one dict per point with step, time,
        edges and counts (numpy arrays), underflow, overflow and nan_count.
        With max_points, at most that many, spread evenly over the range.
        Waits for this process's logged points; follows the service's pages."""
        from steplog._histograms import read_histograms

        self.flush(None)
        merged = dict(self._series_labels(labels))
        return read_histograms(
            self._client, self.id, name, merged, start_step, end_step, max_points
        )

    # -- images (run files: steplog._run_files.RunFiles) ------------------------------------

    def log_image(
        self,
        name: str,
        path: Any = None,
        plot: Any = None,
        description: str = "",
        step: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Log an image: `path` is a file path, bytes or a binary stream (PNG,
        JPEG, GIF or WebP); `plot` a matplotlib figure (or pyplot), rendered
        to PNG. Returns at once: the image is sent in the background with the
        metrics, under the same step rules; the service checks the bytes and
        reports a bad image as a rejected point (INVALID_IMAGE). Here the
        bytes are only read (or rendered); the background writer hashes and
        encodes them."""
        from steplog._uploads import image_bytes
        from steplog._writer.items import ImageItem

        if step is not None:
            try:
                step = operator.index(step)
            except TypeError:
                raise InvalidArgumentError(
                    f"image {name!r}: step must be an integer, not {type(step).__name__}",
                    field="step",
                ) from None
        item = ImageItem(image_bytes(path, plot), time.time(), step, description)
        series_labels = self._series_labels(labels)
        bound = item.encoded_bound(name, series_labels)
        try:
            self._client.writer.log_item(self.id, name, series_labels, "images", item, bound)
        except ValueError as exc:  # larger than a batch may be
            raise InvalidArgumentError(f"image {name!r}: {exc}", field="path") from None

    def flush(self, timeout_seconds: float | None = 300, *, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is acknowledged, at most
        `timeout_seconds` (Azure's name and default, 300; None: no limit;
        `timeout` is steplog's older keyword); False on timeout."""
        return self._client.flush(timeout if timeout is not None else timeout_seconds)

    def rejections(self) -> builtins.list[Rejection]:
        """Points of this run the service did not store, with the reason
        (`Rejection`: name, labels, step, reason, message). Only those this
        process logged, and only the most recent ones (the list is bounded)."""
        return [r for r in self._client.writer.rejections() if r.run_id == self.id]

    def writer_stats(self) -> WriterStats:
        """Counters of this process's background writer (logged, acknowledged,
        duplicates, rejected, dropped, spooled, reconnects, ...)."""
        return self._client.writer.stats

    def new_stream(
        self, labels: Mapping[str, str] | None = None, *, max_buffered_bytes: int | None = None
    ) -> Run:
        """Another handle on this run with a writer of its own: its own
        stream to the service, writer id and sequence numbers, buffers,
        memory bound (STEPLOG_MAX_BUFFERED_BYTES), window and spool, on the
        process's gRPC channel (steplog.client.Client.independent); one
        background thread drives every stream of the process. Its
        series carry this handle's labels updated with `labels` (say
        `{"rank": "3"}`, so ranks logging "loss" do not collide). For one
        process that logs for several writers at once, such as the ranks of
        a data-parallel job on one host: each handle's `log`, `flush` and
        `writer_stats` are its own, every point is stored exactly once, and
        a slow or failing stream holds no other back. `with stream:` flushes
        it (an exception marks the run Failed, as with
        `Run.get_context(used_for_context_manager=True)`) and closes it; the
        run is completed by whoever created it. `stream.close(timeout)`
        flushes it and stops its writer (points logged afterwards are
        dropped with a warning; the other streams go on, and the streams'
        thread ends with the last); a stream not closed is closed at
        interpreter exit, as the process's shared writer is.

        Memory: each stream's writer has a bound of its own,
        `max_buffered_bytes` (default STEPLOG_MAX_BUFFERED_BYTES, 256 MiB),
        so N streams may hold N times it: give a smaller one when a process
        opens many."""
        merged = dict(self._labels)
        merged.update(labels or {})
        proto = common_pb2.Run()
        proto.CopyFrom(self._proto)
        overrides: dict[str, Any] = (
            {} if max_buffered_bytes is None else {"max_buffered_bytes": max_buffered_bytes}
        )
        stream = Run(
            self._experiment,
            _proto=proto,
            _client=self._client.independent(**overrides),
            labels=merged,
        )
        stream._offline = self._offline
        stream._attached = True
        stream._stream = True
        return stream

    def close(self, timeout: float | None = None) -> bool:
        """A stream (`new_stream`): flush its points and stop its writer,
        within `timeout` seconds (None: no limit); True when every
        point was delivered. Only a stream has a writer of its own to close:
        on any other handle it raises FailedPreconditionError (use
        `complete()`)."""
        if not self._stream:
            raise FailedPreconditionError(
                "close() is for a handle from run.new_stream(); complete() ends a run",
                field="run",
            )
        return self._client.close_writer(timeout)

    def rewind(self, step: int, names: Iterable[str] | None = None) -> int:
        """Resume from a checkpoint at `step`: points after it are hidden from
        queries (kept for audit) and logging may continue from it. Returns how
        many points were hidden."""
        self.flush(None)
        reply = self._client.call(
            self._client.runs.RewindRun,
            rs.RewindRunRequest(
                workspace=self._client.workspace,
                run_id=self.id,
                step=step,
                names=list(names or []),
            ),
        )
        return int(reply.hidden_points)

    def get_metrics(
        self,
        name: str | None = None,
        recursive: bool = False,
        run_type: str | None = None,
        populate: bool = False,
    ) -> dict[str, Any]:
        """Azure's shape: {name: value} for a metric logged once, {name: [values]}
        for one logged several times; with recursive, {run_id: {...}} over this
        run and all its descendants. `run_type`: only runs of that type (with
        recursive, the runs of the subtree that have it; without, this run's
        metrics if it has it, else {}). `populate` changes nothing: steplog
        always returns tables and evaluation documents whole. Waits for this
        process's logged points, then reads everything in pages (each response
        bounded by the service's max_response_bytes) and returns it whole."""
        from steplog.query import get_metrics

        self.flush(None)
        if run_type is not None and not recursive and self.type != run_type:
            return {}
        metrics = get_metrics(self._client, self.id, name, recursive)
        if run_type is not None and recursive:
            keep = {r.id for r in self.get_children(recursive=True, type=run_type)}
            if self.type == run_type:
                keep.add(self.id)
            metrics = {k: v for k, v in metrics.items() if k in keep}
        return metrics

    def get_series(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        max_points: int = 0,
    ) -> dict[str, Any]:
        """One scalar series by step range, for charts: {"steps", "values",
        "times", "downsampled", "total_points"} (an unstepped series has its
        indices as steps). With max_points, at most that many points: each
        bucket keeps its first point, its extremes and a NaN, so spikes,
        infinities and NaNs survive. Follows the service's pages."""
        from steplog.query import read_series

        self.flush(None)
        merged = dict(self._series_labels(labels))
        return read_series(self._client, self.id, name, merged, start_step, end_step, max_points)

    def get_charts(
        self,
        names: Sequence[str | tuple[str, Mapping[str, str]]],
        *,
        max_points: int = 1000,
        start_step: int | None = None,
        end_step: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Several numeric scalar series of this run for a chart, in one call
        (ReadCharts): each downsampled to at most max_points points (1 to
        100,000) like `get_series(..., max_points=...)`, over the same step
        range. `names` are names or (name, labels) pairs. Returns
        {key: {"steps", "values", "times", "downsampled", "total_points"}}
        with numpy arrays (steps int64, values and times float64), key the
        name, with its labels when it has any: loss{rank=3}."""
        from steplog.query import key_of, read_charts

        self.flush(None)
        refs = [
            (n, dict(self._labels))
            if isinstance(n, str)
            else (n[0], dict(self._series_labels(n[1])))
            for n in names
        ]
        got = read_charts(self._client, self.id, refs, start_step, end_step, max_points)
        return {key_of(one.pop("name"), one.pop("labels")): one for one in got}

    # -- tags and properties --------------------------------------------------------

    def tag(self, key: str, value: str | None = None) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, str | None] | str) -> None:
        """Add or change tags; others are untouched. A plain string is a tag
        without a value."""
        self._update_tags({tags: None} if isinstance(tags, str) else tags, [])

    def remove_tags(self, tags: Iterable[str] | str) -> dict[str, str | None]:
        """Remove these tags (absent ones are no error); returns the tags left."""
        self._update_tags({}, [tags] if isinstance(tags, str) else list(tags))
        return self.tags

    def _spool_operation(self, kind: str, request: Any) -> None:
        """Offline: the operation goes to the spool after the points logged
        before it; `steplog sync` applies it in that order."""
        self._client.writer.record_operation(kind, request.SerializeToString())

    def _update_tags(self, set_tags: Mapping[str, str | None], remove: list[str]) -> None:
        if self._offline:
            request = rs.UpdateRunTagsRequest(
                workspace=self._client.workspace,
                run_id=self.id,
                set_tags=tags_to_proto(set_tags),
                remove_keys=remove,
            )
            self._spool_operation("UpdateRunTags", request)
            tags = self.tags
            tags.update(set_tags)
            for key in remove:
                tags.pop(key, None)
            del self._proto.tags[:]
            self._proto.tags.extend(tags_to_proto(tags))
            return
        self._set(
            self._client.call(
                self._client.runs.UpdateRunTags,
                rs.UpdateRunTagsRequest(
                    workspace=self._client.workspace,
                    run_id=self.id,
                    set_tags=tags_to_proto(set_tags),
                    remove_keys=remove,
                ),
            ).run
        )

    def get_tags(self) -> dict[str, str | None]:
        self.refresh()
        return self.tags

    def add_properties(self, properties: Mapping[str, str]) -> None:
        """Add properties. They are add-only: re-adding a key with another value
        raises FailedPreconditionError and changes nothing."""
        if self._offline:
            props = {str(k): str(v) for k, v in properties.items()}
            clash = [k for k, v in props.items() if self._proto.properties.get(k, v) != v]
            if clash:
                raise FailedPreconditionError(
                    f"properties are add-only: {clash} already set", field="properties"
                )
            request = rs.AddRunPropertiesRequest(
                workspace=self._client.workspace, run_id=self.id, properties=props
            )
            self._spool_operation("AddRunProperties", request)
            self._proto.properties.update(props)
            return
        self._set(
            self._client.call(
                self._client.runs.AddRunProperties,
                rs.AddRunPropertiesRequest(
                    workspace=self._client.workspace,
                    run_id=self.id,
                    properties={str(k): str(v) for k, v in properties.items()},
                ),
            ).run
        )

    def get_properties(self) -> dict[str, str]:
        self.refresh()
        return self.properties

    # -- lifecycle --------------------------------------------------------------------

    def _move(self, status: str, message: str = "", code: str = "") -> None:
        error = common_pb2.RunError(message=message, code=code) if (message or code) else None
        if self._offline:
            request = rs.UpdateRunStatusRequest(
                workspace=self._client.workspace,
                run_id=self.id,
                status=_status_value(status),  # type: ignore[arg-type]
                error=error,
            )
            self._spool_operation("UpdateRunStatus", request)
            self._proto.status = _status_value(status)  # type: ignore[assignment]
            if error is not None:
                self._proto.error.CopyFrom(error)
            return
        self._set(
            self._client.call(
                self._client.runs.UpdateRunStatus,
                rs.UpdateRunStatusRequest(
                    workspace=self._client.workspace,
                    run_id=self.id,
                    status=_status_value(status),  # type: ignore[arg-type]
                    error=error,
                ),
            ).run
        )
        if status in TERMINAL_STATUSES:
            self._client.heartbeat.remove(self.id)
        elif status == "Running":
            self._client.heartbeat.add(self.id)

    def start(self) -> None:
        self._move("Running")

    def _upload_outputs(self) -> None:
        """Azure's `outputs` directory: its files become run files at the end."""
        if not self._outputs or self._offline:
            return
        from pathlib import Path

        folder = Path(self._outputs)
        if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
            self.upload_folder(Path(self._outputs).as_posix().strip("/"), folder, overwrite=True)

    def _stop_system_metrics(self) -> None:
        sampler, self._system_metrics = self._system_metrics, None
        if sampler is not None:
            sampler.stop()

    def complete(self, _set_status: bool = True, *, flush_timeout: float | None = None) -> None:
        """Flush what was logged (and upload the `outputs` directory, if one
        was given), then mark the run Completed."""
        self._stop_system_metrics()
        self.flush(flush_timeout)  # None: until everything is acknowledged
        self._upload_outputs()
        if _set_status:
            self._move("Completed")

    def fail(
        self,
        error_details: BaseException | str | None = None,
        error_code: str | None = None,
        _set_status: bool = True,
    ) -> None:
        """Flush, then mark the run Failed with an error message and code."""
        self._stop_system_metrics()
        self.flush(None)
        self._upload_outputs()
        if isinstance(error_details, BaseException):
            message = "".join(traceback.format_exception_only(error_details)).strip()
            code = error_code or type(error_details).__name__
        else:
            message = error_details or ""
            code = error_code or ""
        if _set_status:
            self._move("Failed", message, code)

    def cancel(self) -> None:
        self._stop_system_metrics()
        self.flush(None)
        self._upload_outputs()
        self._move("Canceled")

    def get_status(self) -> str:
        self.refresh()
        return self.status

    # -- being asked to stop (early termination) -----------------------------------

    _STOP_STATUSES = frozenset(
        {common_pb2.RUN_STATUS_CANCEL_REQUESTED, common_pb2.RUN_STATUS_CANCELED}
    )

    def should_stop(self) -> bool:
        """True once the service has asked this run to stop: its status is
        CancelRequested (its parent's early-termination policy, or anyone's
        UpdateRunStatus) or Canceled. Makes no call, so a training loop may
        ask every step: it reads the status the last heartbeat brought back
        (every STEPLOG_HEARTBEAT_INTERVAL seconds, 30 by default) and the one
        this object last fetched. The run joins the heartbeat when asked."""
        if self._proto.status in self._STOP_STATUSES:
            return True
        if self._offline:
            return False
        self._client.heartbeat.add(self.id)
        return self._client.heartbeat.seen_status(self.id) in self._STOP_STATUSES

    def set_early_termination_policy(
        self,
        policy: EarlyTerminationPolicy | None,
        *,
        primary_metric: str = "",
        goal: PrimaryMetricGoal | str = "maximize",
        primary_metric_labels: Mapping[str, str] | None = None,
    ) -> None:
        """Make this run a sweep: the service judges its children's
        `primary_metric` with `policy` (steplog.sweep.BanditPolicy,
        MedianStoppingPolicy, TruncationSelectionPolicy, as in Azure's
        HyperDrive) as their points arrive, and moves those that fall behind
        to CancelRequested, with the reason in the child's property
        "steplog.early_termination.reason". None removes the policy.
        Children compare the series named `primary_metric` with exactly the
        labels `primary_metric_labels` (none by default)."""
        from steplog import sweep

        request = rs.SetEarlyTerminationPolicyRequest(
            workspace=self._client.workspace, run_id=self.id
        )
        if policy is not None:
            if not primary_metric:
                raise InvalidArgumentError("primary_metric is required", field="primary_metric")
            request.policy.CopyFrom(
                sweep.policy_to_proto(policy, primary_metric, goal, primary_metric_labels)
            )
        self._client.call(self._client.runs.SetEarlyTerminationPolicy, request)

    def get_early_termination_policy(self) -> AttachedPolicy | None:
        """The policy set_early_termination_policy() attached (None: none)."""
        from steplog import sweep

        reply = self._client.call(
            self._client.runs.GetEarlyTerminationPolicy,
            rs.GetEarlyTerminationPolicyRequest(workspace=self._client.workspace, run_id=self.id),
        )
        return sweep.policy_from_proto(reply.policy) if reply.HasField("policy") else None

    def on_cancel_requested(self, fn: Callable[[Run], None]) -> None:
        """Call `fn(run)` once, when the service first reports this run
        CancelRequested or Canceled: on the heartbeat thread (keep it short;
        set a flag the training loop reads), or at once on this thread when
        should_stop() is already True. An exception in `fn` is logged."""
        fired = threading.Event()

        def listener(status: int) -> None:
            if status in self._STOP_STATUSES and not fired.is_set():
                fired.set()
                fn(self)

        if self.should_stop():
            fired.set()
            fn(self)
            return
        if not self._offline:
            self._client.heartbeat.listen(self.id, listener)

    def get_details(self) -> dict[str, Any]:
        """The fields of Azure ML's get_details()."""
        self.refresh()
        p = self._proto
        details: dict[str, Any] = {
            "runId": p.run_id,
            "runNumber": p.number,
            "displayName": p.display_name,
            "description": p.description,
            "experimentName": p.experiment_name,
            "runType": p.run_type,
            "target": "sdk",
            "status": self.status,
            "parentRunId": p.parent_run_id or None,
            "startTimeUtc": _iso(p.start_time),
            "createdTimeUtc": _iso(p.created_time),
            "properties": dict(p.properties),
            "tags": tags_from_proto(p.tags),
            "inputDatasets": [],
            "outputDatasets": [],
            "runDefinition": {},
            "logFiles": {},
            "submittedBy": p.properties.get(SUBMITTED_BY, ""),
        }
        end = _iso(p.end_time)
        if end is not None:  # as in Azure, absent while the run has not finished
            details["endTimeUtc"] = end
        if p.HasField("error"):
            details["error"] = {"error": {"code": p.error.code, "message": p.error.message}}
        return details

    def get_detailed_status(self) -> dict[str, Any]:
        """{"status": ..., "details": ...}: the status as get_status(), and for
        a run that is not Running a sentence on what it is waiting for."""
        status = self.get_status()
        result: dict[str, Any] = {"status": status}
        detail = _STATUS_DETAILS.get(status)
        if detail:
            result["details"] = detail
        return result

    def get_details_with_logs(self) -> dict[str, Any]:
        """get_details(); steplog captures no log files, so "logFiles" is {}."""
        return self.get_details()

    def wait_for_completion(
        self,
        show_output: bool = False,
        wait_post_processing: bool = False,
        raise_on_error: bool = True,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
    ) -> dict[str, Any]:
        """Wait until the run reaches a terminal status; return get_details().
        With raise_on_error, a Failed run raises FailedPreconditionError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.1, poll_interval)
        last = ""
        while True:
            status = self.get_status()
            if show_output and status != last:
                print(f"RunId: {self.id} Status: {status}", file=sys.stdout)
                last = status
            if status in TERMINAL_STATUSES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.id} is still {status} after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, poll_interval)
        if wait_post_processing:
            self.flush(None)
        details = self.get_details()
        if raise_on_error and self.status == "Failed":
            err = details.get("error", {}).get("error", {})
            raise FailedPreconditionError(
                f"run {self.id} failed: {err.get('message', '')}", field="status"
            )
        return details

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._exit_run(exc)
        finally:
            if self._stream:
                self.close(None)

    def _exit_run(self, exc: BaseException | None) -> None:
        if self._stream and exc is None:
            return  # closed (flushed) by __exit__
        if self.status in TERMINAL_STATUSES or (self._attached and exc is None):
            self.flush(None)
            return
        if exc is None:
            self.complete()
        elif isinstance(exc, KeyboardInterrupt):
            self.fail(exc, "KeyboardInterrupt")
        else:
            self.fail(exc)

    # -- children ---------------------------------------------------------------------

    def child_run(
        self,
        name: str | None = None,
        run_id: str | None = None,
        outputs: str | None = None,
        *,
        description: str = "",
        run_type: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> Run:
        """A Running child run; also a context manager."""
        child = Run._create(
            self._client,
            self._proto.experiment_name,
            display_name=name or "",
            description=description,
            run_type=run_type if run_type is not None else self.type,
            run_id=run_id,
            parent_run_id=self.id,
            tags=tags,
            properties=properties,
            labels=dict(self._labels),
            outputs=outputs,
        )
        child._experiment = self._experiment
        return child

    def create_children(
        self,
        count: int | None = None,
        tag_key: str | None = None,
        tag_values: Sequence[str] | None = None,
    ) -> list[Run]:
        """Azure's create_children: `count` children, or one per tag value
        (tagged tag_key=value)."""
        if tag_values is not None:
            if tag_key is None:
                raise InvalidArgumentError("tag_key is required with tag_values", field="tag_key")
            if count is not None and count != len(tag_values):
                raise InvalidArgumentError(
                    "count must equal len(tag_values) when both are given", field="count"
                )
            return [self.child_run(tags={tag_key: v}) for v in tag_values]
        if tag_key is not None:
            raise InvalidArgumentError(
                "tag_values is required with tag_key (give count, or tag_key and tag_values)",
                field="tag_values",
            )
        if count is None or count < 0:
            raise InvalidArgumentError(
                "give count (>= 0), or tag_key and tag_values", field="count"
            )
        return [self.child_run() for _ in range(count)]

    def get_children(
        self,
        recursive: bool = False,
        tags: Mapping[str, str | None] | Iterable[str] | str | None = None,
        properties: Mapping[str, str] | Iterable[str] | str | None = None,
        type: str | None = None,
        status: str | None = None,
        _rehydrate_runs: bool = True,
    ) -> Iterable[Run]:
        """Children (with recursive, all descendants), newest first. `tags`
        and `properties`: a key (the run has it), keys, or a dict."""
        values, keys = _azure.property_filter(properties)
        reply = self._client.call(
            self._client.runs.ListRuns,
            rs.ListRunsRequest(
                workspace=self._client.workspace,
                parent_run_id=self.id,
                recursive=recursive,
                tags=tags_to_proto(tags),
                properties=values,
                property_keys=keys,
                run_type=type or "",
                status=_status_value(status) if status else 0,  # type: ignore[arg-type]
            ),
        )
        runs = [Run(_proto=r, _client=self._client, labels=dict(self._labels)) for r in reply.runs]
        return _rehydrate(runs, self._experiment) if _rehydrate_runs else runs

    # -- class-level ----------------------------------------------------------------

    @staticmethod
    def list(
        experiment: Experiment,
        type: str | None = None,
        tags: Mapping[str, str | None] | Iterable[str] | str | None = None,
        properties: Mapping[str, str] | Iterable[str] | str | None = None,
        status: str | None = None,
        include_children: bool = False,
        _rehydrate_runs: bool = True,
    ) -> list[Run]:
        """Runs of an experiment, newest first (at most 1,000: the service's
        page). `tags` and `properties`: a key (the run has it), keys, or a dict."""
        values, keys = _azure.property_filter(properties)
        client = experiment._client
        reply = client.call(
            client.runs.ListRuns,
            rs.ListRunsRequest(
                workspace=client.workspace,
                experiment_name=experiment.name,
                recursive=include_children,
                tags=tags_to_proto(tags),
                properties=values,
                property_keys=keys,
                run_type=type or "",
                status=_status_value(status) if status else 0,  # type: ignore[arg-type]
            ),
        )
        runs = [Run(experiment, _proto=r, _client=client) for r in reply.runs]
        return _rehydrate(runs, experiment) if _rehydrate_runs else runs

    @staticmethod
    def add_type_provider(runtype: str, run_factory: Any) -> None:
        """Register `run_factory(experiment, run) -> Run` for runs whose type
        is `runtype`; Run.list and get_children call it (Azure passes a RunDto,
        steplog the base Run)."""
        _TYPE_PROVIDERS[runtype] = run_factory

    @staticmethod
    def list_by_compute(
        compute: Any, type: Any = None, tags: Any = None, properties: Any = None, status: Any = None
    ) -> Any:
        _azure.not_applicable(
            "Run.list_by_compute",
            "steplog knows no compute targets; tag runs (run.tag('compute', name)) and use "
            "Run.list(experiment, tags={'compute': name}).",
        )

    @staticmethod
    def get(
        workspace: Workspace | str | None = None,
        run_id: str | None = None,
        *,
        url: str | None = None,
        **connection: Unpack[Connection],
    ) -> Run:
        """The run with this id (NotFoundError if there is none): Azure's
        `Run.get(workspace, run_id)`, or steplog's short form `Run.get(run_id)`
        (one string is the run id, in STEPLOG_WORKSPACE). `workspace` is a
        steplog.Workspace or a workspace name. Connection arguments: see
        steplog.client.Connection."""
        if run_id is None:
            if not isinstance(workspace, str):
                raise InvalidArgumentError("run_id is required", field="run_id")
            run_id, workspace = workspace, None
        return Run(run_id=run_id, _client=_client_of(workspace, url, connection))

    @staticmethod
    def get_context(
        allow_offline: bool = True,
        used_for_context_manager: bool = False,
        *,
        url: str | None = None,
        workspace: str | None = None,
        **connection: Unpack[Connection],
    ) -> Run:
        """The run this process belongs to: STEPLOG_RUN_ID (with STEPLOG_URL)
        names it, so every rank of a distributed job attaches to one run.
        With STEPLOG_OFFLINE=true as well, the run logs to the spool only.
        Without STEPLOG_RUN_ID, an offline run that prints what it would log.
        `url`, `workspace` and the connection arguments (token, tls_ca,
        tls_cert, tls_key, ...: steplog.client.Connection) default to their
        STEPLOG_* variables."""
        run_id = os.environ.get("STEPLOG_RUN_ID")
        offline = _settings.flag("STEPLOG_OFFLINE")
        if run_id and offline:
            # Offline (no network): points go to the spool only, and
            # `steplog sync` replays them to the run later. No call is made,
            # so no token is needed (sync presents it).
            quiet: Connection = {**connection}
            quiet["token"] = ""
            client = get_client(
                url or os.environ.get("STEPLOG_URL") or "offline", workspace, **quiet
            )
            proto = common_pb2.Run(run_id=run_id, status=common_pb2.RUN_STATUS_RUNNING)
            run = Run(_proto=proto, _client=client)
            run._offline = True
            run._attached = used_for_context_manager
            return run
        if run_id:
            run = Run.get(workspace, run_id, url=url, **connection)
            if run.status in TERMINAL_STATUSES:
                raise FailedPreconditionError(
                    f"STEPLOG_RUN_ID names run {run_id!r}, which is {run.status}", field="run_id"
                )
            run._attached = used_for_context_manager
            return run
        if not allow_offline:
            raise InvalidArgumentError(
                "STEPLOG_RUN_ID is not set and allow_offline is False", field="run_id"
            )
        from steplog.offline import OfflineRun

        return OfflineRun()  # type: ignore[return-value]

    @staticmethod
    def get_submitted_run(**kwargs: Any) -> Run:
        """Deprecated in Azure ML: Run.get_context()."""
        import warnings

        warnings.warn(
            "Run.get_submitted_run is deprecated; use Run.get_context()",
            DeprecationWarning,
            stacklevel=2,
        )
        return Run.get_context(**kwargs)
