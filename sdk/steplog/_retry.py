"""The one table of retryable gRPC status codes, shared by client and service.

`UNAVAILABLE` and `RESOURCE_EXHAUSTED` mean "slow down and try again";
`INVALID_ARGUMENT` means "do not send this again".
"""

from __future__ import annotations

import grpc

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def is_retryable(code: grpc.StatusCode | None) -> bool:
    return code in RETRYABLE_CODES
