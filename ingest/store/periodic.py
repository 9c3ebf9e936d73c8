"""The service's periodic background tasks (compaction, the writer retention
sweep, the blob sweep): one asyncio task each that runs a round every
`interval_s` seconds; a round that fails is logged by its owner and the next
one tries again; `close()` cancels the task and waits for it to end."""

from __future__ import annotations

import asyncio
import contextlib


class Periodic:
    """Subclasses set `name` and implement `round()` and `failed()`.

    `interval_s` <= 0: `start()` starts nothing. `sleep_first`: wait one
    interval before the first round (else the first round runs at once)."""

    name = "steplog-periodic"
    sleep_first = True

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def round(self) -> None:
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """A round raised `exc` (not a cancellation); the next round runs as planned."""
        raise NotImplementedError

    async def _loop(self) -> None:
        if self.sleep_first:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again
                self.failed(exc)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
