"""Validation and decoding of batches, without any I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ingest import batch as b
from ingest.decode import decode_batch, labels_key
from ingest.errors import ApiError
from ingest.validate import Limits
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb


def make_batch(*series: pb.RunSeries, seq: int = 1, writer: str = "w-1") -> pb.Batch:
    return pb.Batch(writer_id=writer, sequence=seq, series=list(series))


def scalars(
    name: str = "loss",
    steps: list[int] | None = None,
    values: list[float] | None = None,
    times: list[float] | None = None,
    labels: dict[str, str] | None = None,
    texts: list[str] | None = None,
) -> pb.RunSeries:
    return pb.RunSeries(
        run_id="run-1",
        series=data_pb2.SeriesData(
            name=name,
            labels=labels or {},
            scalars=data_pb2.ScalarColumns(
                steps=steps or [], values=values or [], times=times or [], text_values=texts or []
            ),
        ),
    )


def decode(*series: pb.RunSeries) -> b.DecodedBatch:
    return decode_batch("default", make_batch(*series), 1.7e9, Limits())


def test_decode_columns_to_arrays_and_keep_nan_and_inf() -> None:
    d = decode(scalars(steps=[0, 1, 2], values=[1.0, math.nan, math.inf]))
    (c,) = d.chunks
    assert c.stepped and c.steps.dtype == np.int64 and c.steps.tolist() == [0, 1, 2]
    assert c.values is not None and math.isnan(c.values[1]) and math.isinf(c.values[2])
    assert c.times.tolist() == [1.7e9] * 3  # no times: the receive time
    assert d.outcome.rejected == 0 and d.points == 3


def test_bad_name_rejects_the_series_but_keeps_the_rest() -> None:
    d = decode(scalars(name="x" * 300, values=[1.0]), scalars(name="ok", values=[1.0, 2.0]))
    assert d.outcome.by_reason == {b.INVALID_NAME: 1}
    assert [int(c.alive.sum()) for c in d.chunks] == [0, 2]
    assert "300 characters" in d.outcome.examples[0][6]


def test_bad_labels_rejected_with_reason() -> None:
    d = decode(scalars(values=[1.0], labels={"bad key": "x"}))
    assert d.outcome.by_reason == {b.INVALID_LABELS: 1}
    d = decode(scalars(values=[1.0], labels={f"k{i}": "v" for i in range(17)}))
    assert d.outcome.by_reason == {b.INVALID_LABELS: 1}


def test_negative_steps_and_bad_times_rejected_per_point() -> None:
    d = decode(scalars(steps=[-1, 0, 1], values=[1, 2, 3], times=[1.7e9, math.nan, 1.7e9]))
    assert d.outcome.by_reason == {b.INVALID_STEP: 1, b.INVALID_VALUE: 1}
    assert d.chunks[0].alive.tolist() == [False, False, True]


def test_length_mismatch_is_rejected() -> None:
    d = decode(scalars(steps=[0, 1], values=[1.0, 2.0, 3.0]))
    assert d.outcome.by_reason == {b.INVALID_VALUE: 3}
    assert d.chunks == []


def test_both_value_types_rejected() -> None:
    d = decode(scalars(values=[1.0], texts=["a"]))
    assert d.outcome.by_reason == {b.INVALID_VALUE: 1}


def test_text_values_and_limits() -> None:
    d = decode_batch(
        "default",
        make_batch(scalars(texts=["ok", "x" * 50])),
        1.7e9,
        Limits(max_text_value_chars=10),
    )
    assert d.chunks[0].value_type == b.VALUE_TEXT
    assert d.outcome.by_reason == {b.LIMIT_EXCEEDED: 1}


def test_empty_series_and_empty_batch() -> None:
    d = decode(scalars(values=[]))
    assert d.chunks == [] and d.points == 0 and d.outcome.rejected == 0


@pytest.mark.parametrize(
    "writer,seq,field",
    [("", 1, "batch.writer_id"), ("w/1", 1, "batch.writer_id"), ("w", 0, "batch.sequence")],
)
def test_whole_batch_errors(writer: str, seq: int, field: str) -> None:
    with pytest.raises(ApiError) as err:
        decode_batch("default", make_batch(seq=seq, writer=writer), 1.7e9, Limits())
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == field


def test_labels_key_is_canonical() -> None:
    assert labels_key({"b": "1", "a": "2"}) == labels_key({"a": "2", "b": "1"})
    assert labels_key({}) == ""


def test_snapshot_and_reset_restore_the_validated_state() -> None:
    d = decode(scalars(values=[1.0, 2.0]))
    d.chunks[0].steps[:] = 99
    d.outcome.accepted = 2
    d.reset()
    assert d.chunks[0].steps.tolist() == [0, 0] and d.outcome.accepted == 0
