"""Validation and decoding of batches, without any I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ingest.core import batch as b
from ingest.core.decode import decode_batch, labels_key
from ingest.core.errors import ApiError
from ingest.core.validate import Limits
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb


def make_batch(*series: pb.RunSeries, seq: int = 1, writer: str = "w-1") -> pb.Batch:
    return pb.Batch(writer_id=writer, sequence=seq, series=list(series))


def scalars(
    name: str = "loss",
    run_id: str = "run-1",
    description: str = "",
    steps: list[int] | None = None,
    values: list[float] | None = None,
    times: list[float] | None = None,
    labels: dict[str, str] | None = None,
    texts: list[str] | None = None,
) -> pb.RunSeries:
    return pb.RunSeries(
        run_id=run_id,
        series=data_pb2.SeriesData(
            name=name,
            description=description,
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
    # Refused before it was decoded: no chunk, nothing allocated for it.
    assert [int(c.alive.sum()) for c in d.chunks] == [2]
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


def test_labels_key_is_the_same_from_its_cache_and_the_cache_is_bounded() -> None:
    """labels_key keeps the keys it made (by sorted items): a key from the
    cache is the JSON a fresh one would be, and the cache never passes its
    bound however many label sets a service sees."""
    from ingest.core import decode

    first = labels_key({"rank": "7", "node": 'é"x'})
    assert first == '{"node":"é\\"x","rank":"7"}'
    assert labels_key({"node": 'é"x', "rank": "7"}) == first
    for i in range(decode._KEYS_MOST + 10):
        labels_key({"rank": str(i)})
    assert len(decode._KEYS) <= decode._KEYS_MOST
    assert labels_key({"rank": "7", "node": 'é"x'}) == first  # made again after a clear


def test_snapshot_and_reset_restore_the_validated_state() -> None:
    d = decode(scalars(values=[1.0, 2.0]))
    d.chunks[0].steps[:] = 99
    d.outcome.accepted = 2
    d.reset()
    assert d.chunks[0].steps.tolist() == [0, 0] and d.outcome.accepted == 0


# -- untrusted input: strings, counts and lengths --------------------------------------


def test_nul_in_a_text_value_is_invalid_value_and_long_is_limit_exceeded() -> None:
    d = decode_batch(
        "default",
        make_batch(scalars(texts=["ok", "a\x00b", "x" * 50])),
        1.7e9,
        Limits(max_text_value_chars=10),
    )
    assert d.outcome.by_reason == {b.INVALID_VALUE: 1, b.LIMIT_EXCEEDED: 1}
    assert d.chunks[0].alive.tolist() == [True, False, False]
    messages = {e[5]: e[6] for e in d.outcome.examples}
    assert "NUL" in messages[b.INVALID_VALUE]


def test_nul_in_a_description_rejects_that_series_only() -> None:
    d = decode(
        scalars(name="bad", description="a\x00b", values=[1.0]),
        scalars(name="good", description="tabs\tand\nnewlines are text", values=[1.0, 2.0]),
    )
    assert d.outcome.by_reason == {b.INVALID_VALUE: 1}
    assert "description" in d.outcome.examples[0][6]
    assert [c.name for c in d.chunks] == ["good"] and d.points == 2


@pytest.mark.parametrize("run_id", ["", "run\x00x", "run\n", "r" * 129, "../etc", "run\x7f"])
def test_a_run_id_that_cannot_exist_is_run_not_found_without_sql(run_id: str) -> None:
    d = decode(scalars(run_id=run_id, values=[1.0, 2.0]), scalars(values=[3.0]))
    assert d.outcome.by_reason == {b.RUN_NOT_FOUND: 2}
    assert [c.run_id for c in d.chunks] == ["run-1"]


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "x" * 256, ""])
def test_control_characters_and_length_in_names(name: str) -> None:
    d = decode(scalars(name=name, values=[1.0]))
    assert d.outcome.by_reason == {b.INVALID_NAME: 1} and d.chunks == []


@pytest.mark.parametrize(
    "labels",
    [{"k\n": "v"}, {"k": "v\x00"}, {"k": "v\n"}, {"k": "v" * 257}, {"1k": "v"}],
)
def test_label_keys_and_values(labels: dict[str, str]) -> None:
    d = decode(scalars(values=[1.0], labels=labels))
    assert d.outcome.by_reason == {b.INVALID_LABELS: 1} and d.chunks == []


def test_a_huge_label_map_is_not_copied_into_the_answer() -> None:
    d = decode(scalars(values=[1.0], labels={f"k{i}": "v" for i in range(5000)}))
    assert d.outcome.by_reason == {b.INVALID_LABELS: 1}
    assert len(d.outcome.examples[0][2]) <= b.MAX_EXAMPLE_LABELS


def test_series_and_points_past_the_batch_limits_are_rejected_undecoded() -> None:
    limits = Limits(max_series_per_batch=3, max_points_per_batch=5)
    d = decode_batch(
        "default",
        make_batch(
            scalars(name="a", values=[1.0, 2.0]),
            scalars(name="b", values=[1.0] * 4),  # 2 + 4 > 5
            scalars(name="c", values=[1.0] * 3),  # fits: 2 + 3
            scalars(name="d", values=[1.0]),  # the fourth series > 3
        ),
        1.7e9,
        limits,
    )
    assert [c.name for c in d.chunks] == ["a", "c"]
    assert d.outcome.by_reason == {b.LIMIT_EXCEEDED: 5}
    assert d.points == 5


def test_mismatched_lengths_are_checked_before_anything_is_copied() -> None:
    huge = data_pb2.ScalarColumns(values=[1.0], steps=list(range(10)))
    d = decode(pb.RunSeries(run_id="run-1", series=data_pb2.SeriesData(name="x", scalars=huge)))
    assert d.outcome.by_reason == {b.INVALID_VALUE: 1} and d.chunks == []
    assert "1 points but 10 steps" in d.outcome.examples[0][6]


def test_rejection_examples_are_clipped_and_bounded_in_bytes() -> None:
    name = "n" * 300  # over the name limit: rejected, and named in the answer
    run = "r" * 4_000_000
    series = [
        pb.RunSeries(
            run_id=run if i % 2 else "run-1",
            series=data_pb2.SeriesData(
                name=name,
                labels={"k": "v" * 4000},
                scalars=data_pb2.ScalarColumns(values=[1.0] * 3),
            ),
        )
        for i in range(100)
    ]
    d = decode(*series)
    assert d.outcome.rejected == 300
    total = 0
    for run_id, n, labels, _, _, _, message in d.outcome.examples:
        assert len(run_id) <= b.MAX_EXAMPLE_CHARS + 1 and len(n) <= b.MAX_EXAMPLE_CHARS + 1
        assert all(len(v) <= b.MAX_EXAMPLE_CHARS + 1 for v in labels.values())
        assert len(message) <= b.MAX_EXAMPLE_MESSAGE_CHARS + 1
        total += len(run_id) + len(n) + sum(map(len, labels.values())) + len(message)
    assert 0 < len(d.outcome.examples) <= b.MAX_REPORTED
    assert total <= b.MAX_EXAMPLE_BYTES


def test_examples_stop_at_the_byte_bound() -> None:
    outcome = b.Outcome()
    for _ in range(200):
        outcome.reject_series(
            "run-\u00e9" * 40, "ñ" * 200, {"k": "é" * 200}, 1, b.INVALID_NAME, "m" * 999
        )
    assert outcome.rejected == 200
    assert outcome.example_bytes <= b.MAX_EXAMPLE_BYTES
    assert len(outcome.examples) < b.MAX_REPORTED  # the bytes ran out first


# -- the string walker of unary requests -------------------------------------------


def _field_of(message: object) -> str:
    from ingest.core.checks import check_strings

    with pytest.raises(ApiError) as err:
        check_strings(message)  # type: ignore[arg-type]
    assert err.value.code == "INVALID_ARGUMENT"
    return err.value.field


def test_check_strings_names_the_field() -> None:
    from steplog.v1 import common_pb2, experiment_service_pb2, query_service_pb2, run_service_pb2

    assert _field_of(run_service_pb2.ListRunsRequest(run_type="a\x00b")) == "run_type"
    assert _field_of(query_service_pb2.GetMetricsRequest(names=["ok", "a\x00"])) == "names[1]"
    assert _field_of(query_service_pb2.ReadSeriesRequest(name="l\x00ss")) == "name"
    assert _field_of(query_service_pb2.ReadSeriesRequest(labels={"k": "v\x00"})) == "labels[k]"
    assert _field_of(run_service_pb2.RewindRunRequest(names=["x\ny"])) == "names[0]"
    assert _field_of(run_service_pb2.CreateRunRequest(properties={"a\x01": "v"})) == "properties"
    tags = [common_pb2.Tag(key="ok", value="v"), common_pb2.Tag(key="k", value="a\x00")]
    req = experiment_service_pb2.UpdateExperimentTagsRequest(set_tags=tags)
    assert _field_of(req) == "set_tags[1].value"
    err = run_service_pb2.UpdateRunStatusRequest(error=common_pb2.RunError(message="x\x00"))
    assert _field_of(err) == "error.message"
    assert _field_of(run_service_pb2.GetRunRequest(run_id="r" * 2000)) == "run_id"
    many = query_service_pb2.GetMetricsRequest(names=["a"] * 10_001)
    assert _field_of(many) == "names"


def test_check_strings_lets_free_text_hold_newlines() -> None:
    from ingest.core.checks import check_strings
    from steplog.v1 import common_pb2, run_service_pb2

    check_strings(
        run_service_pb2.CreateRunRequest(
            run_id="r-1",
            description="line one\nline two\ttabbed",
            display_name="ünïcode 🙂",
            properties={"k": "multi\nline"},
            tags=[common_pb2.Tag(key="note", value="a\nb")],
        )
    )
