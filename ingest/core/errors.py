"""The service's error types. Pure: no grpc import; the servicer layer maps
`ApiError.code` (a gRPC status code name) to a status with a BadRequest detail."""

from __future__ import annotations

from typing import Literal


class ApiError(Exception):
    """A whole-request error: a gRPC status code name, the field, the reason."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def invalid(field: str, message: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, field)


def not_found(field: str, message: str) -> ApiError:
    return ApiError("NOT_FOUND", message, field)


def precondition(field: str, message: str) -> ApiError:
    return ApiError("FAILED_PRECONDITION", message, field)


class StoreUnavailable(Exception):
    """The database or the object store cannot be reached; retryable."""


# What a failed database command means to whoever retries it (the store
# classifies its driver's errors, ingest/store/db.py `classify`): conflict and
# unavailable are transient (try again), refused is a value the database will
# never store, other is anything else.
Fault = Literal["conflict", "unavailable", "refused", "other"]
CONFLICT: Fault = "conflict"
UNAVAILABLE: Fault = "unavailable"
REFUSED: Fault = "refused"
OTHER: Fault = "other"
