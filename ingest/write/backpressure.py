"""The bounds of the write pipeline's queues: bytes a decoded batch holds,
a byte budget served in arrival order, and `Overloaded` when a wait for
room would pass the caller's deadline."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from ingest.core.batch import DecodedBatch

# Memory a decoded chunk holds beyond its arrays (the object, its dicts,
# strings and array headers; measured at about 1.2 KiB with CPython 3.11).
CHUNK_OVERHEAD_BYTES = 1536
# What an acknowledgement needs once its batch is committed.
ACK_BYTES = 512


def batch_cost(batch: DecodedBatch) -> int:
    """The bytes a decoded batch holds in memory, estimated from above: its
    size on the wire (payloads may share the request's memory) plus its
    arrays, the copies kept for a retried transaction, and a fixed cost per
    chunk."""
    n = batch.nbytes
    for c in batch.chunks:
        n += CHUNK_OVERHEAD_BYTES + c.times.nbytes + 2 * (c.steps.nbytes + c.alive.nbytes)
        if c.values is not None:
            n += c.values.nbytes
        if c.texts is not None:
            n += 56 * len(c.texts) + sum(map(len, c.texts))
        if c.payload is not None:
            n += 64 * len(c.payload)
    return n


class Overloaded(Exception):
    """A bound stayed full for longer than the caller waits: the request is
    shed (RESOURCE_EXHAUSTED) with a hint of when to try again."""

    def __init__(self, message: str, bound: str = "queue", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.bound = bound
        self.retry_after = retry_after


class ByteBudget:
    """Bytes reserved against a limit. Waiters are served in arrival order,
    so a large request is not starved by small ones; a request larger than
    the whole limit passes when nothing else is reserved."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._on_change = on_change

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def _add(self, n: int) -> None:
        self.used += n
        if self._on_change is not None:
            self._on_change(n)

    async def acquire(self, n: int, wait: float | None = None) -> None:
        """Reserve n bytes, waiting for room; TimeoutError after `wait` seconds."""
        if not self._waiters and self._fits(n):
            self._add(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait({fut}, timeout=wait)
            if not done:
                raise TimeoutError(f"no room for {n} bytes within {wait} s")
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted in the same moment: give it back
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def force(self, n: int) -> None:
        """Count bytes that are already taken (no waiting)."""
        if n > 0:
            self._add(n)

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self._add(-min(n, self.used))
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._add(n)
            fut.set_result(None)
