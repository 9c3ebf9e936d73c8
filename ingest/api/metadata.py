"""ExperimentService and RunService."""

from __future__ import annotations

from typing import Any

import grpc

from ingest.api.common import (
    experiment_to_proto,
    handle_errors,
    run_to_proto,
    status_from_proto,
    tags_from_proto,
)
from ingest.core import model
from ingest.core.errors import invalid
from ingest.store.metadata import MetadataStore
from steplog.v1 import (
    common_pb2,
)
from steplog.v1 import (
    experiment_service_pb2 as ex,
)
from steplog.v1 import (
    experiment_service_pb2_grpc as ex_grpc,
)
from steplog.v1 import (
    run_service_pb2 as rs,
)
from steplog.v1 import (
    run_service_pb2_grpc as rs_grpc,
)

Ctx = grpc.aio.ServicerContext[Any, Any]

_ARCHIVED_FILTER = {
    ex.EXPERIMENT_VIEW_UNSPECIFIED: False,
    ex.EXPERIMENT_VIEW_ACTIVE_ONLY: False,
    ex.EXPERIMENT_VIEW_ARCHIVED_ONLY: True,
    ex.EXPERIMENT_VIEW_ALL: None,
}


class ExperimentServicer(ex_grpc.ExperimentServiceServicer):
    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    @handle_errors
    async def GetOrCreateExperiment(
        self, request: ex.GetOrCreateExperimentRequest, context: Ctx
    ) -> ex.GetOrCreateExperimentResponse:
        workspace = model.workspace_name(request.workspace)
        name = model.experiment_name(request.name)
        row, created = await self.store.get_or_create_experiment(
            workspace, name, tags_from_proto(request.tags)
        )
        return ex.GetOrCreateExperimentResponse(
            experiment=experiment_to_proto(row), created=created
        )

    @handle_errors
    async def GetExperiment(
        self, request: ex.GetExperimentRequest, context: Ctx
    ) -> ex.GetExperimentResponse:
        workspace = model.workspace_name(request.workspace)
        row = await self.store.get_experiment(workspace, model.experiment_name(request.name))
        return ex.GetExperimentResponse(experiment=experiment_to_proto(row))

    @handle_errors
    async def ListExperiments(
        self, request: ex.ListExperimentsRequest, context: Ctx
    ) -> ex.ListExperimentsResponse:
        workspace = model.workspace_name(request.workspace)
        if request.view not in _ARCHIVED_FILTER:
            raise invalid("view", f"unknown experiment view {request.view}")
        rows = await self.store.list_experiments(
            workspace,
            tags_from_proto(request.tags),
            _ARCHIVED_FILTER[request.view],
            model.text(request.name_prefix, "name_prefix", 255),
        )
        return ex.ListExperimentsResponse(experiments=[experiment_to_proto(r) for r in rows])

    @handle_errors
    async def UpdateExperimentTags(
        self, request: ex.UpdateExperimentTagsRequest, context: Ctx
    ) -> ex.UpdateExperimentTagsResponse:
        workspace = model.workspace_name(request.workspace)
        remove = [model.tag_key(k, "remove_keys") for k in request.remove_keys]
        row = await self.store.update_experiment_tags(
            workspace,
            model.experiment_name(request.name),
            tags_from_proto(request.set_tags, "set_tags"),
            remove,
        )
        return ex.UpdateExperimentTagsResponse(experiment=experiment_to_proto(row))

    @handle_errors
    async def ArchiveExperiment(
        self, request: ex.ArchiveExperimentRequest, context: Ctx
    ) -> ex.ArchiveExperimentResponse:
        workspace = model.workspace_name(request.workspace)
        row = await self.store.set_experiment_archived(
            workspace, model.experiment_name(request.name), True
        )
        return ex.ArchiveExperimentResponse(experiment=experiment_to_proto(row))

    @handle_errors
    async def ReactivateExperiment(
        self, request: ex.ReactivateExperimentRequest, context: Ctx
    ) -> ex.ReactivateExperimentResponse:
        workspace = model.workspace_name(request.workspace)
        new_name = model.experiment_name(request.new_name, "new_name") if request.new_name else ""
        row = await self.store.set_experiment_archived(
            workspace, model.experiment_name(request.name), False, new_name
        )
        return ex.ReactivateExperimentResponse(experiment=experiment_to_proto(row))

    @handle_errors
    async def DeleteExperiment(
        self, request: ex.DeleteExperimentRequest, context: Ctx
    ) -> ex.DeleteExperimentResponse:
        workspace = model.workspace_name(request.workspace)
        raw = request.experiment_id
        if not raw:
            raise invalid("experiment_id", "experiment_id is required")
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise invalid(
                "experiment_id",
                f"experiment_id must be the decimal id the service returned, not {raw[:40]!r}",
            )
        name, runs = await self.store.delete_experiment(workspace, int(raw))
        return ex.DeleteExperimentResponse(name=name, deleted_runs=runs)


class RunServicer(rs_grpc.RunServiceServicer):
    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    @handle_errors
    async def CreateRun(self, request: rs.CreateRunRequest, context: Ctx) -> rs.CreateRunResponse:
        workspace = model.workspace_name(request.workspace)
        experiment = model.experiment_name(request.experiment_name, "experiment_name")
        run_id = model.run_id(request.run_id) if request.run_id else model.new_run_id(experiment)
        parent = (
            model.run_id(request.parent_run_id, "parent_run_id") if request.parent_run_id else ""
        )
        status = status_from_proto(request.status) or model.RunStatus.RUNNING
        if status not in (
            model.RunStatus.NOT_STARTED,
            model.RunStatus.RUNNING,
            model.RunStatus.QUEUED,
        ):
            raise invalid("status", f"a run cannot be created as {status.value}")
        row, created = await self.store.create_run(
            workspace,
            experiment,
            run_id,
            model.text(request.display_name, "display_name", 1000),
            model.text(request.description, "description"),
            model.text(request.run_type, "run_type", 255),
            parent,
            tags_from_proto(request.tags),
            model.properties(request.properties),
            status,
        )
        return rs.CreateRunResponse(run=run_to_proto(row), created=created)

    @handle_errors
    async def GetRun(self, request: rs.GetRunRequest, context: Ctx) -> rs.GetRunResponse:
        workspace = model.workspace_name(request.workspace)
        row = await self.store.get_run(workspace, model.run_id(request.run_id))
        return rs.GetRunResponse(run=run_to_proto(row))

    @handle_errors
    async def ListRuns(self, request: rs.ListRunsRequest, context: Ctx) -> rs.ListRunsResponse:
        workspace = model.workspace_name(request.workspace)
        if not request.experiment_name and not request.parent_run_id:
            raise invalid("experiment_name", "experiment_name or parent_run_id is required")
        experiment = (
            model.experiment_name(request.experiment_name, "experiment_name")
            if request.experiment_name
            else ""
        )
        parent = (
            model.run_id(request.parent_run_id, "parent_run_id") if request.parent_run_id else ""
        )
        if request.limit < 0:
            raise invalid("limit", "must be >= 0")
        rows = await self.store.list_runs(
            workspace,
            experiment,
            parent,
            request.recursive,
            tags_from_proto(request.tags),
            model.properties(request.properties),
            request.run_type,
            status_from_proto(request.status),
            min(request.limit or 1000, 10_000),
            [model.tag_key(k, "property_keys") for k in request.property_keys],
        )
        return rs.ListRunsResponse(runs=[run_to_proto(r) for r in rows])

    @handle_errors
    async def UpdateRunTags(
        self, request: rs.UpdateRunTagsRequest, context: Ctx
    ) -> rs.UpdateRunTagsResponse:
        workspace = model.workspace_name(request.workspace)
        remove = [model.tag_key(k, "remove_keys") for k in request.remove_keys]
        row = await self.store.update_run_tags(
            workspace,
            model.run_id(request.run_id),
            tags_from_proto(request.set_tags, "set_tags"),
            remove,
        )
        return rs.UpdateRunTagsResponse(run=run_to_proto(row))

    @handle_errors
    async def AddRunProperties(
        self, request: rs.AddRunPropertiesRequest, context: Ctx
    ) -> rs.AddRunPropertiesResponse:
        workspace = model.workspace_name(request.workspace)
        row = await self.store.add_run_properties(
            workspace, model.run_id(request.run_id), model.properties(request.properties)
        )
        return rs.AddRunPropertiesResponse(run=run_to_proto(row))

    @handle_errors
    async def UpdateRunStatus(
        self, request: rs.UpdateRunStatusRequest, context: Ctx
    ) -> rs.UpdateRunStatusResponse:
        workspace = model.workspace_name(request.workspace)
        target = status_from_proto(request.status)
        if target is None:
            raise invalid("status", "status is required")
        row = await self.store.update_run_status(
            workspace,
            model.run_id(request.run_id),
            target,
            model.text(request.error.message, "error.message", 100_000),
            model.text(request.error.code, "error.code", 255),
        )
        return rs.UpdateRunStatusResponse(run=run_to_proto(row))

    @handle_errors
    async def Heartbeat(self, request: rs.HeartbeatRequest, context: Ctx) -> rs.HeartbeatResponse:
        workspace = model.workspace_name(request.workspace)
        ids = [model.run_id(r, "run_ids") for r in request.run_ids]
        statuses = await self.store.heartbeat(workspace, ids)
        from ingest.api.common import STATUS_TO_PROTO

        return rs.HeartbeatResponse(
            statuses=[STATUS_TO_PROTO[model.RunStatus(s)] for s in statuses]  # type: ignore[misc]
        )

    @handle_errors
    async def RewindRun(self, request: rs.RewindRunRequest, context: Ctx) -> rs.RewindRunResponse:
        workspace = model.workspace_name(request.workspace)
        if request.step < 0:
            raise invalid("step", "must be >= 0")
        hidden, series = await self.store.rewind_run(
            workspace, model.run_id(request.run_id), request.step, list(request.names)
        )
        return rs.RewindRunResponse(hidden_points=hidden, series=series)


__all__ = ["ExperimentServicer", "RunServicer", "common_pb2"]
