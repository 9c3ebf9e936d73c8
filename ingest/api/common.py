"""What every servicer shares: error mapping and proto conversions."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ingest.core import model
from ingest.core.errors import ApiError, StoreUnavailable
from steplog.v1 import common_pb2

log = logging.getLogger(__name__)


STATUS_TO_PROTO: dict[model.RunStatus, int] = {
    model.RunStatus.NOT_STARTED: common_pb2.RUN_STATUS_NOT_STARTED,
    model.RunStatus.QUEUED: common_pb2.RUN_STATUS_QUEUED,
    model.RunStatus.RUNNING: common_pb2.RUN_STATUS_RUNNING,
    model.RunStatus.FINALIZING: common_pb2.RUN_STATUS_FINALIZING,
    model.RunStatus.CANCEL_REQUESTED: common_pb2.RUN_STATUS_CANCEL_REQUESTED,
    model.RunStatus.COMPLETED: common_pb2.RUN_STATUS_COMPLETED,
    model.RunStatus.FAILED: common_pb2.RUN_STATUS_FAILED,
    model.RunStatus.CANCELED: common_pb2.RUN_STATUS_CANCELED,
    model.RunStatus.NOT_RESPONDING: common_pb2.RUN_STATUS_NOT_RESPONDING,
}
PROTO_TO_STATUS = {v: k for k, v in STATUS_TO_PROTO.items()}


def status_from_proto(value: int, field: str = "status") -> model.RunStatus | None:
    if value == common_pb2.RUN_STATUS_UNSPECIFIED:
        return None
    try:
        return PROTO_TO_STATUS[value]
    except KeyError:
        raise ApiError("INVALID_ARGUMENT", f"unknown run status {value}", field) from None


def rich_status(code: grpc.StatusCode, message: str, field: str = "") -> status_pb2.Status:
    """A google.rpc.Status with a BadRequest detail naming the field, so any
    client (any language) can tell which field was wrong."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
        status.details.append(detail)
    return status


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, ApiError):
        code = getattr(grpc.StatusCode, exc.code)
        message = f"{exc.field}: {exc.message}" if exc.field else exc.message
        await context.abort_with_status(rpc_status.to_status(rich_status(code, message, exc.field)))
    elif isinstance(exc, StoreUnavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise exc


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handle_errors(fn: F) -> F:
    """Turn ApiError into its status (with the field) and StoreUnavailable into UNAVAILABLE."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, request, context, *args, **kwargs)
        except (ApiError, StoreUnavailable) as exc:
            await abort_with(context, exc)
            raise  # unreachable: abort raises

    return cast(F, wrapper)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def tags_to_proto(tags: Mapping[str, str | None]) -> list[common_pb2.Tag]:
    return [
        common_pb2.Tag(key=k, value=v) if v is not None else common_pb2.Tag(key=k)
        for k, v in sorted(tags.items())
    ]


def tags_from_proto(tags: Iterable[common_pb2.Tag], field: str = "tags") -> dict[str, str | None]:
    return model.tags(((t.key, t.value if t.HasField("value") else None) for t in tags), field)


def experiment_to_proto(row: Mapping[str, Any]) -> common_pb2.Experiment:
    return common_pb2.Experiment(
        experiment_id=str(row["experiment_id"]),
        workspace=row["workspace"],
        name=row["name"],
        tags=tags_to_proto(row["tags"]),
        archived=row["archived"],
        created_time=timestamp(row["created_at"]),
        run_count=row["run_count"],
    )


def run_to_proto(row: Mapping[str, Any]) -> common_pb2.Run:
    status = model.RunStatus(row["effective_status"])
    error = None
    if row["error_message"] or row["error_code"]:
        error = common_pb2.RunError(
            message=row["error_message"] or "", code=row["error_code"] or ""
        )
    return common_pb2.Run(
        run_id=row["run_id"],
        workspace=row["workspace"],
        experiment_name=row["experiment_name"],
        number=row["number"],
        display_name=row["display_name"],
        description=row["description"],
        run_type=row["run_type"],
        parent_run_id=row["parent_run_id"] or "",
        root_run_id=row["root_run_id"],
        status=STATUS_TO_PROTO[status],  # type: ignore[arg-type]
        created_time=timestamp(row["created_at"]),
        start_time=timestamp(row["start_time"]),
        end_time=timestamp(row["end_time"]),
        error=error,
        tags=tags_to_proto(row["tags"]),
        properties=row["properties"],
        last_seen_time=timestamp(row["last_seen"]),
    )


Behavior = Callable[..., Any]


def rewrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary_request: Callable[[Behavior], Behavior],
    stream_request: Callable[[Behavior], Behavior],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same RPC method handler with its behaviour wrapped: `unary_request`
    wraps methods that take one request (unary and server-streaming),
    `stream_request` those that take a request stream. Interceptors use it
    to run checks inside the call, before the servicer sees a request."""
    common = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_request(handler.unary_unary), **common)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_request(handler.unary_stream), **common)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream_request(handler.stream_unary), **common)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream_request(handler.stream_stream), **common
        )
    return handler
