"""What the write pipeline needs of the layers around it, as Protocols: the
store makes connections that commit groups of batches (`CommitStore`,
implemented by ingest/store/sessions.py), and a step may prepare a batch
before it is queued (`Admission`, the image blobs of ingest/store/artifacts.py).
The composition root (ingest/server.py) hands the implementations in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ingest.core.batch import CommitResult, DecodedBatch
from ingest.core.errors import Fault


class CommitSession(Protocol):
    """One worker's connection to the store."""

    def is_closed(self) -> bool: ...

    def terminate(self) -> None:
        """Drop the connection at once (its state is unknown)."""

    async def close(self) -> None:
        """Close politely (bounded in time by the store)."""

    async def commit_group(self, batches: Sequence[DecodedBatch]) -> Sequence[CommitResult]:
        """Commit the batches in one transaction: one result per batch, in
        order; the batches' outcomes say what happened to their points."""
        ...


class CommitStore(Protocol):
    """Makes the workers' connections and says what their errors mean."""

    async def connect(self) -> CommitSession: ...

    def classify(self, exc: BaseException) -> Fault: ...


class Admission(Protocol):
    """A step in front of the queue (on the service's loop)."""

    async def admit(self, batch: DecodedBatch) -> int:
        """Prepare the batch (it may reject points of it, or raise
        StoreUnavailable); returns the bytes it no longer holds in memory."""
        ...
