"""Experiment: a named group of runs, after Azure ML's `Experiment`."""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from steplog import _azure
from steplog.client import Client, Connection, get_client
from steplog.errors import InvalidArgumentError
from steplog.v1 import common_pb2
from steplog.v1 import experiment_service_pb2 as ex

if TYPE_CHECKING:
    from steplog.run import Run


class ViewType:
    """Azure ML's view types for Experiment.list."""

    ACTIVE_ONLY = "ActiveOnly"
    ARCHIVED_ONLY = "ArchivedOnly"
    ALL = "All"


# Azure's spellings, and steplog's older snake_case ones.
_VIEWS = {
    ViewType.ACTIVE_ONLY: ex.EXPERIMENT_VIEW_ACTIVE_ONLY,
    ViewType.ARCHIVED_ONLY: ex.EXPERIMENT_VIEW_ARCHIVED_ONLY,
    ViewType.ALL: ex.EXPERIMENT_VIEW_ALL,
    "active_only": ex.EXPERIMENT_VIEW_ACTIVE_ONLY,
    "archived_only": ex.EXPERIMENT_VIEW_ARCHIVED_ONLY,
    "all": ex.EXPERIMENT_VIEW_ALL,
}


class Workspace:
    """Where experiments live: a steplog service address and a workspace
    name (Azure ML's `Workspace`, reduced to what a run history needs).

    `Workspace.from_config()` reads STEPLOG_URL and STEPLOG_WORKSPACE, or a
    JSON file {"url": ..., "workspace": ...}; connection arguments (token,
    tls_ca, ...: steplog.client.Connection) default to their variables."""

    def __init__(
        self,
        name: str | None = None,
        *,
        url: str | None = None,
        **connection: Unpack[Connection],
    ) -> None:
        self._url = url
        self._connection = connection
        self._client = get_client(url, name, **connection)

    @property
    def name(self) -> str:
        return self._client.workspace

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r})"

    @staticmethod
    def get(name: str, *, url: str | None = None, **connection: Unpack[Connection]) -> Workspace:
        return Workspace(name, url=url, **connection)

    @staticmethod
    def from_config(
        path: str | os.PathLike[str] | None = None,
        auth: Any = None,
        _logger: Any = None,
        _file_name: str | None = None,
    ) -> Workspace:
        """The workspace named by a config file, else by the environment.

        `path` is a JSON file, or a directory holding `.steplog/config.json`
        or `config.json` (searched upwards from the current directory when
        `path` is None). Its keys: "url" (or "steplog_url") and "workspace"
        (or Azure's "workspace_name"); Azure's other keys are ignored. With
        no such file, STEPLOG_URL and STEPLOG_WORKSPACE."""
        if auth is not None:
            _azure.ignored("Workspace.from_config", "auth", "use token= or STEPLOG_TOKEN")
        config = _find_config(path, _file_name)
        if config is None:
            return Workspace()
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot read {config}: {exc}", field="path") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"{config} must hold a JSON object", field="path")
        url = data.get("url") or data.get("steplog_url")
        name = data.get("workspace") or data.get("workspace_name")
        return Workspace(name, url=url)


def _find_config(path: str | os.PathLike[str] | None, file_name: str | None) -> Path | None:
    names = [file_name] if file_name else [".steplog/config.json", "config.json"]
    if path is not None:
        p = Path(path)
        if p.is_file():
            return p
        if not p.is_dir():
            raise InvalidArgumentError(f"no config file or directory at {p}", field="path")
        dirs = [p]
    else:
        here = Path.cwd()
        dirs = [here, *here.parents]
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _client_of(
    workspace: Workspace | str | None, url: str | None, connection: Connection
) -> Client:
    if isinstance(workspace, Workspace):
        if url is None and not connection:
            return workspace._client
        merged: Connection = {**workspace._connection, **connection}
        return get_client(url or workspace._url, workspace.name, **merged)
    if workspace is not None and not isinstance(workspace, str):
        raise InvalidArgumentError(
            f"workspace must be a steplog.Workspace or a workspace name, not "
            f"{type(workspace).__name__}",
            field="workspace",
        )
    return get_client(url, workspace, **connection)


def tags_to_proto(tags: Mapping[str, str | None] | Iterable[str] | None) -> list[common_pb2.Tag]:
    if tags is None:
        return []
    if isinstance(tags, Mapping):
        return [
            common_pb2.Tag(key=k, value=v) if v is not None else common_pb2.Tag(key=k)
            for k, v in tags.items()
        ]
    if isinstance(tags, str):
        return [common_pb2.Tag(key=tags)]
    return [common_pb2.Tag(key=k) for k in tags]


def tags_from_proto(tags: Iterable[common_pb2.Tag]) -> dict[str, str | None]:
    return {t.key: (t.value if t.HasField("value") else None) for t in tags}


class Experiment:
    """Get or create an experiment by name (Azure ML's `Experiment`).

    Azure's form, `Experiment(workspace, "mnist")` (or keywords), where
    `workspace` is a `steplog.Workspace` or a workspace name; and steplog's
    short form, `Experiment("mnist")`: a single string is the name, in the
    workspace STEPLOG_WORKSPACE (else "default"). The service is `url` (else
    STEPLOG_URL); the connection arguments (`token`, `tls_ca`, `tls_cert`,
    `tls_key`, ...: see steplog.client.Connection) default to their STEPLOG_*
    variables. Names: 1..255 of letters, digits, `_ - .`; with
    STEPLOG_AZURE_STRICT=1, Azure's rule (3..36 of letters, digits, `_ -`)
    unless `_skip_name_validation`."""

    def __init__(
        self,
        workspace: Workspace | str | None = None,
        name: str | None = None,
        _skip_name_validation: bool = False,
        _id: str | None = None,
        _archived_time: Any = None,
        _create_in_cloud: bool = True,
        _experiment_dto: Any = None,
        *,
        url: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        _proto: common_pb2.Experiment | None = None,
        _client: Client | None = None,
        **connection: Unpack[Connection],
    ) -> None:
        if name is None:
            if not isinstance(workspace, str):
                raise InvalidArgumentError("the experiment name is required", field="name")
            name, workspace = workspace, None  # steplog's short form: Experiment("mnist")
        self._client = _client or _client_of(workspace, url, connection)
        if _proto is None:
            if _azure.strict() and not _skip_name_validation:
                _azure.check_azure_experiment_name(name)
            reply = self._client.call(
                self._client.experiments.GetOrCreateExperiment,
                ex.GetOrCreateExperimentRequest(
                    workspace=self._client.workspace, name=name, tags=tags_to_proto(tags)
                ),
            )
            _proto = reply.experiment
        self._proto = _proto

    # -- properties ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._proto.name

    @property
    def id(self) -> str:
        return self._proto.experiment_id

    @property
    def workspace(self) -> str:
        """The workspace's name (Azure returns a Workspace object; steplog a name)."""
        return self._proto.workspace

    @property
    def archived_time(self) -> str | None:
        """None for an active experiment; steplog keeps no archive time, so an
        archived one reports its creation time."""
        if not self._proto.archived:
            return None
        return self._proto.created_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @property
    def archived(self) -> bool:
        return self._proto.archived

    @property
    def tags(self) -> dict[str, str | None]:
        return tags_from_proto(self._proto.tags)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, workspace={self.workspace!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Experiment) and (self.workspace, self.name) == (
            other.workspace,
            other.name,
        )

    def __hash__(self) -> int:
        return hash((self.workspace, self.name))

    def refresh(self) -> Experiment:
        """Reload from the service; returns the experiment itself."""
        reply = self._client.call(
            self._client.experiments.GetExperiment,
            ex.GetExperimentRequest(workspace=self._client.workspace, name=self.name),
        )
        self._proto = reply.experiment
        return self

    @staticmethod
    def delete(
        workspace: Workspace | str | None,
        experiment_id: str,
        *,
        url: str | None = None,
        **connection: Unpack[Connection],
    ) -> None:
        """Delete the experiment with this id (`experiment.id`), its runs and
        all they logged. As in Azure ML, refused (FailedPreconditionError)
        while one of its runs has not finished; NotFoundError for an unknown
        id. Needs an admin token when the service checks tokens."""
        client = _client_of(workspace, url, connection)
        client.call(
            client.experiments.DeleteExperiment,
            ex.DeleteExperimentRequest(workspace=client.workspace, experiment_id=experiment_id),
        )

    @staticmethod
    def from_directory(path: Any, auth: Any = None) -> Experiment:
        _azure.not_applicable(
            "Experiment.from_directory",
            "Experiment(name) gets or creates an experiment by name.",
        )

    @staticmethod
    def get_docs_url() -> str:
        return "https://github.com/steplog/steplog#the-client-api"

    def submit(
        self, config: Any, tags: Mapping[str, str | None] | None = None, **kwargs: Any
    ) -> Run:
        _azure.not_applicable(
            "Experiment.submit",
            "Start the script yourself (or with your scheduler) and create its run with "
            "experiment.start_logging(), or create the run first and pass its id in "
            "STEPLOG_RUN_ID: Run.get_context() in the script attaches to it.",
        )

    # -- listing -----------------------------------------------------------------

    @staticmethod
    def list(
        workspace: Workspace | str | None = None,
        experiment_name: str | None = None,
        view_type: str = ViewType.ACTIVE_ONLY,
        tags: Mapping[str, str | None] | Iterable[str] | str | None = None,
        *,
        url: str | None = None,
        **connection: Unpack[Connection],
    ) -> builtins.list[Experiment]:
        """Experiments in the workspace, by name; `view_type` is "ActiveOnly"
        (the default), "ArchivedOnly" or "All" (see ViewType; "active_only",
        "archived_only", "all" too); `tags` a key, keys, or a dict to match."""
        if view_type not in _VIEWS:
            raise InvalidArgumentError(
                f"view_type must be one of {', '.join(_VIEWS)}, not {view_type!r}",
                field="view_type",
            )
        client = _client_of(workspace, url, connection)
        reply = client.call(
            client.experiments.ListExperiments,
            ex.ListExperimentsRequest(
                workspace=client.workspace,
                tags=tags_to_proto(tags),
                view=_VIEWS[view_type],
                name_prefix=experiment_name or "",
            ),
        )
        out = [Experiment(name=e.name, _proto=e, _client=client) for e in reply.experiments]
        if experiment_name is not None:
            out = [e for e in out if e.name == experiment_name]
        return out

    # -- state ---------------------------------------------------------------------

    def archive(self) -> None:
        reply = self._client.call(
            self._client.experiments.ArchiveExperiment,
            ex.ArchiveExperimentRequest(workspace=self._client.workspace, name=self.name),
        )
        self._proto = reply.experiment

    def reactivate(self, new_name: str | None = None) -> None:
        reply = self._client.call(
            self._client.experiments.ReactivateExperiment,
            ex.ReactivateExperimentRequest(
                workspace=self._client.workspace, name=self.name, new_name=new_name or ""
            ),
        )
        self._proto = reply.experiment

    def tag(self, key: str, value: str | None = None) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, str | None] | str) -> None:
        """Add or change tags; a plain string is a tag without a value."""
        self._update_tags({tags: None} if isinstance(tags, str) else tags, [])

    def remove_tags(self, tags: Iterable[str] | str) -> None:
        self._update_tags({}, [tags] if isinstance(tags, str) else list(tags))

    def _update_tags(self, set_tags: Mapping[str, str | None], remove: builtins.list[str]) -> None:
        reply = self._client.call(
            self._client.experiments.UpdateExperimentTags,
            ex.UpdateExperimentTagsRequest(
                workspace=self._client.workspace,
                name=self.name,
                set_tags=tags_to_proto(set_tags),
                remove_keys=remove,
            ),
        )
        self._proto = reply.experiment

    # -- runs ------------------------------------------------------------------------

    def start_logging(
        self,
        outputs: str | None = None,
        snapshot_directory: str | None = None,
        *,
        display_name: str | None = None,
        description: str = "",
        run_type: str = "steplog.run",
        run_id: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        properties: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        log_system_metrics: bool = False,
        **kwargs: Any,
    ) -> Run:
        """Start a Running run (Azure ML's `start_logging`). `outputs`: a
        directory whose files are uploaded as run files (under the same
        relative name) when the run completes, fails or is canceled.
        `snapshot_directory` is ignored (steplog keeps no code snapshots).
        `log_system_metrics`: sample CPU, memory, disk, network and GPUs
        into the run in the background (steplog.integrations.system)."""
        from steplog.run import Run

        if snapshot_directory is not None:
            _azure.ignored(
                "Experiment.start_logging",
                "snapshot_directory",
                "steplog keeps no code snapshots; upload_folder() stores files",
            )
        for key in sorted(kwargs):
            _azure.ignored("Experiment.start_logging", key, "not a steplog run setting")
        run = Run._create(
            self._client,
            self.name,
            display_name=display_name or "",
            description=description,
            run_type=run_type,
            run_id=run_id,
            tags=tags,
            properties=properties,
            labels=labels,
            outputs=outputs,
        )
        if log_system_metrics:
            from steplog.integrations import system

            system.start(run)
        return run

    def get_runs(
        self,
        type: str | None = None,
        tags: Mapping[str, str | None] | Iterable[str] | str | None = None,
        properties: Mapping[str, str] | Iterable[str] | str | None = None,
        include_children: bool = False,
        status: str | None = None,
    ) -> Iterator[Run]:
        """Runs of this experiment, newest first. `tags` and `properties`: a
        key (the run has it), keys, or a dict of key -> value."""
        from steplog.run import Run

        return iter(
            Run.list(
                self,
                type=type,
                tags=tags,
                properties=properties,
                status=status,
                include_children=include_children,
            )
        )
