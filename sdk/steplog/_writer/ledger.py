"""The acknowledgement ledger of one stream: pure bookkeeping, no threads, no
I/O, no grpc (unit-tested alone in tests/unit/test_writer_ledger.py).

Every batch gets an ordinal when it is formed (1, 2, ... for the writer's
lifetime). On the wire it is `(writer_id, ordinal - epoch_base)`: the
service requires contiguous sequence numbers per writer id, so when a batch
is refused or a gap cannot be filled the ledger moves to a new writer id
(`<base>.r<n>`) whose sequence 1 is the next ordinal (`new_id`). The ledger
keeps the batches in flight (sent, not acknowledged) in ordinal order, their
bytes against the window, and which ordinals are finished (acknowledged,
written offline, or lost): `done_through` is the highest ordinal at and
below which every batch is finished, which is what flush() waits for.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from steplog._writer.spool import SpoolRef
from steplog.v1 import ingest_service_pb2 as pb

# At most this many batches in flight, whatever their size.
MAX_INFLIGHT_BATCHES = 32
# Ordinals resolved without an ack, remembered so flush() can tell.
_LOST_KEPT = 100_000


@dataclass(slots=True, eq=False)
class Entry:
    """One sequenced batch: in memory (`request`), on disk (`ref`), or both."""

    ordinal: int
    points: int
    nbytes: int  # what it holds in memory while `request` is set
    request: pb.IngestRequest | None
    ref: SpoolRef | None = None


class Ledger:
    """Ordinals, sequence numbers, writer ids and what is in flight."""

    def __init__(self, writer_id: str, window_bytes: int) -> None:
        self.base_id = writer_id
        self.writer_id = writer_id
        self.window_bytes = window_bytes
        self.generation = 0
        self.ordinal = 0  # the last ordinal given out
        self.epoch_base = 0
        self.unacked: dict[int, Entry] = {}  # sent, by ordinal (oldest first)
        self.inflight_bytes = 0
        self.done_through = 0
        self._done_above: set[int] = set()
        self._lost: deque[int] = deque(maxlen=_LOST_KEPT)

    # -- identity -----------------------------------------------------------------

    def next_ordinal(self) -> int:
        self.ordinal += 1
        return self.ordinal

    def sequence(self, ordinal: int) -> int:
        """The wire sequence of an ordinal under the current writer id."""
        return ordinal - self.epoch_base

    def stamp(self, entry: Entry) -> tuple[str, int]:
        """Write the current (writer id, sequence) into the batch; return them."""
        assert entry.request is not None
        batch = entry.request.batch
        batch.writer_id = self.writer_id
        batch.sequence = self.sequence(entry.ordinal)
        return batch.writer_id, batch.sequence

    def new_id(self, epoch_base: int) -> None:
        """Continue under a new writer id whose sequence 1 is ordinal epoch_base+1."""
        self.generation += 1
        self.writer_id = f"{self.base_id[:96]}.r{self.generation}"
        self.epoch_base = epoch_base

    # -- in flight ----------------------------------------------------------------

    def sent(self, entry: Entry) -> None:
        self.unacked[entry.ordinal] = entry
        self.inflight_bytes += entry.nbytes

    def acked(self, sequence: int) -> Entry | None:
        """The batch an ack of `sequence` acknowledges; None if it is not in
        flight (a late duplicate, or an ack from before a new writer id)."""
        entry = self.unacked.pop(sequence + self.epoch_base, None)
        if entry is not None:
            self.inflight_bytes -= entry.nbytes
        return entry

    def oldest(self) -> Entry:
        return next(iter(self.unacked.values()))

    def pop_oldest(self) -> Entry:
        entry = self.unacked.pop(next(iter(self.unacked)))
        self.inflight_bytes -= entry.nbytes
        return entry

    def pop_all(self) -> list[Entry]:
        entries = list(self.unacked.values())
        self.unacked.clear()
        self.inflight_bytes = 0
        return entries

    def room(self, nbytes: int, proven: bool) -> bool:
        """Room for another batch of nbytes in flight. Until a new stream has
        delivered an ack (`proven`), only one: a stream may fail only after it
        was opened, and batches sent into a dead stream are sequenced, so no
        longer droppable."""
        if not self.unacked:
            return True
        if not proven:
            return False
        return (
            len(self.unacked) < MAX_INFLIGHT_BATCHES
            and self.inflight_bytes + nbytes <= self.window_bytes
        )

    # -- finished -----------------------------------------------------------------

    def resolve(self, ordinal: int, lost: bool = False) -> None:
        """An ordinal is finished (acked, written offline, or lost)."""
        if lost:
            self._lost.append(ordinal)
        if ordinal == self.done_through + 1:
            self.done_through = ordinal
            while self.done_through + 1 in self._done_above:
                self._done_above.discard(self.done_through + 1)
                self.done_through += 1
        elif ordinal > self.done_through:
            self._done_above.add(ordinal)

    def settled(self) -> bool:
        """Every ordinal given out is finished."""
        return self.done_through == self.ordinal

    def lost_in(self, after: int, through: int) -> bool:
        """Whether an ordinal in (after, through] was resolved without an ack."""
        return any(after < o <= through for o in self._lost)
