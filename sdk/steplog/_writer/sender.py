"""The writer's ONE background thread, `steplog-writer`: it drives every lane
(the main stream and the image stream) of one writer, or, for the streams of
`Run.new_stream` (`shared_sender()`, thread `steplog-writer-streams`), every
lane of every stream writer of the process: a stream is lanes, not a thread.

It sleeps on one Event that log calls (the first point after a quiet spell, a
full batch, the memory bound), flush/close and the transport's callbacks (an
acknowledgement, a stream's end) set, or until the earliest timer of any lane
(a flush interval, a reconnect after backoff, a spool retry). Each lane wakes
it through a `poker()` of its own, which also names the lane: a round runs
`tick()` of the lanes that were poked and of those whose timer is due (each
lane's `next_wake()` is asked again after its tick and kept), not of every
lane: a process with 50 `new_stream` handles has 100 lanes, and a round of
all of them on every acknowledgement and every first point after a batch cut
cost that thread more than cutting the batches did (bench/README.md, W2).
Every FULL_ROUND_S, and whenever the sender is woken without a lane named
(a lane added, a fork), the round takes every lane, as a safety net for a
change of a lane's state that asked nothing. Nothing in a round waits on
the network: a send only queues the request on the stream (gRPC's own
threads move it), an acknowledgement arrives as an event, and a lane whose
window is full (the image lane while the object store is down) simply has
nothing to do, so the other lane's batches keep flowing and being
acknowledged. The CPU work of a round (encoding rows, hashing an image,
cutting a batch) is bounded by the batch size, so one lane delays the other
by at most one batch's encoding.

Fairness: a round visits the lanes it takes in the order they were added,
and a lane's round only moves what it has (its buffered points, its window's
room), so a lane that cannot send (its window full behind a slow commit, its
stream down) costs the others nothing until an event or its timer.

A bug in one lane's round marks that lane failed (its waiters are released
and told) and the thread goes on with the others. A lane that has run its
last round (closed) is dropped from the list; the thread ends when no lane
is left and starts again for the next lane that has work (`start`).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from time import monotonic

from steplog import _lifecycle
from steplog._writer.lane import Lane

THREAD_NAME = "steplog-writer"
STREAMS_THREAD_NAME = f"{THREAD_NAME}-streams"
# The longest a lane waits for a round when nothing names it.
FULL_ROUND_S = 0.5


class Poke:
    """One lane's wake-up (Lane's and Buffers' `wake`): names the lane for
    the sender's next round, then sets the sender's Event. Before its lane
    is added (Sender.add binds it), it asks for a round of every lane."""

    __slots__ = ("lane", "sender")

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.lane: Lane | None = None

    def set(self) -> None:
        sender, lane = self.sender, self.lane
        if lane is None:
            sender.everyone = True
        else:
            sender.poked.append(lane)  # deque.append: atomic, no lock
        sender.wake.set()


class Sender:
    def __init__(self, name: str = THREAD_NAME) -> None:
        self.name = name
        self.wake = threading.Event()
        # Lanes named since the last round, and whether every lane is due.
        self.poked: deque[Lane] = deque()
        self.everyone = True
        self._lanes: list[Lane] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def poker(self) -> Poke:
        """A wake-up for a lane about to be made; `add` binds it to the lane
        given that same object as its `wake`."""
        return Poke(self)

    def add(self, lane: Lane) -> None:
        with self._lock:
            self._lanes.append(lane)
        poke = lane.wake
        if isinstance(poke, Poke) and poke.sender is self:
            poke.lane = lane
        self.everyone = True
        self.wake.set()

    def start(self) -> None:
        """Start the thread unless it runs (lazily: also in a forked child,
        and again after it ended with its last lane). A lane is added before
        it asks, and the thread ends only under the lock with no lane left,
        so a lane that asks is always served."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def join(self, timeout: float | None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def lanes(self) -> int:
        """How many lanes it drives (not yet finished)."""
        with self._lock:
            return sum(not lane.finished for lane in self._lanes)

    def _run(self) -> None:
        timers: dict[Lane, float | None] = {}  # each lane's next_wake after its last tick
        last_full = monotonic()
        while True:
            with self._lock:
                lanes = self._lanes = [lane for lane in self._lanes if not lane.finished]
                if not lanes:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
            wakes = [w for w in timers.values() if w is not None]
            wakes.append(last_full + FULL_ROUND_S)
            self.wake.wait(max(0.0, min(wakes) - monotonic()))
            self.wake.clear()
            now = monotonic()
            poked = self.poked
            named: set[Lane] = set()
            while poked:
                named.add(poked.popleft())
            if self.everyone or now >= last_full + FULL_ROUND_S:
                self.everyone = False
                last_full = now
                todo = lanes
            else:
                todo = [
                    lane
                    for lane in lanes
                    if lane in named or ((w := timers.get(lane, now)) is not None and w <= now)
                ]
            for lane in todo:
                try:
                    lane.tick()
                except BaseException as exc:  # a bug: never leave a logger or flush waiting
                    lane.fail(exc)
                    if not isinstance(exc, Exception):
                        raise
                timers[lane] = None if lane.finished else lane.next_wake()
            if len(timers) > len(lanes):
                alive = set(lanes)
                for lane in [x for x in timers if x not in alive]:
                    del timers[lane]

    def after_fork_in_child(self) -> None:
        """The parent's thread does not exist here: a new Event, no thread,
        no lanes (each writer adds its reset lanes again). Once per child:
        the shared sender's writers each call it, and only the first resets."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self.wake = threading.Event()
        self.poked = deque()
        self.everyone = True
        self._lock = threading.Lock()
        self._thread = None
        self._lanes = []


_shared: Sender | None = None
_shared_lock = threading.Lock()


def shared_sender() -> Sender:
    """The process's one sender for the streams of `Run.new_stream` (each a
    BatchWriter whose lanes it drives; steplog.client.Client.independent).
    A forked child keeps the object: its writers reset it (after_fork_in_child)."""
    global _shared
    sender = _shared
    if sender is None:
        with _shared_lock:
            if _shared is None:
                _shared = Sender(STREAMS_THREAD_NAME)
            sender = _shared
    return sender


def _reset_lock_after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()


_lifecycle.on_fork(_reset_lock_after_fork)
