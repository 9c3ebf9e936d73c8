"""The checks of `run.log_batch`: arrays in, checked numpy columns out, with
numpy only (no Python object per point). Everything is checked before any
series is appended, so a bad call logs nothing and names the field.

- values: one-dimensional, of booleans, integers or floats (numpy dtype
  kinds b, i, u, f), copied as float64; NaN, infinities and -0.0 are values
  like any other. Strings, complex numbers, objects (a list holding None, a
  Decimal) and dates are refused: converting them would lose or invent data.
- steps: one-dimensional integers, each 0..2**63-1, and never smaller than
  the step before it in the same call (a step that goes back would be
  rejected by the service as STEP_NOT_INCREASING point by point; here the
  whole call is refused at the line that made it). An equal step is left to
  the service's step rules (a duplicate when the value is the same).
- times: one-dimensional, finite seconds since the Unix epoch.
- lengths: every column the length of steps and times when they are given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from steplog.errors import InvalidArgumentError

_NUMERIC_KINDS = "biuf"
_INT64_MAX = 2**63 - 1

F64 = np.ndarray[Any, np.dtype[np.float64]]
I64 = np.ndarray[Any, np.dtype[np.int64]]


def _one_dimensional(arr: np.ndarray[Any, Any], what: str, field: str) -> None:
    if arr.ndim != 1:
        raise InvalidArgumentError(
            f"{what} must be one-dimensional, not of shape {arr.shape}", field=field
        )


def batch_values(name: str, column: Any) -> F64:
    """One series' values as a float64 column."""
    what = f"metric {name!r}: log_batch values"
    try:
        arr = np.asarray(column)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise InvalidArgumentError(
            f"{what} must be an array of numbers ({exc})", field="value"
        ) from None
    _one_dimensional(arr, what, "value")
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidArgumentError(
            f"{what} must be numbers (bool, int or float), not dtype {arr.dtype}"
            + (" (log text with run.log or run.log_list)" if arr.dtype.kind in "US" else ""),
            field="value",
        )
    return np.ascontiguousarray(arr, dtype=np.float64)


def batch_steps(steps: Any) -> I64:
    """The shared steps as an int64 column, checked."""
    arr = np.asarray(steps)
    _one_dimensional(arr, "log_batch steps", "step")
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"log_batch steps must be integers, not dtype {arr.dtype}", field="step"
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        raise InvalidArgumentError(
            f"log_batch steps must be at most {_INT64_MAX}, not {int(arr.max())}", field="step"
        )
    col = np.ascontiguousarray(arr, dtype=np.int64)
    back = np.flatnonzero(col[1:] < col[:-1])
    if back.size:
        i = int(back[0]) + 1
        raise InvalidArgumentError(
            f"log_batch steps must not decrease within one call: step {int(col[i])} at "
            f"position {i} comes after step {int(col[i - 1])} (nothing of this call was "
            "logged; use run.rewind(step) to resume from a checkpoint)",
            field="step",
        )
    if int(col[0]) < 0:  # in order: the first is the smallest
        raise InvalidArgumentError(f"log_batch steps must be >= 0, not {int(col[0])}", field="step")
    return col


def batch_times(times: Any) -> F64:
    """The shared wall times as a float64 column, checked."""
    arr = np.asarray(times)
    _one_dimensional(arr, "log_batch times", "time")
    if arr.dtype.kind not in "iuf":
        raise InvalidArgumentError(
            f"log_batch times must be seconds since the Unix epoch (numbers), not dtype "
            f"{arr.dtype}",
            field="time",
        )
    col = np.ascontiguousarray(arr, dtype=np.float64)
    if not bool(np.isfinite(col).all()):
        i = int(np.flatnonzero(~np.isfinite(col))[0])
        raise InvalidArgumentError(
            f"log_batch times must be finite, not {float(col[i])} at position {i}", field="time"
        )
    return col


def batch_columns(
    metrics: str | Mapping[str, Any], values: Any, steps: Any, times: Any
) -> tuple[list[tuple[str, F64]], I64 | None, F64 | None]:
    """The checked (name, values) columns, steps and times of one call."""
    if isinstance(metrics, str):
        if values is None:
            raise InvalidArgumentError(
                f"metric {metrics!r}: log_batch needs the values", field="value"
            )
        columns: Mapping[str, Any] = {metrics: values}
    else:
        if values is not None:
            raise InvalidArgumentError(
                "log_batch takes the values in the mapping when it is given one", field="value"
            )
        columns = metrics
    step_col = None if steps is None else batch_steps(steps)
    time_col = None if times is None else batch_times(times)
    if step_col is not None and time_col is not None and step_col.size != time_col.size:
        raise InvalidArgumentError(
            f"log_batch got {step_col.size} steps but {time_col.size} times", field="time"
        )
    shared = step_col if step_col is not None else time_col
    checked = []
    for name, column in columns.items():
        col = batch_values(name, column)
        if shared is not None and col.size != shared.size:
            given = "steps" if step_col is not None else "times"
            raise InvalidArgumentError(
                f"metric {name!r}: {col.size} log_batch values for {shared.size} {given}",
                field="value",
            )
        checked.append((name, col))
    return checked, step_col, time_col
