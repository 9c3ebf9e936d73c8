"""Step-order rules, without any I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ingest.core import batch as b
from ingest.core.order import SeriesState, apply


def chunk(
    steps: list[int] | None,
    values: list[float] | None = None,
    texts: list[str] | None = None,
    out_of_order: bool | None = None,
) -> b.Chunk:
    n = len(values if values is not None else texts or [])
    return b.Chunk(
        run_id="r",
        name="loss",
        labels={},
        labels_key="",
        kind=b.KIND_SCALAR,
        value_type=b.VALUE_TEXT if texts is not None else b.VALUE_NUMERIC,
        stepped=steps is not None,
        out_of_order=out_of_order,
        description="",
        steps=np.array(steps if steps is not None else [0] * n, dtype=np.int64),
        times=np.full(n, 1.7e9),
        values=None if values is None else np.array(values, dtype=np.float64),
        texts=texts,
    )


def state(
    stepped: bool = True,
    last: int | None = None,
    value: float | None = None,
    out_of_order: bool = False,
    value_type: int = b.VALUE_NUMERIC,
    text: str | None = None,
) -> SeriesState:
    return SeriesState(
        series_id=7,
        kind=b.KIND_SCALAR,
        value_type=value_type,
        stepped=stepped,
        out_of_order=out_of_order,
        last_step=last,
        last_value=value,
        last_text=text,
    )


def test_increasing_steps_all_accepted() -> None:
    c, s, o = chunk([0, 1, 5], [1.0, 2.0, 3.0]), state(), b.Outcome()
    acc = apply(c, s, o)
    assert acc is not None and acc.index.tolist() == [0, 1, 2]
    assert (o.accepted, o.duplicates, o.rejected) == (3, 0, 0)
    assert (s.last_step, s.last_value, s.point_count) == (5, 3.0, 3)
    assert acc.series_id == 7


def test_exact_repeat_of_last_point_is_a_duplicate_not_an_error() -> None:
    c, s, o = chunk([3, 4], [0.5, 0.6]), state(last=3, value=0.5), b.Outcome()
    acc = apply(c, s, o)
    assert acc is not None and acc.index.tolist() == [1]
    assert (o.accepted, o.duplicates, o.rejected) == (1, 1, 0)


def test_nan_repeat_is_a_duplicate() -> None:
    c, s, o = chunk([3], [math.nan]), state(last=3, value=math.nan), b.Outcome()
    assert apply(c, s, o) is None
    assert (o.duplicates, o.rejected) == (1, 0)


def test_same_step_other_value_is_a_conflict() -> None:
    c, s, o = chunk([3], [0.9]), state(last=3, value=0.5), b.Outcome()
    assert apply(c, s, o) is None
    assert o.by_reason == {b.STEP_CONFLICT: 1}
    assert o.examples[0][4] == 3


def test_regression_is_rejected_and_later_points_kept() -> None:
    c, s, o = (
        chunk([10, 11, 4, 12, 12, 12], [1, 2, 3, 4, 4, 5]),
        state(last=9, value=0.0),
        b.Outcome(),
    )
    acc = apply(c, s, o)
    assert acc is not None and acc.index.tolist() == [0, 1, 3]
    assert o.accepted == 3 and o.duplicates == 1
    assert o.by_reason == {b.STEP_NOT_INCREASING: 1, b.STEP_CONFLICT: 1}
    assert s.last_step == 12 and s.last_value == 4.0


def test_duplicates_within_chunk_compare_with_the_last_accepted() -> None:
    c, s, o = chunk([1, 1, 2, 2], [5, 5, 6, 7]), state(), b.Outcome()
    acc = apply(c, s, o)
    assert acc is not None and acc.index.tolist() == [0, 2]
    assert o.duplicates == 1 and o.by_reason == {b.STEP_CONFLICT: 1}


def test_unstepped_points_get_the_next_index() -> None:
    c, s, o = chunk(None, [1.0, 2.0]), state(stepped=False, last=4), b.Outcome()
    acc = apply(c, s, o)
    assert acc is not None and c.steps.tolist() == [5, 6]
    assert s.last_step == 6


def test_first_unstepped_point_is_index_zero() -> None:
    c, s, o = chunk(None, [1.0]), state(stepped=False), b.Outcome()
    apply(c, s, o)
    assert c.steps.tolist() == [0]


@pytest.mark.parametrize("series_stepped", [True, False])
def test_mixing_stepped_and_unstepped_is_rejected(series_stepped: bool) -> None:
    c = chunk(None if series_stepped else [1], [1.0])
    o = b.Outcome()
    assert apply(c, state(stepped=series_stepped), o) is None
    assert o.by_reason == {b.STEP_MODE_MISMATCH: 1}


def test_kind_or_value_type_mismatch_is_rejected() -> None:
    o = b.Outcome()
    assert apply(chunk([1], texts=["a"]), state(), o) is None
    assert o.by_reason == {b.KIND_MISMATCH: 1}
    assert "numeric scalar" in o.examples[0][6]


def test_text_duplicates() -> None:
    c = chunk([2, 3], texts=["a", "b"])
    s, o = state(last=2, value_type=b.VALUE_TEXT, text="a"), b.Outcome()
    acc = apply(c, s, o)
    assert acc is not None and acc.index.tolist() == [1] and o.duplicates == 1
    assert s.last_text == "b"


def test_out_of_order_last_write_wins() -> None:
    c = chunk([5, 2, 5, 1], [1, 2, 3, 4], out_of_order=True)
    s, o = state(last=10, value=0.0, out_of_order=True), b.Outcome()
    acc = apply(c, s, o)
    assert acc is not None
    # Step 5 is written twice in the chunk: only the later one is stored.
    assert sorted(c.steps[acc.index].tolist()) == [1, 2, 5]
    assert c.values is not None and c.values[acc.index][c.steps[acc.index] == 5].tolist() == [3.0]
    assert acc.supersede is not None and sorted(acc.supersede.tolist()) == [1, 2, 5]
    assert o.rejected == 0 and o.accepted == 4
    assert s.last_step == 10  # the highest step is still the old one


def test_rejected_points_by_validation_stay_rejected() -> None:
    c, o = chunk([1, 2], [1.0, 2.0]), b.Outcome()
    c.alive[0] = False
    acc = apply(c, state(), o)
    assert acc is not None and acc.index.tolist() == [1]
