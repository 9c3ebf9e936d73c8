"""The data model's rules: names, tags, run statuses and their transitions.

Pure code: no grpc, asyncpg or aiobotocore.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from enum import StrEnum

from ingest.core.checks import CONTROL as _CONTROL
from ingest.core.errors import invalid, precondition

DEFAULT_WORKSPACE = "default"

# Matched with fullmatch: "$" alone would let a trailing newline through.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_WORKSPACE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")

MAX_TAG_KEY = 255
MAX_TAG_VALUE = 5000
MAX_TEXT = 5000
MAX_TAGS = 1000
MAX_PROPERTIES = 1000


class RunStatus(StrEnum):
    """Azure ML's run statuses; the value is the name clients see."""

    NOT_STARTED = "NotStarted"
    QUEUED = "Queued"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    CANCEL_REQUESTED = "CancelRequested"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"
    NOT_RESPONDING = "NotResponding"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED})

# Which status a run may move to from each status. NOT_RESPONDING is never a
# stored status: it is derived from the last time the run was heard from.
_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.NOT_STARTED: frozenset(
        {
            RunStatus.QUEUED,
            RunStatus.RUNNING,
            RunStatus.CANCEL_REQUESTED,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELED,
        }
    ),
    RunStatus.QUEUED: frozenset(
        {
            RunStatus.RUNNING,
            RunStatus.CANCEL_REQUESTED,
            RunStatus.FAILED,
            RunStatus.CANCELED,
        }
    ),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.FINALIZING,
            RunStatus.CANCEL_REQUESTED,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELED,
        }
    ),
    RunStatus.FINALIZING: frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED}),
    RunStatus.CANCEL_REQUESTED: frozenset(
        {RunStatus.CANCELED, RunStatus.FAILED, RunStatus.COMPLETED}
    ),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELED: frozenset(),
}


def check_transition(current: RunStatus, target: RunStatus) -> None:
    """Raise FAILED_PRECONDITION unless current -> target is allowed."""
    if target == RunStatus.NOT_RESPONDING:
        raise invalid("status", "NotResponding is derived from heartbeats and cannot be set")
    if current == target and not current.terminal:
        return
    if target not in _TRANSITIONS[current]:
        if current.terminal:
            raise precondition(
                "status",
                f"run is {current.value}, a terminal state; it cannot become {target.value}",
            )
        raise precondition("status", f"a {current.value} run cannot become {target.value}")


def workspace_name(value: str) -> str:
    value = value or DEFAULT_WORKSPACE
    if not _WORKSPACE.fullmatch(value):
        raise invalid(
            "workspace",
            f"invalid workspace {_show(value)}: 1..63 characters of a-z, 0-9, '_' and '-'",
        )
    return value


def experiment_name(value: str, field: str = "name") -> str:
    if not value:
        raise invalid(field, "experiment name is required")
    if not _NAME.fullmatch(value):
        raise invalid(
            field,
            f"invalid experiment name {_show(value)}: 1..255 characters of letters, digits, "
            "'_', '-' and '.', starting with a letter or digit",
        )
    return value


def run_id(value: str, field: str = "run_id") -> str:
    if not value:
        raise invalid(field, "run id is required")
    if not _ID.fullmatch(value):
        raise invalid(
            field,
            f"invalid run id {_show(value)}: 1..128 characters of letters, digits, '_', '-' and "
            "'.', starting with a letter or digit",
        )
    return value


def run_id_ok(value: str) -> bool:
    """Whether value can be a run id (every stored run id is one)."""
    return _ID.fullmatch(value) is not None


def new_run_id(experiment: str) -> str:
    """Azure ML's style: <experiment>_<unique suffix>, bounded to 128 characters."""
    suffix = uuid.uuid4().hex[:20]
    return f"{experiment[:100]}_{suffix}"


def text(value: str, field: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise invalid(field, f"longer than {limit} characters ({len(value)})")
    if "\x00" in value:
        raise invalid(field, "contains a NUL character")
    return value


def tag_key(key: str, field: str = "tags") -> str:
    if not key:
        raise invalid(field, "tag key must not be empty")
    if len(key) > MAX_TAG_KEY or _CONTROL.search(key):
        raise invalid(
            field, f"invalid tag key {_show(key)}: 1..255 characters, no control characters"
        )
    return key


def tags(pairs: Iterable[tuple[str, str | None]], field: str = "tags") -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, value in pairs:
        tag_key(key, field)
        if value is not None:
            text(value, f"{field}[{key}]", MAX_TAG_VALUE)
        out[key] = value
    if len(out) > MAX_TAGS:
        raise invalid(field, f"more than {MAX_TAGS} tags")
    return out


def properties(values: Mapping[str, str], field: str = "properties") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        tag_key(key, field)
        text(value, f"{field}[{key}]", MAX_TAG_VALUE)
        out[key] = value
    if len(out) > MAX_PROPERTIES:
        raise invalid(field, f"more than {MAX_PROPERTIES} properties")
    return out


def merge_properties(current: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """Properties are add-only: re-adding a key with the same value is a no-op,
    with another value an error that changes nothing."""
    for key, value in new.items():
        if key in current and current[key] != value:
            raise precondition(
                f"properties[{key}]",
                f"property {key!r} is already {current[key]!r}; properties are add-only "
                f"and cannot be changed to {value!r}",
            )
    merged = dict(current)
    merged.update(new)
    return merged


def _show(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
