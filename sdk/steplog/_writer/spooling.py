"""The lane's glue to its spool file (steplog._writer.spool): opened lazily,
every batch stamped with the (writer id, sequence) it has on the wire, and a
failing disk retried after a backoff instead of on every round. Called on the
sender thread only; counters are updated under the lane's lock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any

from steplog._writer.ledger import Entry, Ledger
from steplog._writer.outcomes import DeliveryWarning, Outcomes
from steplog._writer.settings import WriterSettings
from steplog._writer.spool import SpoolRef, SpoolWriter
from steplog._writer.transport import Backoff


class SpoolGlue:
    def __init__(
        self,
        settings: WriterSettings,
        ledger: Ledger,
        outcomes: Outcomes,
        lock: threading.Lock,
        news: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._out = outcomes
        self._lock = lock
        self._news = news
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.spool: SpoolWriter | None = None
        self.retry_at = 0.0

    def healthy(self) -> bool:
        """Not in the backoff after a failed write."""
        return monotonic() >= self.retry_at

    def writer(self) -> SpoolWriter:
        if self.spool is None:
            directory = self._settings.resolved_spool_dir()
            self.spool = SpoolWriter(directory, self._ledger.base_id, keep=self._settings.offline)
        return self.spool

    def attempt(self, action: Callable[[], Any]) -> bool:
        try:
            action()
        except OSError as exc:
            self.failed(exc)
            return False
        return True

    def sync(self) -> None:
        if self.spool is not None:
            self.attempt(self.spool.sync)

    def failed(self, exc: OSError) -> None:
        self.retry_at = monotonic() + self._backoff.next_delay()
        with self._lock:
            self._out.last_error = f"spool: {exc}"
            self._out.note_once(
                ("spool", exc.errno),
                DeliveryWarning,
                f"steplog: cannot write the spool ({exc}); data stays in memory and is retried",
            )
            self._news()

    def put(self, entry: Entry) -> bool:
        """Write one in-memory batch to the spool (stamped as it will be sent)."""
        if entry.ref is not None:
            return True
        assert entry.request is not None
        writer_id, sequence = self._ledger.stamp(entry)
        try:
            entry.ref = self.writer().append(
                entry.request.SerializeToString(), writer_id, sequence, entry.points
            )
        except OSError as exc:
            self.failed(exc)
            return False
        self._backoff.reset()
        with self._lock:
            self._out.spooled += entry.points
        return True

    def save(self, entries: Sequence[Entry]) -> list[Entry]:
        """Spool batches that cannot be delivered now; fsync. Those saved."""
        saved: list[Entry] = []
        for e in entries:
            if e.ref is None and e.request is None:
                continue
            if not self.put(e):
                break
            saved.append(e)
        if saved:
            self.sync()
        return saved

    def restamp(self, ref: SpoolRef, writer_id: str, sequence: int) -> None:
        """The copy on disk says what is on the wire (a new writer id)."""
        if self.spool is not None:
            try:
                self.spool.restamp(ref, writer_id, sequence)
            except OSError as exc:
                self.failed(exc)

    def read(self, ref: SpoolRef) -> bytes | None:
        assert self.spool is not None
        try:
            return self.spool.read(ref)
        except OSError as exc:
            self.failed(exc)
            return None

    def release(self, ref: SpoolRef) -> None:
        if self.spool is not None:
            self.spool.release(ref)
