"""Experiment: a named group of runs, after Azure ML's `Experiment`."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Unpack

from steplog.client import Client, Connection, get_client
from steplog.v1 import common_pb2
from steplog.v1 import experiment_service_pb2 as ex

if TYPE_CHECKING:
    from steplog.run import Run

_VIEWS = {
    "active_only": ex.EXPERIMENT_VIEW_ACTIVE_ONLY,
    "archived_only": ex.EXPERIMENT_VIEW_ARCHIVED_ONLY,
    "all": ex.EXPERIMENT_VIEW_ALL,
}


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
    """Get or create the experiment `name` in a workspace.

    `Experiment("mnist")` talks to the service at `url` (else STEPLOG_URL) in
    `workspace` (else STEPLOG_WORKSPACE, else "default"). The connection
    arguments (`token`, `tls_ca`, `tls_cert`, `tls_key`, ...: see
    steplog.client.Connection) default to their STEPLOG_* variables."""

    def __init__(
        self,
        name: str,
        workspace: str | None = None,
        *,
        url: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        _proto: common_pb2.Experiment | None = None,
        _client: Client | None = None,
        **connection: Unpack[Connection],
    ) -> None:
        self._client = _client or get_client(url, workspace, **connection)
        if _proto is None:
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
        return self._proto.workspace

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

    def refresh(self) -> None:
        reply = self._client.call(
            self._client.experiments.GetExperiment,
            ex.GetExperimentRequest(workspace=self._client.workspace, name=self.name),
        )
        self._proto = reply.experiment

    # -- listing -----------------------------------------------------------------

    @staticmethod
    def list(
        workspace: str | None = None,
        experiment_name: str | None = None,
        view_type: str = "active_only",
        tags: Mapping[str, str | None] | Iterable[str] | str | None = None,
        *,
        url: str | None = None,
        **connection: Unpack[Connection],
    ) -> builtins.list[Experiment]:
        """Experiments in the workspace; `view_type` is "active_only",
        "archived_only" or "all"; `tags` a key, keys, or a dict to match."""
        if view_type not in _VIEWS:
            raise ValueError(f"view_type must be one of {sorted(_VIEWS)}, not {view_type!r}")
        client = get_client(url, workspace, **connection)
        reply = client.call(
            client.experiments.ListExperiments,
            ex.ListExperimentsRequest(
                workspace=client.workspace,
                tags=tags_to_proto(tags),
                view=_VIEWS[view_type],
            ),
        )
        out = [Experiment(e.name, _proto=e, _client=client) for e in reply.experiments]
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

    def set_tags(self, tags: Mapping[str, str | None]) -> None:
        self._update_tags(tags, [])

    def remove_tags(self, tags: Iterable[str]) -> None:
        self._update_tags({}, list(tags))

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
        display_name: str | None = None,
        *,
        description: str = "",
        run_type: str = "steplog.run",
        run_id: str | None = None,
        tags: Mapping[str, str | None] | None = None,
        properties: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Run:
        """Start a Running run (Azure ML's `start_logging`)."""
        from steplog.run import Run

        return Run._create(
            self._client,
            self.name,
            display_name=display_name or "",
            description=description,
            run_type=run_type,
            run_id=run_id,
            tags=tags,
            properties=properties,
            labels=labels,
        )

    def get_runs(
        self,
        type: str | None = None,
        tags: Mapping[str, str | None] | Iterable[str] | str | None = None,
        properties: Mapping[str, str] | None = None,
        include_children: bool = False,
        status: str | None = None,
    ) -> Iterator[Run]:
        """Runs of this experiment, newest first."""
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
