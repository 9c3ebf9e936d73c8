"""Step order per series. Pure: numpy only, no I/O.

The rules (DESIGN.md, "Semantics users rely on"):
- A series is stepped or unstepped, fixed by its first point; mixing is rejected.
- Unstepped points get the next index in commit order.
- Strict (default): each step must be greater than the last accepted one. An
  exact repeat of the last accepted point (same step, same value) is a
  duplicate: counted, not stored. A smaller step, or the same step with
  another value, is rejected.
- Out-of-order series accept any step; the last write per step wins.

The caller holds the authoritative state (locked in the database) and feeds
the chunks of one transaction through `apply` in commit order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.core.batch import (
    I64,
    KIND_MISMATCH,
    STEP_CONFLICT,
    STEP_MODE_MISMATCH,
    STEP_NOT_INCREASING,
    VALUE_TEXT,
    Chunk,
    Outcome,
)
from ingest.core.evaluations import SCHEMA_NAMES
from ingest.core.kinds import (
    KIND_EVALUATION,
    KIND_LABELS,
    KIND_SCALAR,
    RUN_NOT_ACTIVE,
    RUN_NOT_FOUND,
)
from ingest.core.model import RunStatus


@dataclass
class SeriesState:
    """The authoritative state of one series (a row of the series table)."""

    series_id: int
    kind: int
    value_type: int
    stepped: bool
    out_of_order: bool
    last_step: int | None = None
    last_value: float | None = None
    last_text: str | None = None
    point_count: int = 0
    new: bool = False
    changed: bool = False


@dataclass
class Accepted:
    """The points of a chunk to store, and for out-of-order series the steps
    whose earlier points must be hidden (last write wins)."""

    chunk: Chunk
    index: I64
    supersede: I64 | None = None
    series_id: int = 0


def _same(a: float | None, b: float) -> bool:
    if a is None:
        return False
    return bool(a == b or (np.isnan(a) and np.isnan(b)))


def _kind_label(kind: int, value_type: int) -> str:
    if kind == KIND_SCALAR:
        return "text scalar" if value_type == VALUE_TEXT else "numeric scalar"
    # An evaluation series' value_type is its schema.
    if kind == KIND_EVALUATION and value_type in SCHEMA_NAMES:
        return f"{SCHEMA_NAMES[value_type]} evaluation"
    return KIND_LABELS.get(kind, str(kind))


def apply(chunk: Chunk, state: SeriesState, outcome: Outcome) -> Accepted | None:
    """Decide which alive points of chunk are accepted; update state."""
    if chunk.kind != state.kind or chunk.value_type != state.value_type:
        outcome.reject(
            chunk,
            None,
            KIND_MISMATCH,
            f"series {chunk.name!r} holds {_kind_label(state.kind, state.value_type)} points; "
            f"these are {_kind_label(chunk.kind, chunk.value_type)}",
        )
        return None
    if chunk.stepped != state.stepped:
        want = "with a step" if state.stepped else "without a step"
        outcome.reject(
            chunk,
            None,
            STEP_MODE_MISMATCH,
            f"series {chunk.name!r} was logged {want}; every point of it must be too",
            steps=False,
        )
        return None
    alive = np.flatnonzero(chunk.alive)
    if alive.size == 0:
        return None
    if not state.stepped:
        return _unstepped(chunk, state, outcome, alive)
    if state.out_of_order:
        return _out_of_order(chunk, state, outcome, alive)
    return _strict(chunk, state, outcome, alive)


def _set_last(state: SeriesState, chunk: Chunk, i: int) -> None:
    state.last_step = int(chunk.steps[i])
    if chunk.texts is not None:
        state.last_text = chunk.texts[i]
        state.last_value = None
    elif chunk.values is not None:
        state.last_value = float(chunk.values[i])
    state.changed = True


def _unstepped(chunk: Chunk, state: SeriesState, outcome: Outcome, alive: I64) -> Accepted:
    start = -1 if state.last_step is None else state.last_step
    chunk.steps[alive] = np.arange(start + 1, start + 1 + alive.size, dtype=np.int64)
    _set_last(state, chunk, int(alive[-1]))
    state.point_count += int(alive.size)
    outcome.accepted += int(alive.size)
    return Accepted(chunk, alive, series_id=state.series_id)


def _out_of_order(chunk: Chunk, state: SeriesState, outcome: Outcome, alive: I64) -> Accepted:
    steps = chunk.steps[alive]
    # Within the chunk the last write per step wins: keep each step's last index.
    rev_unique, rev_first = np.unique(steps[::-1], return_index=True)
    keep = np.sort(alive.size - 1 - rev_first)
    index = alive[keep]
    top = int(np.argmax(chunk.steps[index]))
    if state.last_step is None or int(chunk.steps[index[top]]) >= state.last_step:
        _set_last(state, chunk, int(index[top]))
    state.point_count += int(index.size)
    state.changed = True
    # Points superseded inside the chunk were accepted, then overwritten.
    outcome.accepted += int(alive.size)
    return Accepted(chunk, index, supersede=rev_unique.astype(np.int64), series_id=state.series_id)


def _strict(chunk: Chunk, state: SeriesState, outcome: Outcome, alive: I64) -> Accepted | None:
    steps = chunk.steps[alive]
    last = -1 if state.last_step is None else state.last_step
    # Fast path: already strictly increasing past the last accepted step.
    if steps[0] > last and (steps.size == 1 or bool(np.all(steps[1:] > steps[:-1]))):
        _set_last(state, chunk, int(alive[-1]))
        state.point_count += int(alive.size)
        outcome.accepted += int(alive.size)
        return Accepted(chunk, alive, series_id=state.series_id)
    # A point is accepted iff its step exceeds every earlier step (rejected
    # points never raise the running maximum, so it equals the last accepted).
    prev_max = np.maximum.accumulate(np.concatenate(([last], steps[:-1])))
    ok = steps > prev_max
    # For each rejected point: which point holds the last accepted value?
    positions = np.where(ok, np.arange(steps.size), -1)
    holder = np.concatenate(([-1], np.maximum.accumulate(positions)[:-1]))
    equal_step = (~ok) & (steps == prev_max) & (state.last_step is not None or holder >= 0)
    dup = np.zeros(steps.size, dtype=np.bool_)
    for j in np.flatnonzero(equal_step):
        h = int(holder[j])
        if chunk.texts is not None:
            prior_text = state.last_text if h < 0 else chunk.texts[int(alive[h])]
            dup[j] = prior_text == chunk.texts[int(alive[j])]
        elif chunk.values is not None:
            prior = state.last_value if h < 0 else float(chunk.values[int(alive[h])])
            dup[j] = _same(prior, float(chunk.values[int(alive[j])]))
    conflict = equal_step & ~dup
    smaller = (~ok) & ~equal_step
    full = np.zeros(len(chunk), dtype=np.bool_)
    if dup.any():
        n = int(dup.sum())
        outcome.duplicates += n
        full[alive[dup]] = True
        chunk.alive &= ~full
        full[:] = False
    if conflict.any():
        full[alive[conflict]] = True
        outcome.reject(
            chunk,
            full,
            STEP_CONFLICT,
            "step already logged with another value (use an out-of-order series or "
            "run.rewind(step) to log it again)",
        )
        full[:] = False
    if smaller.any():
        full[alive[smaller]] = True
        outcome.reject(
            chunk,
            full,
            STEP_NOT_INCREASING,
            "step is smaller than the last logged step (use run.rewind(step) to resume "
            "from a checkpoint)",
        )
    index = alive[ok]
    if index.size == 0:
        return None
    _set_last(state, chunk, int(index[-1]))
    state.point_count += int(index.size)
    outcome.accepted += int(index.size)
    return Accepted(chunk, index, series_id=state.series_id)


def reject_unwritable_run(
    outcome: Outcome, chunk: Chunk, workspace: str, status: str | None
) -> bool:
    """Reject the chunk's points when its run does not exist in the workspace
    (status None: RUN_NOT_FOUND) or has finished (RUN_NOT_ACTIVE); True when
    it did. Steps are not checked: the points were never the run's."""
    if status is None:
        outcome.reject(
            chunk,
            None,
            RUN_NOT_FOUND,
            f"run {chunk.run_id[:130]!r} does not exist in workspace {workspace!r}",
            steps=False,
        )
        return True
    if RunStatus(status).terminal:
        outcome.reject(
            chunk,
            None,
            RUN_NOT_ACTIVE,
            f"run {chunk.run_id!r} is {status}; a finished run takes no more points",
            steps=False,
        )
        return True
    return False
