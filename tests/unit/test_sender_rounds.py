"""The sender's rounds take the lanes that asked (a poke naming the lane) or
whose timer is due, not every lane (steplog._writer.sender)."""

from __future__ import annotations

import threading
import time
from typing import Any

from steplog._writer import sender as sender_mod
from steplog._writer.sender import Poke, Sender


class FakeLane:
    """What the sender uses of a Lane: wake, tick, next_wake, finished, fail."""

    def __init__(self, sender: Sender, wake_at: float | None = None) -> None:
        self.wake: Any = sender.poker()
        self.finished = False
        self.ticks = 0
        self.wake_at = wake_at
        self.ticked = threading.Event()

    def tick(self) -> None:
        self.ticks += 1
        self.ticked.set()

    def next_wake(self) -> float | None:
        w, self.wake_at = self.wake_at, None  # one timer, then none
        return w

    def fail(self, exc: BaseException) -> None:
        raise AssertionError(exc)


def settle(lanes: list[FakeLane]) -> None:
    """Wait for the first full round (every lane once), then reset counts."""
    deadline = time.monotonic() + 5
    while any(x.ticks == 0 for x in lanes):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    for x in lanes:
        x.ticks = 0
        x.ticked.clear()


def test_a_poke_ticks_its_lane_alone(monkeypatch: Any) -> None:
    monkeypatch.setattr(sender_mod, "FULL_ROUND_S", 30.0)
    s = Sender("test-sender")
    lanes = [FakeLane(s) for _ in range(50)]
    for x in lanes:
        s.add(x)  # type: ignore[arg-type]
    assert all(isinstance(x.wake, Poke) and x.wake.lane is x for x in lanes)
    s.start()
    try:
        settle(lanes)
        for _ in range(5):
            lanes[7].wake.set()
            assert lanes[7].ticked.wait(5)
            lanes[7].ticked.clear()
            time.sleep(0.02)
        assert lanes[7].ticks >= 1
        # Without the rule every poke would tick all 50 lanes.
        assert sum(x.ticks for i, x in enumerate(lanes) if i != 7) == 0
    finally:
        for x in lanes:
            x.finished = True
        s.wake.set()
        s.join(5)


def test_a_due_timer_ticks_its_lane_and_a_full_round_comes_anyway(monkeypatch: Any) -> None:
    monkeypatch.setattr(sender_mod, "FULL_ROUND_S", 0.3)
    s = Sender("test-sender")
    timed = FakeLane(s)
    idle = FakeLane(s)
    for x in (timed, idle):
        s.add(x)  # type: ignore[arg-type]
    s.start()
    try:
        settle([timed, idle])
        timed.wake_at = time.monotonic() + 0.1  # read after its next tick
        timed.wake.set()
        assert timed.ticked.wait(5)
        timed.ticked.clear()
        assert timed.ticked.wait(0.25)  # its timer, before any full round
        # The idle lane asked nothing and has no timer: only the full round
        # (FULL_ROUND_S) takes it.
        assert idle.ticked.wait(2)
    finally:
        for x in (timed, idle):
            x.finished = True
        s.wake.set()
        s.join(5)


def test_a_poke_before_its_lane_is_added_asks_for_every_lane() -> None:
    s = Sender("test-sender")
    p = s.poker()
    s.everyone = False
    p.set()
    assert s.everyone and s.wake.is_set() and not s.poked
