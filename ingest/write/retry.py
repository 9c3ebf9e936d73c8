"""How the write pipeline waits and what it tells about a failure: the
bounded tries of a group commit, jittered exponential backoff of commits,
reconnects and restarts, and error names safe to show a client.

Written here rather than with a retry library (tenacity): each loop that
waits (group commit, worker reconnect, restart) also has to watch shutdown
and report health between tries, which a decorator around one call does not
give; the waits themselves are these few lines."""

from __future__ import annotations

import random

# Tries of one group commit on transient errors, and the backoff between them.
COMMIT_TRIES = 5
RETRY_BASE_S = 0.05
RETRY_MAX_S = 1.0
# Reconnect and restart backoff of a worker.
RECONNECT_MAX_S = 2.0
RESTART_MAX_S = 5.0


def jitter(delay: float) -> float:
    return delay * (0.5 + random.random())


def commit_backoff(attempt: int) -> float:
    """The wait after the attempt-th failed try of a commit (0-based)."""
    return jitter(min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S))


def error_name(exc: BaseException) -> str:
    """A short, safe name of an error: its class and SQLSTATE, no message
    (messages can carry values, relation names, host names)."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} (SQLSTATE {state})" if state else type(exc).__name__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def public(problem: str) -> str:
    """What a client may read of a worker's problem: the error class, not the
    server's message (it can name hosts, roles, files)."""
    return problem.split(":", 2)[1].strip() if problem.count(":") >= 2 else problem
