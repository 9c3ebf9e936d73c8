"""The writer's wire encoding (sdk/steplog/_writer/wire.py) without a
service: the vectorised packed varints against protobuf's own encoder, at
every varint width, across width boundaries, in order and not, negative."""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from steplog._writer import wire
from steplog.v1 import data_pb2


def _protobuf_payload(steps: list[int]) -> bytes:
    """The payload of ScalarColumns.steps as protobuf itself encodes it."""
    raw = data_pb2.ScalarColumns(steps=steps).SerializeToString()
    # tag (1 byte: field 1, wire type 2), then the payload's length varint
    at = 1
    while raw[at] & 0x80:
        at += 1
    return raw[at + 1 :]


@pytest.mark.parametrize("width", range(1, 11))
def test_each_varint_width_encodes_as_protobuf_does(width: int) -> None:
    lo = 0 if width == 1 else 1 << (7 * (width - 1))
    hi = (1 << (7 * width)) - 1 if width < 10 else (1 << 63) - 1
    values = [lo, lo + 1, (lo + hi) // 2, hi - 1, hi] if width < 10 else [-1, -(1 << 63), 5]
    assert wire.packed_varints(array("q", values)) == _protobuf_payload(values)


def test_steps_in_order_across_width_boundaries() -> None:
    for first, n in ((0, 200), (16000, 1000), (120, 2**22), ((1 << 56) - 3, 3), ((1 << 56), 3)):
        steps = list(range(first, first + n, max(1, n // 5000)))
        assert wire.packed_varints(array("q", steps)) == _protobuf_payload(steps)


def test_steps_in_any_order_and_numpy_columns() -> None:
    rng = np.random.default_rng(5)
    for k in range(300):
        steps = rng.integers(0, 2 ** int(rng.integers(1, 63)), size=int(rng.integers(1, 60)))
        if k % 2:
            steps.sort()
        if k % 7 == 0:
            steps[0] = -int(steps[0]) - 1
        assert wire.packed_varints(steps.astype(np.int64)) == _protobuf_payload(steps.tolist())
    assert wire.packed_varints(array("q")) == b""


def test_scalar_columns_are_the_message_protobuf_would_write() -> None:
    steps = array("q", range(16380, 16390))
    times = array("d", [1.5] * 10)
    values = array("d", [0.5, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324] + [1.0] * 4)
    raw = wire.scalar_columns(steps, times, values)
    want = data_pb2.ScalarColumns(steps=steps, times=times, values=values).SerializeToString()
    assert raw == want
    # The columns can change once encoded (the views on them are released).
    values.append(2.0)
    assert wire.scalar_columns(array("q"), times, None) == (
        data_pb2.ScalarColumns(times=times).SerializeToString()
    )
