"""The one retry table, shared by the client (stream, unary calls, `steplog
sync`, uploads) and the service (which sends RetryInfo with the codes that
need it).

- UNAVAILABLE, DEADLINE_EXCEEDED: retried with jittered exponential backoff
  (at most backoff_max apart): on the stream until close() (its timeout
  bounds it; the data waits in the bounded buffer or the spool), by unary
  calls within the call's timeout, by `steplog sync` at most `attempts`
  times.
- Transport loss (`is_transport_loss`): the HTTP/2 stream or connection
  under a call went away before any status arrived from the service; gRPC
  reports it as INTERNAL (or UNKNOWN, CANCELLED) with details such as
  "Stream removed", "Received RST_STREAM with error code 0", "Socket
  closed", or grpc.aio's "Internal error from Core" for a write that
  failed. A load balancer resets the stream that way when the replica
  behind it dies. Nothing was refused: it is retried exactly as UNAVAILABLE.
- RESOURCE_EXHAUSTED: the same, but only with a google.rpc.RetryInfo detail,
  and never sooner than its delay; without one (a message over a size limit)
  it is not retried.
- ABORTED (a sequence gap): the window is resent from its oldest batch, 5
  times, then under a new writer id.
- INTERNAL, UNKNOWN that the service itself sent (any other details, e.g.
  "commit failed; resend"): retried until 3 consecutive failures without an
  acknowledgement, then the batch is refused.
- anything else: not retried ("do not send this again").

A batch the service refuses (a code that is not retried, or whose bound is
spent) is written to the spool, counted, and reported; the batches behind it
go on under a new writer id, so it holds nothing back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc


@dataclass(frozen=True, slots=True)
class Retry:
    """How one status code is retried. `attempts`: consecutive failures
    without progress (an acknowledgement) after which the batch is given up,
    None for "until close()". `needs_retry_info`: retried only when the
    service said when (google.rpc.RetryInfo)."""

    attempts: int | None
    needs_retry_info: bool = False


RETRY_TABLE: Mapping[grpc.StatusCode, Retry] = MappingProxyType(
    {
        grpc.StatusCode.UNAVAILABLE: Retry(None),
        grpc.StatusCode.DEADLINE_EXCEEDED: Retry(None),
        grpc.StatusCode.RESOURCE_EXHAUSTED: Retry(None, needs_retry_info=True),
        grpc.StatusCode.ABORTED: Retry(5),
        grpc.StatusCode.INTERNAL: Retry(3),
        grpc.StatusCode.UNKNOWN: Retry(3),
    }
)

# Codes that may be retried (RESOURCE_EXHAUSTED only with RetryInfo; INTERNAL,
# UNKNOWN and ABORTED a bounded number of times): see should_retry.
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(RETRY_TABLE)

# Codes that say the same about every batch of a stream (the credentials):
# the whole window is set aside at once, not one batch per reconnect.
STREAM_WIDE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)

# The codes gRPC reports a lost HTTP/2 stream or connection under: an
# RST_STREAM with NO_ERROR, PROTOCOL_ERROR or INTERNAL_ERROR is INTERNAL, one
# with CANCEL is CANCELLED, older gRPC releases said UNKNOWN ("Stream removed").
TRANSPORT_LOSS_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
)

# What the gRPC library (not the service) writes in the details of those
# codes when the stream or connection went away (lower case, matched as
# substrings). The service never sends these words: its INTERNAL says
# "commit failed; resend".
TRANSPORT_LOSS_DETAILS: tuple[str, ...] = (
    "stream removed",
    "rst_stream",
    "received unexpected eos",
    "socket closed",
    "connection reset",
    "broken pipe",
    "goaway",
    "transport closed",
    # grpc.aio's own status for a write the core could not do: the stream or
    # connection died while a batch was being written (bench.chaos kill9_lb:
    # nginx, the replica behind it killed; with the 3 tries of a service's
    # INTERNAL, whole batches were refused there). Had the service answered
    # the stream (a refusal) just before, that answer is hidden this once:
    # the batch is sent again on a new stream and answered again.
    "internal error from core",
)

# A Python gRPC server's own text for an exception in a handler: the
# service's answer, whatever the exception's message says.
_SERVER_EXCEPTION_PREFIXES = ("exception calling application", "exception iterating")


def is_transport_loss(code: grpc.StatusCode | None, details: str = "") -> bool:
    """Whether a failed call lost its HTTP/2 stream or connection before
    the service answered (retried as UNAVAILABLE), as opposed to a status
    the service sent."""
    if code not in TRANSPORT_LOSS_CODES or not details:
        return False
    text = details.lower()
    if text.startswith(_SERVER_EXCEPTION_PREFIXES):
        return False
    return any(marker in text for marker in TRANSPORT_LOSS_DETAILS)


def retry_code(code: grpc.StatusCode, details: str = "") -> grpc.StatusCode:
    """The code the table treats a failure as: UNAVAILABLE for transport
    loss, else the code itself. Failures are counted under it."""
    return grpc.StatusCode.UNAVAILABLE if is_transport_loss(code, details) else code


def rule(code: grpc.StatusCode | None, details: str = "") -> Retry | None:
    """The table's row for a failure (None: not retried)."""
    if code is None:
        return None
    return RETRY_TABLE.get(retry_code(code, details))


def should_retry(
    code: grpc.StatusCode | None, *, retry_info: bool, failures: int = 1, details: str = ""
) -> bool:
    """Whether to try again after `failures` consecutive failures (this one
    included) without progress, the last with `code` and `details`."""
    found = rule(code, details)
    if found is None:
        return False
    if found.needs_retry_info and not retry_info:
        return False
    return found.attempts is None or failures < found.attempts


def is_retryable(code: grpc.StatusCode | None, details: str = "") -> bool:
    """Whether the failure may be retried at all (see should_retry for when)."""
    return rule(code, details) is not None
