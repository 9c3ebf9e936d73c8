"""The writer's ONE background thread, `steplog-writer`: it drives every lane
(the main stream and the image stream) of one writer.

It sleeps on one Event that log calls (the first point after a quiet spell, a
full batch, the memory bound), flush/close and the transport's callbacks (an
acknowledgement, a stream's end) set, or until the earliest timer of any lane
(a flush interval, a reconnect after backoff, a spool retry). Each round runs
every lane's `tick()` in turn. Nothing in a round waits on the network: a
send only queues the request on the stream (gRPC's own threads move it), an
acknowledgement arrives as an event, and a lane whose window is full (the
image lane while the object store is down) simply has nothing to do, so the
other lane's batches keep flowing and being acknowledged. The CPU work of a
round (encoding rows, hashing an image, cutting a batch) is bounded by the
batch size, so one lane delays the other by at most one batch's encoding.

A bug in one lane's round marks that lane failed (its waiters are released
and told) and the thread goes on with the others.
"""

from __future__ import annotations

import threading
from time import monotonic

from steplog._writer.lane import Lane

THREAD_NAME = "steplog-writer"


class Sender:
    def __init__(self) -> None:
        self.wake = threading.Event()
        self._lanes: list[Lane] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lane: Lane) -> None:
        with self._lock:
            self._lanes.append(lane)
        self.wake.set()

    def start(self) -> None:
        """Start the thread unless it runs (lazily: also in a forked child)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def join(self, timeout: float | None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                lanes = [lane for lane in self._lanes if not lane.finished]
            if not lanes:
                return
            wakes = [w for w in (lane.next_wake() for lane in lanes) if w is not None]
            timeout = None if not wakes else max(0.0, min(wakes) - monotonic())
            self.wake.wait(timeout)
            self.wake.clear()
            for lane in lanes:
                try:
                    lane.tick()
                except BaseException as exc:  # a bug: never leave a logger or flush waiting
                    lane.fail(exc)
                    if not isinstance(exc, Exception):
                        raise

    def after_fork_in_child(self) -> None:
        """The parent's thread does not exist here: a new Event, no thread,
        no lanes (the writer adds its reset lanes again)."""
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        self._lanes = []
