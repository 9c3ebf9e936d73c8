"""The one retry table, shared by the client (stream, `steplog sync`) and the
service (which sends RetryInfo with the codes that need it).

- UNAVAILABLE, DEADLINE_EXCEEDED: retried with jittered exponential backoff
  (at most backoff_max apart): on the stream until close() (its timeout
  bounds it; the data waits in the bounded buffer or the spool), by
  `steplog sync` at most `attempts` times.
- RESOURCE_EXHAUSTED: the same, but only with a google.rpc.RetryInfo detail,
  and never sooner than its delay; without one (a message over a size limit)
  it is not retried.
- ABORTED (a sequence gap): the window is resent from its oldest batch, 5
  times, then under a new writer id.
- INTERNAL, UNKNOWN: retried until 3 consecutive failures without an
  acknowledgement, then the batch is refused.
- anything else: not retried ("do not send this again").

A batch the service refuses (a code that is not retried, or whose bound is
spent) is spooled when a spool directory is configured, counted, and reported;
the batches behind it go on under a new writer id, so it holds nothing back.
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


def should_retry(code: grpc.StatusCode | None, *, retry_info: bool, failures: int = 1) -> bool:
    """Whether to try again after `failures` consecutive failures (this one
    included) without progress, the last with `code`."""
    rule = RETRY_TABLE.get(code) if code is not None else None
    if rule is None:
        return False
    if rule.needs_retry_info and not retry_info:
        return False
    return rule.attempts is None or failures < rule.attempts


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """Whether the code may be retried at all (see should_retry for when)."""
    return code in RETRYABLE_CODES
