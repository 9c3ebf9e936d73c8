"""A numeric series' open chunk (steplog._writer.series.NumericBuffer): it
grows while a burst fills it, and shrinks back once the series is quiet, so
the unwritten slots the memory bound does not count stay small."""

from __future__ import annotations

from itertools import pairwise

from steplog._writer.series import _CHUNK_MAX, _CHUNK_MIN, NumericBuffer


def _drain(buf: NumericBuffer) -> list[float]:
    out: list[float] = []
    while buf.pending():
        piece, k, _ = buf.take(10**9, 10**12, True)
        assert piece is not None and k > 0
        for part in piece.values:
            out.extend(part)
    return out


def test_a_burst_grows_the_chunk_and_quiet_flushes_shrink_it_back() -> None:
    buf = NumericBuffer(None, "run", "loss", (), stepped=True)
    assert buf.cap == _CHUNK_MIN
    for i in range(3 * _CHUNK_MAX):  # a burst before the sender takes anything
        buf.add(float(i), i, 0.0)
    assert buf.cap == _CHUNK_MAX
    assert _drain(buf) == [float(i) for i in range(3 * _CHUNK_MAX)]
    caps = []
    step = 3 * _CHUNK_MAX
    for _ in range(8):  # quiet: three points between two takes
        for _ in range(3):
            buf.add(float(step), step, 0.0)
            step += 1
        assert _drain(buf) == [float(s) for s in range(step - 3, step)]
        caps.append(buf.cap)
    # Halved at each quiet take, down to the smallest chunk.
    assert caps[0] <= _CHUNK_MAX // 2 and caps[-1] == _CHUNK_MIN
    assert all(b == max(_CHUNK_MIN, a // 2) for a, b in pairwise(caps))


def test_a_steady_stream_keeps_its_chunk() -> None:
    buf = NumericBuffer(None, "run", "loss", (), stepped=True)
    for i in range(_CHUNK_MAX):
        buf.add(float(i), i, 0.0)
    _drain(buf)
    cap = buf.cap
    for k in range(5):  # a third of the chunk between two takes: no shrinking
        for i in range(cap // 3):
            buf.add(1.0, _CHUNK_MAX + k * cap + i, 0.0)
        _drain(buf)
        assert buf.cap == cap
