"""Writer progress, exactly once per (workspace, writer): sequence numbers
classified against the stored high-water mark, the outcomes of the last
batches kept for resends, and the sweep of writers gone quiet (asyncpg)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from ingest.core.batch import CommitResult, DecodedBatch, Outcome, SequenceGap
from ingest.store.db import acquire
from ingest.store.periodic import Periodic

log = logging.getLogger(__name__)


# The outcomes of a writer's last batches that the service keeps, so a batch
# resent after its acknowledgement was lost is answered with what its commit
# decided. The client keeps at most 32 batches unacknowledged
# (sdk/steplog/_writer.py MAX_INFLIGHT_BATCHES): twice that covers any resend
# of its window.
OUTCOMES_KEPT = 64
# Each kept outcome is at most this many bytes: the counts are exact, the
# rejected-point examples are cut (strings shortened, then examples dropped).
MAX_OUTCOME_BYTES = 4096
_MAX_EXAMPLE_CHARS = 200
_MAX_EXAMPLE_LABELS = 16
_MAX_MESSAGE_CHARS = 300


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def encode_outcome(outcome: Outcome, max_bytes: int = MAX_OUTCOME_BYTES) -> bytes:
    """A batch's outcome as compact JSON of at most `max_bytes`: the counts in
    full, as many (shortened) rejected-point examples as fit."""
    head: dict[str, Any] = {
        "a": outcome.accepted,
        "d": outcome.duplicates,
        "r": outcome.rejected,
        "c": sorted(outcome.by_reason.items()),
    }
    examples = [
        [
            _cut(run_id, _MAX_EXAMPLE_CHARS),
            _cut(name, _MAX_EXAMPLE_CHARS),
            {
                _cut(k, _MAX_EXAMPLE_CHARS): _cut(v, _MAX_EXAMPLE_CHARS)
                for k, v in list(labels.items())[:_MAX_EXAMPLE_LABELS]
            },
            index,
            step,
            reason,
            _cut(message, _MAX_MESSAGE_CHARS),
        ]
        for run_id, name, labels, index, step, reason, message in outcome.examples
    ]
    keep = len(examples)
    while True:
        data = json.dumps({**head, "x": examples[:keep]}, separators=(",", ":")).encode()
        if len(data) <= max_bytes or keep == 0:
            return data
        keep -= 1


def decode_outcome(data: bytes) -> Outcome:
    """The inverse of encode_outcome."""
    doc = json.loads(data)
    return Outcome(
        accepted=int(doc["a"]),
        duplicates=int(doc["d"]),
        rejected=int(doc["r"]),
        by_reason={int(reason): int(n) for reason, n in doc["c"]},
        examples=[
            (str(r), str(n), dict(lb), int(i), None if s is None else int(s), int(why), str(m))
            for r, n, lb, i, s, why, m in doc["x"]
        ],
    )


def classify_sequences(
    batches: Sequence[DecodedBatch], marks: Mapping[tuple[str, str], int]
) -> tuple[list[CommitResult], list[DecodedBatch]]:
    """Exactly-once, pure: against each writer's committed high-water mark, a
    batch at or below it is a duplicate, the one right above it is live (and
    moves the mark for the batches after it in the group), a gap is an error."""
    hwm = dict(marks)
    results: list[CommitResult] = []
    live: list[DecodedBatch] = []
    for b in batches:
        key = (b.workspace, b.writer_id)
        last = hwm.get(key, 0)
        if b.sequence <= last:
            results.append(CommitResult(duplicate_batch=True))
        elif b.sequence == last + 1:
            hwm[key] = b.sequence
            results.append(CommitResult())
            live.append(b)
        else:
            results.append(CommitResult(gap=SequenceGap(b.writer_id, last + 1, b.sequence)))
    return results, live


def sweep_interval(retention_s: float) -> float:
    """How often the retention sweep runs: a quarter of the retention, at
    least every minute, at most every 50 ms."""
    return min(60.0, max(0.05, retention_s / 4))


async def sweep_writers(
    conn: asyncpg.Connection, retention_s: float, rows: int = 1000, rounds: int = 100
) -> int:
    """Delete writers idle for longer than the retention (and, by cascade,
    their kept outcomes), in short transactions of at most `rows` rows, at
    most `rounds` of them per call. Rows a commit holds are skipped: that
    writer is active. Returns how many writers were deleted."""
    deleted = 0
    for _ in range(rounds):
        status = await conn.execute(
            "DELETE FROM writers WHERE (workspace, writer_id) IN ("
            " SELECT workspace, writer_id FROM writers"
            " WHERE updated_at < now() - make_interval(secs => $1)"
            " ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            float(retention_s),
            rows,
        )
        n = int(status.split()[-1])
        deleted += n
        if n < rows:
            break
    return deleted


class WriterSweeper(Periodic):
    """The background task that expires idle writers (see sweep_writers)."""

    name = "steplog-writer-sweep"
    sleep_first = False

    def __init__(self, pool: asyncpg.Pool, retention_s: float) -> None:
        super().__init__(sweep_interval(retention_s))
        self.pool = pool
        self.retention_s = retention_s
        self.deleted = 0

    async def round(self) -> None:
        async with acquire(self.pool) as conn:
            n = await sweep_writers(conn, self.retention_s)
        self.deleted += n
        if n:
            log.info("expired %d idle writer(s)", n)

    def failed(self, exc: Exception) -> None:
        log.warning("writer retention sweep failed: %s", exc)
