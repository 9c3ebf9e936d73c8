"""Property-based tests (Hypothesis) of decode, validate and order: whatever
a client sends, the pure core answers with ApiError or a partial-success
outcome whose counts add up, keeps only storable points, stays within its
memory bound, and orders steps by the documented rules.

Kept fast (a few dozen examples each, a deadline) because they run in
`make test`; the integration fuzz test sends the same kind of input to a
real service.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import struct
import tracemalloc
import zlib
from datetime import timedelta
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.core import batch as b
from ingest.core import order
from ingest.core.checks import CONTROL
from ingest.core.decode import decode_batch
from ingest.core.errors import ApiError
from ingest.core.histograms import HistogramBlock
from ingest.core.validate import MAX_TIME, MIN_TIME, Limits
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

SETTINGS = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Small limits, so the examples reach them.
LIMITS = Limits(
    max_labels=4,
    max_text_value_chars=32,
    max_table_columns=4,
    max_table_rows=64,
    max_evaluation_bytes=4096,
    max_image_bytes=4096,
    max_series_per_batch=6,
    max_points_per_batch=300,
)


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PNG = _png()
CONFUSION = json.dumps(
    {
        "schema_type": "confusion_matrix",
        "schema_version": "1.0.0",
        "data": {"class_labels": ["a", "b"], "matrix": [[1, 0], [0, 2]]},
    }
)

# -- strategies ------------------------------------------------------------------------

nasty_text = st.text(
    alphabet=st.characters(codec="utf-8", categories=None, exclude_characters=None),
    max_size=40,
)
texts = st.one_of(
    st.sampled_from(["", "ok", "a\x00b", "tab\t", "line\n", "ü🙂", "x" * 300]), nasty_text
)


def mostly(good: Any, bad: Any) -> Any:
    """good about four times in five, so examples get past the first check
    (one_of would pick either branch half the time)."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: good if ok else bad)


run_ids = mostly(
    st.sampled_from(["run-1", "run-2"]), st.one_of(st.sampled_from(["", "r\x00", "r\n"]), texts)
)
names = mostly(st.sampled_from(["loss", "acc", "ü🙂"]), texts)
labels = mostly(
    st.one_of(st.just({}), st.just({"rank": "3"})),
    st.dictionaries(
        st.one_of(st.sampled_from(["rank", "split", "1bad", "k\n"]), texts), texts, max_size=6
    ),
)
int64s = mostly(
    st.integers(0, 100),
    st.one_of(
        st.sampled_from([INT64_MAX, INT64_MAX - 1, INT64_MIN, -1]),
        st.integers(INT64_MIN, INT64_MAX),
    ),
)
floats = st.floats(allow_nan=True, allow_infinity=True)
times = mostly(st.floats(0, 7e9), st.one_of(st.just(1.7e9), floats))


def lists(elements: Any, max_size: int = 12) -> Any:
    return st.lists(elements, max_size=max_size)


@st.composite
def scalar_columns(draw: Any) -> data_pb2.ScalarColumns:
    n = draw(st.integers(0, 12))
    sized = st.sampled_from([0, n, n, n, max(0, n - 1), n + 1])
    cols = data_pb2.ScalarColumns(
        steps=draw(st.lists(int64s, min_size=draw(sized), max_size=n + 1)),
        times=draw(st.lists(times, min_size=draw(sized), max_size=n + 1)),
    )
    kind = draw(st.sampled_from(["num", "text", "both"]))
    if kind in ("num", "both"):
        cols.values.extend(draw(st.lists(floats, min_size=n, max_size=n)))
    if kind in ("text", "both"):
        cols.text_values.extend(draw(st.lists(texts, min_size=n, max_size=n)))
    return cols


@st.composite
def table_columns(draw: Any) -> data_pb2.TableColumns:
    n = draw(st.integers(0, 10))
    row_count = draw(st.one_of(st.just(n), st.integers(-(2**31), 2**31 - 1)))
    table = data_pb2.TableColumns(row_count=row_count)
    if draw(st.booleans()):
        table.times.extend(draw(st.lists(times, min_size=n, max_size=n)))
    if draw(st.booleans()):
        table.steps.extend(draw(st.lists(int64s, min_size=n, max_size=n)))
    for _ in range(draw(st.integers(0, 6))):
        col = table.columns.add(
            name=draw(st.one_of(st.sampled_from(["x", "y", "s"]), texts)),
            type=draw(st.integers(0, 5)),  # 0 and 5 are not types
        )
        m = draw(st.sampled_from([n, n, max(0, n - 1), n + 1]))
        which = draw(st.sampled_from(["doubles", "ints", "strings", "bools"]))
        if which == "doubles":
            col.doubles.extend(draw(st.lists(floats, min_size=m, max_size=m)))
        elif which == "ints":
            col.ints.extend(draw(st.lists(int64s, min_size=m, max_size=m)))
        elif which == "strings":
            col.strings.extend(draw(st.lists(texts, min_size=m, max_size=m)))
        else:
            col.bools.extend(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
        if draw(st.booleans()):
            col.present.extend(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
    return table


@st.composite
def image_points(draw: Any) -> data_pb2.ImagePoints:
    n = draw(st.integers(0, 5))
    points = data_pb2.ImagePoints(steps=draw(lists(int64s, n)))
    for _ in range(n):
        data = draw(st.one_of(st.just(PNG), st.binary(max_size=64), st.just(PNG[:-3])))
        points.images.add(
            data=data,
            content_type=draw(st.sampled_from(["", "image/png", "image/gif", "a\x00"])),
            width=draw(st.sampled_from([0, 1, 2])),
            sha256=draw(st.sampled_from(["", "00" * 32, "zz"])),
        )
    return points


@st.composite
def evaluation_points(draw: Any) -> data_pb2.EvaluationPoints:
    n = draw(st.integers(0, 5))
    docs = st.one_of(st.just(CONFUSION), texts, st.just('{"a": "\\u0000"}'), st.just("[" * 5000))
    return data_pb2.EvaluationPoints(
        steps=draw(lists(int64s, n)), documents=draw(st.lists(docs, min_size=n, max_size=n))
    )


@st.composite
def histogram_points(draw: Any) -> data_pb2.HistogramPoints:
    n = draw(st.integers(0, 4))
    bins = draw(lists(mostly(st.integers(1, 4), st.sampled_from([0, 2**32 - 1])), n))
    bins = (bins + [1] * n)[:n]
    total = sum(bins)
    if total <= 64 and draw(mostly(st.just(True), st.just(False))):
        n_edges = total + n
    else:  # columns that (most likely) do not fit together
        total, n_edges = draw(st.integers(0, 8)), draw(st.integers(0, 12))
    edges = draw(st.lists(mostly(st.floats(-1e6, 1e6), floats), min_size=n_edges, max_size=n_edges))
    if draw(st.booleans()):
        edges.sort()
    extra = draw(st.sampled_from([0, n, n, n + 1]))
    return data_pb2.HistogramPoints(
        steps=draw(mostly(st.just(list(range(n))), lists(int64s))),
        bins=bins,
        edges=edges,
        counts=draw(st.lists(mostly(st.floats(0, 1e6), floats), min_size=total, max_size=total)),
        nan_count=draw(st.lists(floats, min_size=extra, max_size=extra)),
    )


@st.composite
def run_series(draw: Any) -> pb.RunSeries:
    series = data_pb2.SeriesData(
        name=draw(names),
        labels=draw(labels),
        description=draw(mostly(st.just(""), texts)),
        step_policy=draw(st.sampled_from([0, 1, 2, 9])),  # 9: an unknown policy
    )
    kind = draw(
        st.sampled_from(
            ["scalars", "scalars", "table", "images", "evaluations", "histograms", "none"]
        )
    )
    if kind == "scalars":
        series.scalars.CopyFrom(draw(scalar_columns()))
    elif kind == "table":
        series.table.CopyFrom(draw(table_columns()))
    elif kind == "images":
        series.images.CopyFrom(draw(image_points()))
    elif kind == "evaluations":
        series.evaluations.CopyFrom(draw(evaluation_points()))
    elif kind == "histograms":
        series.histograms.CopyFrom(draw(histogram_points()))
    return pb.RunSeries(run_id=draw(run_ids), series=series)


batches = st.builds(
    pb.Batch,
    # Whole-batch fields are mostly valid: the interesting part is per series.
    writer_id=mostly(st.just("w-1"), texts),
    sequence=mostly(st.sampled_from([1, 7]), st.integers(0, 2**64 - 1)),
    series=st.lists(run_series(), max_size=9),
    sent_time=floats,
)


def claimed(batch: pb.Batch) -> int:
    """What the batch says it holds: the points decode must account for."""
    total = 0
    for rs in batch.series:
        which = rs.series.WhichOneof("points")
        if which == "scalars":
            total += max(len(rs.series.scalars.values), len(rs.series.scalars.text_values))
        elif which == "table":
            total += max(rs.series.table.row_count, 0)
        elif which == "images":
            total += len(rs.series.images.images)
        elif which == "evaluations":
            total += len(rs.series.evaluations.documents)
        elif which == "histograms":
            total += len(rs.series.histograms.bins)
    return total


def decode_measured(batch: pb.Batch, limits: Limits = LIMITS) -> tuple[b.DecodedBatch, int]:
    """Decode `batch` and the peak of what that allocated. The first decode of
    a kind imports and initialises what it needs once per process (Pillow's
    plugins, numpy's submodules: about 2 MB); that is not the batch's cost, so
    the batch is decoded once untraced first."""
    with contextlib.suppress(ApiError):
        decode_batch("default", batch, 1.7e9, limits, batch.ByteSize())
    tracemalloc.start()
    try:
        decoded = decode_batch("default", batch, 1.7e9, limits, batch.ByteSize())
        return decoded, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- decode and validate ---------------------------------------------------------------


@SETTINGS
@given(batches)
def test_decode_accounts_for_every_point_and_keeps_only_storable_ones(batch: pb.Batch) -> None:
    try:
        decoded, peak = decode_measured(batch)
    except ApiError as exc:
        assert exc.code == "INVALID_ARGUMENT" and exc.field.startswith("batch.")
        return
    outcome = decoded.outcome
    alive = sum(int(c.alive.sum()) for c in decoded.chunks)
    # Every point is either alive or rejected with a reason; nothing vanishes.
    assert outcome.accepted == outcome.duplicates == 0
    assert alive + outcome.rejected == claimed(batch)
    assert sum(outcome.by_reason.values()) == outcome.rejected
    assert all(n > 0 for n in outcome.by_reason.values())
    assert set(outcome.by_reason) <= set(b.REASON_NAMES)
    assert decoded.points == sum(len(c) for c in decoded.chunks)
    assert decoded.points <= LIMITS.max_points_per_batch
    # The answer is bounded whatever the names, labels and messages were.
    assert len(outcome.examples) <= b.MAX_REPORTED
    assert outcome.example_bytes <= b.MAX_EXAMPLE_BYTES
    for run_id, name, lab, _, _, reason, message in outcome.examples:
        assert reason in b.REASON_NAMES and message
        assert len(run_id) <= b.MAX_EXAMPLE_CHARS + 1 and len(name) <= b.MAX_EXAMPLE_CHARS + 1
        assert len(lab) <= b.MAX_EXAMPLE_LABELS
    # What is alive can be stored: valid identity, no NUL, steps and times in range.
    for c in decoded.chunks:
        if not c.alive.any():
            continue
        assert c.name and len(c.name) <= 255 and not CONTROL.search(c.name)
        assert c.run_id and not CONTROL.search(c.run_id) and len(c.run_id) <= 128
        assert "\x00" not in c.description
        assert len(c.labels) <= LIMITS.max_labels
        assert all(not CONTROL.search(k + v) for k, v in c.labels.items())
        live = np.flatnonzero(c.alive)
        if c.stepped:
            assert (c.steps[live] >= 0).all()
        assert ((c.times[live] >= MIN_TIME) & (c.times[live] <= MAX_TIME)).all()
        if c.kind == b.KIND_SCALAR and c.texts is not None:
            for i in live:
                assert "\x00" not in c.texts[i] and len(c.texts[i]) <= LIMITS.max_text_value_chars
        if c.kind == b.KIND_TABLE:
            assert len(c) <= LIMITS.max_table_rows
        if c.kind == b.KIND_HISTOGRAM:
            block = c.payload[0] if c.payload else None
            assert isinstance(block, HistogramBlock)
            for i in live:
                edges, counts = block.point(int(i))
                assert 1 <= counts.size <= LIMITS.max_histogram_bins
                assert np.isfinite(edges).all() and (edges[1:] > edges[:-1]).all()
                assert np.isfinite(counts).all() and (counts >= 0).all()
                assert np.isfinite(block.nan_count[i]) and block.nan_count[i] >= 0
    # Memory: a small multiple of the wire size, whatever the counts claimed.
    wire = batch.ByteSize()
    assert peak <= 64 * wire + 2048 * len(batch.series) + 512 * 1024, (peak, wire)


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_a_decode_error_or_a_batch_decode_can_answer(data: bytes) -> None:
    try:
        request = pb.IngestRequest.FromString(data)
    except DecodeError:
        return
    try:
        decoded, peak = decode_measured(request.batch)
    except ApiError as exc:
        assert exc.code == "INVALID_ARGUMENT"
        return
    assert peak <= 64 * len(data) + 512 * 1024
    alive = sum(int(c.alive.sum()) for c in decoded.chunks)
    assert alive + decoded.outcome.rejected == claimed(request.batch)


@SETTINGS
@given(
    st.integers(1, 2**31 - 1), st.sampled_from(["table", "scalars_steps", "labels", "histogram"])
)
def test_huge_claims_in_tiny_messages_allocate_nothing(count: int, shape: str) -> None:
    if shape == "table":
        series = data_pb2.SeriesData(name="t", table=data_pb2.TableColumns(row_count=count))
    elif shape == "histogram":
        series = data_pb2.SeriesData(
            name="h", histograms=data_pb2.HistogramPoints(bins=[count, count], edges=[0, 1])
        )
    elif shape == "scalars_steps":
        series = data_pb2.SeriesData(
            name="s", scalars=data_pb2.ScalarColumns(values=[1.0], steps=[0] * min(count, 50))
        )
    else:
        series = data_pb2.SeriesData(
            name="s",
            labels={f"k{i}": "v" for i in range(min(count, 200))},
            scalars=data_pb2.ScalarColumns(values=[1.0]),
        )
    batch = pb.Batch(writer_id="w", sequence=1, series=[pb.RunSeries(run_id="r", series=series)])
    decoded, peak = decode_measured(batch, Limits())
    assert peak <= 64 * batch.ByteSize() + 64 * 1024
    alive = sum(int(c.alive.sum()) for c in decoded.chunks)
    assert alive + decoded.outcome.rejected == claimed(batch)


# -- order -----------------------------------------------------------------------------

step_values = st.one_of(
    st.integers(0, 20), st.sampled_from([INT64_MAX, INT64_MAX - 1, 2**53, 2**53 + 1])
)
value_strategy = st.one_of(st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf]), floats)


def _chunk(steps: list[int], values: list[Any], stepped: bool, text: bool) -> b.Chunk:
    n = len(values)
    return b.Chunk(
        run_id="run-1",
        name="loss",
        labels={},
        labels_key="",
        kind=b.KIND_SCALAR,
        value_type=b.VALUE_TEXT if text else b.VALUE_NUMERIC,
        stepped=stepped,
        out_of_order=None,
        description="",
        steps=np.array(steps if stepped else [0] * n, dtype=np.int64),
        times=np.full(n, 1.7e9),
        values=None if text else np.array(values, dtype=np.float64),
        texts=[str(v) for v in values] if text else None,
    )


def _same(a: Any, c: Any) -> bool:
    if isinstance(a, float) and isinstance(c, float):
        return a == c or (math.isnan(a) and math.isnan(c))
    return bool(a == c)


@st.composite
def chunk_lists(draw: Any) -> tuple[list[list[tuple[int, Any]]], bool]:
    text = draw(st.booleans())
    values = st.sampled_from(["a", "b", ""]) if text else value_strategy
    chunks = draw(
        st.lists(st.lists(st.tuples(step_values, values), min_size=1, max_size=12), max_size=5)
    )
    return chunks, text


@SETTINGS
@given(chunk_lists())
def test_strict_order_matches_a_point_by_point_reference(case: Any) -> None:
    """apply() agrees with the rules read literally, one point at a time:
    accepted steps strictly increase, an exact repeat of the last accepted
    point is a duplicate (not stored), anything else is rejected."""
    chunks, text = case
    state = order.SeriesState(1, b.KIND_SCALAR, b.VALUE_TEXT if text else 0, True, False)
    last: int | None = None
    last_value: Any = None
    stored: list[int] = []
    for points in chunks:
        chunk = _chunk(
            [s for s, _ in points], [str(v) if text else v for _, v in points], True, text
        )
        outcome = b.Outcome()
        got = order.apply(chunk, state, outcome)
        want_accepted: list[int] = []
        want_dup = want_conflict = want_smaller = 0
        for i, (step, value) in enumerate(points):
            v = str(value) if text else float(value)
            if last is None or step > last:
                want_accepted.append(i)
                last, last_value = step, v
            elif step == last and _same(last_value, v):
                want_dup += 1
            elif step == last:
                want_conflict += 1
            else:
                want_smaller += 1
        accepted = [] if got is None else got.index.tolist()
        assert accepted == want_accepted
        assert outcome.accepted == len(accepted) and outcome.duplicates == want_dup
        assert outcome.by_reason.get(b.STEP_CONFLICT, 0) == want_conflict
        assert outcome.by_reason.get(b.STEP_NOT_INCREASING, 0) == want_smaller
        assert outcome.accepted + outcome.duplicates + outcome.rejected == len(points)
        stored.extend(int(chunk.steps[i]) for i in accepted)
        assert state.last_step == last
    assert all(a < c for a, c in itertools.pairwise(stored))
    assert state.point_count == len(stored)


@SETTINGS
@given(chunk_lists(), st.integers(0, 50))
def test_out_of_order_keeps_the_last_write_per_step(case: Any, start: int) -> None:
    chunks, text = case
    state = order.SeriesState(1, b.KIND_SCALAR, b.VALUE_TEXT if text else 0, True, True, start)
    for points in chunks:
        chunk = _chunk([s for s, _ in points], [v for _, v in points], True, text)
        outcome = b.Outcome()
        got = order.apply(chunk, state, outcome)
        assert got is not None and outcome.accepted == len(points) and outcome.rejected == 0
        index = got.index.tolist()
        steps = [s for s, _ in points]
        # One stored point per distinct step: its last write in the chunk.
        assert sorted(steps[i] for i in index) == sorted(set(steps))
        for i in index:
            assert steps[i] not in steps[i + 1 :]
        assert got.supersede is not None and sorted(got.supersede.tolist()) == sorted(set(steps))
        assert state.last_step is not None and state.last_step >= max([*steps, start])


@SETTINGS
@given(st.lists(st.integers(1, 12), max_size=6), st.one_of(st.none(), st.integers(0, 10**6)))
def test_unstepped_points_get_consecutive_indices(sizes: list[int], last: int | None) -> None:
    state = order.SeriesState(1, b.KIND_SCALAR, 0, False, False, last)
    expected = 0 if last is None else last + 1
    for n in sizes:
        chunk = _chunk([], [1.0] * n, False, False)
        outcome = b.Outcome()
        got = order.apply(chunk, state, outcome)
        assert got is not None and outcome.accepted == n
        assert chunk.steps.tolist() == list(range(expected, expected + n))
        expected += n
    assert state.last_step == (expected - 1 if sizes else last)


@SETTINGS
@given(chunk_lists(), st.booleans())
def test_a_mismatched_kind_or_step_mode_rejects_every_point(case: Any, kind: bool) -> None:
    chunks, text = case
    for points in chunks:
        if kind:
            state = order.SeriesState(1, b.KIND_TABLE, 0, True, False)
            reason = b.KIND_MISMATCH
        else:
            state = order.SeriesState(1, b.KIND_SCALAR, b.VALUE_TEXT if text else 0, False, False)
            reason = b.STEP_MODE_MISMATCH
        chunk = _chunk([s for s, _ in points], [v for _, v in points], True, text)
        outcome = b.Outcome()
        assert order.apply(chunk, state, outcome) is None
        assert outcome.by_reason == {reason: len(points)} and not chunk.alive.any()


@SETTINGS
@given(batches)
def test_decoded_batches_through_order_account_for_every_point(batch: pb.Batch) -> None:
    """decode -> validate -> order, with a fresh state per series: accepted,
    duplicates and rejected add up to what the batch claimed."""
    try:
        decoded = decode_batch("default", batch, 1.7e9, LIMITS)
    except ApiError:
        return
    states: dict[tuple[str, str, str], order.SeriesState] = {}
    for c in decoded.chunks:
        if not c.alive.any():
            continue
        state = states.setdefault(
            c.key,
            order.SeriesState(
                len(states) + 1, c.kind, c.value_type, c.stepped, bool(c.out_of_order)
            ),
        )
        order.apply(c, state, decoded.outcome)
    o = decoded.outcome
    assert o.accepted + o.duplicates + o.rejected == claimed(batch)
