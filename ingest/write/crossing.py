"""Calls handed to another thread's event loop, coalesced: one wake-up of
that loop (call_soon_threadsafe, a write to its self-pipe) for every burst of
calls, not one per call.

The write pipeline crosses between the service's loop and each worker's on
every batch: the batch to the worker's queue, its answer and its freed room
back. A self-pipe write releases the GIL, and under load getting it back
costs the writing loop up to a switch interval; with many small batches
(bench/README.md, W2) those wake-ups were a per-batch cost of the service.
Here a call is appended to a deque and the target loop is woken only when no
wake-up is pending; the woken callback runs every call queued by then, in
order. Calls from one thread run in the order they were made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any


class Crossing:
    """fn(*args) on `loop`, from any thread, in order, one wake per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._woken = False

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) for the loop. RuntimeError if the loop is closed."""
        self._calls.append((fn, args))
        if not self._woken:
            self._woken = True
            try:
                self.loop.call_soon_threadsafe(self._run)
            except BaseException:
                self._woken = False
                raise

    def _run(self) -> None:
        # Reset before draining: a call queued from now on wakes the loop
        # again (at worst once for nothing); none is left behind.
        self._woken = False
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception as exc:  # as the loop does for a failing callback
                with contextlib.suppress(Exception):
                    self.loop.call_exception_handler(
                        {"message": f"crossing callback {fn!r} failed", "exception": exc}
                    )
