"""steplog's exceptions: one hierarchy, split by "retry" and "do not retry".

Every error from the service maps to one class through `from_rpc_error`, which
keeps the gRPC status code, the offending field and the service's reason.
"""

from __future__ import annotations

import grpc

from steplog._retry import RETRYABLE_CODES


class SteplogError(Exception):
    """Base class of every steplog error."""


class NotApplicableError(SteplogError, NotImplementedError):
    """An Azure ML method that does not belong to a run-history service
    (models, environments, snapshots, compute, job submission). The message
    names the steplog way to do it, where there is one."""


class ServiceError(SteplogError):
    """The service answered with an error status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, field: str = ""
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.field = field

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class InvalidArgumentError(ServiceError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServiceError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ServiceError):
    """The request is valid but the state forbids it (an illegal status
    transition, a property overwrite, logging to a completed run)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(ServiceError):
    """The service (or its database or object store) cannot be reached now."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnavailableError,
        ResourceExhaustedError,
    )
}


def _field_of(err: grpc.RpcError) -> str:
    """The field named in a google.rpc.BadRequest detail, if the service sent one."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)
    except Exception:
        return ""
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                return str(violation.field)
    return ""


def from_rpc_error(err: grpc.RpcError) -> ServiceError:
    """Turn a grpc.RpcError into the matching typed steplog exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, ServiceError)
    return cls(details or code.name, code=code, field=_field_of(err))
