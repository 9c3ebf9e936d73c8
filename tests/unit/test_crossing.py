"""ingest.write.crossing: calls onto another thread's loop, in order, one
wake-up per burst."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from ingest.write.crossing import Crossing

WAIT = 10.0


def counting_wakes(loop: asyncio.AbstractEventLoop) -> list[int]:
    wakes = [0]
    real = loop.call_soon_threadsafe

    def spy(*args: Any, **kw: Any) -> Any:
        wakes[0] += 1
        return real(*args, **kw)

    loop.call_soon_threadsafe = spy  # type: ignore[method-assign]
    return wakes


def block(loop: asyncio.AbstractEventLoop) -> threading.Event:
    """Hold the loop busy until the returned event is set."""
    started, go = threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        go.wait(WAIT)

    loop.call_soon_threadsafe(blocker)
    assert started.wait(WAIT)
    return go


def test_a_burst_of_calls_wakes_the_loop_once_and_runs_them_in_order(
    loop: asyncio.AbstractEventLoop,
) -> None:
    go = block(loop)
    wakes = counting_wakes(loop)
    crossing = Crossing(loop)
    out: list[int] = []
    done = threading.Event()
    for i in range(1000):
        crossing.call(out.append, i)
    crossing.call(done.set)
    assert wakes[0] == 1  # not one per call
    go.set()
    assert done.wait(WAIT)
    assert out == list(range(1000))
    # Drained: the next call wakes the loop again, and runs.
    again = threading.Event()
    crossing.call(again.set)
    assert again.wait(WAIT)
    assert wakes[0] == 2


def test_a_failing_call_does_not_stop_the_ones_after_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    failures: list[Any] = []
    loop.set_exception_handler(lambda _loop, ctx: failures.append(ctx["exception"]))
    go = block(loop)
    crossing = Crossing(loop)
    done = threading.Event()

    def boom() -> None:
        raise ValueError("boom")

    crossing.call(boom)
    crossing.call(done.set)
    go.set()
    assert done.wait(WAIT)
    assert len(failures) == 1 and isinstance(failures[0], ValueError)


def test_calls_on_a_closed_loop_raise() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    crossing = Crossing(loop)
    with pytest.raises(RuntimeError):
        crossing.call(print)
    with pytest.raises(RuntimeError):
        crossing.call(print)  # not left "woken" by the failed call
