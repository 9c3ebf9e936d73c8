"""Write-through without a database: the blocks a commit hands to the read
cache (ingest/store/points.py cached_blocks) are, field for field and bit
for bit, what a read decodes from the rows the same commit sends
(ingest/store/blocks.py, with the block ids allocated ahead), and a
Block.written normalizes as Block.of does. (Through the service and
PostgreSQL: tests/integration/test_write_through.py.)"""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import numpy as np
import pytest

from ingest.store.blocks import (
    BLOCK_COLUMNS_WITH_ID,
    Block,
    encode_blocks_chunks,
    merge_accepted,
    split_span,
)
from ingest.store.columns import Block as Cached
from ingest.store.columns import BlockCache
from ingest.store.copy import COPY_HEADER, COPY_TRAILER
from ingest.store.points import PG_EPOCH_US, cached_blocks


def rows_of(payload: bytes) -> list[dict[str, bytes | None]]:
    """The rows of a binary COPY payload, as {column: field bytes}."""
    assert payload.startswith(COPY_HEADER) and payload.endswith(COPY_TRAILER)
    at, end = len(COPY_HEADER), len(payload) - len(COPY_TRAILER)
    out = []
    while at < end:
        (count,) = struct.unpack_from(">h", payload, at)
        assert count == len(BLOCK_COLUMNS_WITH_ID)
        at += 2
        row: dict[str, bytes | None] = {}
        for name in BLOCK_COLUMNS_WITH_ID:
            (n,) = struct.unpack_from(">i", payload, at)
            at += 4
            row[name] = None if n < 0 else payload[at : at + n]
            at += max(n, 0)
        out.append(row)
    assert at == end
    return out


def as_read(row: dict[str, bytes | None]) -> tuple[int, Cached]:
    """What columns.read_parts decodes from such a row (the arrays are in
    array_send's form already; min_time in PostgreSQL's microseconds)."""

    def q(name: str) -> int:
        raw = row[name]
        assert raw is not None
        return int(struct.unpack(">q", raw)[0])

    record: dict[str, Any] = {
        "min_step": q("min_step"),
        "max_step": q("max_step"),
        "t0": q("min_time") + PG_EPOCH_US,
        "v": row["values"],
        "o": row["offsets"],
        "s": row["steps"],
        "h": row["hidden"],
    }
    return q("block_id"), Cached.of(record)


def same(a: Cached, b: Cached) -> None:
    assert (a.min_step, a.max_step) == (b.min_step, b.max_step)
    assert a.values.tobytes() == b.values.tobytes()  # bit for bit: NaN, -0.0
    assert a.times_us.tolist() == b.times_us.tolist()
    for x, y in ((a.steps, b.steps), (a.hidden, b.hidden)):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            assert x.tolist() == y.tolist()
    assert a.nbytes == b.nbytes


@pytest.mark.parametrize("seed", range(6))
def test_the_blocks_handed_to_the_cache_are_what_a_read_decodes(seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    for sid in range(1, 6):
        n = rng.choice([16, 100, 4096, 4097, 9000])
        if rng.random() < 0.5:
            steps = np.arange(1000 * sid, 1000 * sid + n, dtype=np.int64)
        else:  # out of order, a step written twice now and then
            steps = np.array([rng.randrange(0, n) for _ in range(n)], dtype=np.int64)
        values = np.array(
            [rng.choice([math.nan, math.inf, -math.inf, -0.0, 5e-324, rng.random()]) for _ in steps]
        )
        # Times mostly close; in some series, a jump past int4 microseconds.
        times = (
            1.7e9
            + np.arange(n) * 0.001
            + (4000.0 if rng.random() < 0.3 else 0.0) * (np.arange(n) > n // 2)
        )
        parts.append((sid, times, steps, values))
    blocks = merge_accepted(parts, {1, 3, 5})
    cuts = [split_span(b.times_us) for b in blocks]
    ids = list(range(500, 500 + sum(len(c) for c in cuts)))
    rows = rows_of(b"".join(encode_blocks_chunks(blocks, cuts, ids)))
    xid = 77_000
    stored = cached_blocks([(xid, list(blocks), cuts, ids)])
    assert [k for k, _ in stored] == [(i, xid) for i in ids]
    assert len(rows) == len(stored)
    for row, ((bid, _), got) in zip(rows, stored, strict=True):
        want_id, want = as_read(row)
        assert want_id == bid
        same(got, want)


def test_rows_with_ids_are_the_rows_without_them_plus_the_id() -> None:
    steps = np.arange(5000, dtype=np.int64)
    b = Block(7, np.arange(5000, dtype=np.int64) * 10, steps, np.sin(steps / 3.0))
    with_ids = rows_of(b"".join(encode_blocks_chunks([b], [split_span(b.times_us)], [41, 42])))
    assert [struct.unpack(">q", r["block_id"] or b"")[0] for r in with_ids] == [41, 42]
    plain = b"".join(encode_blocks_chunks([b]))
    # Drop each row's id field and fix its field count: the same bytes.
    again = []
    for r in with_ids:
        fields = [r[c] for c in BLOCK_COLUMNS_WITH_ID[1:]]
        row = struct.pack(">h", len(fields))
        for f in fields:
            row += struct.pack(">i", -1) if f is None else struct.pack(">i", len(f)) + f
        again.append(row)
    assert plain == COPY_HEADER + b"".join(again) + COPY_TRAILER


def test_written_normalizes_as_a_read_does() -> None:
    consecutive = Cached.written(
        np.arange(10, 20, dtype=np.int64),
        np.arange(10, dtype=np.int64),
        np.ones(10),
        np.zeros(10, dtype=np.bool_),
    )
    assert consecutive.steps is None and consecutive.hidden is None
    assert (consecutive.min_step, consecutive.max_step) == (10, 19)
    shuffled = Cached.written(
        np.array([5, 3, 4]), np.arange(3), np.ones(3), np.array([False, True, False])
    )
    assert shuffled.steps is not None and shuffled.steps.tolist() == [5, 3, 4]
    assert (shuffled.min_step, shuffled.max_step) == (3, 5)
    assert shuffled.hidden is not None and shuffled.hidden.tolist() == [False, True, False]
    # Copies: the writer's arrays may be views of a larger buffer.
    big = np.ones(1000)
    one = Cached.written(np.arange(2), np.arange(2), big[:2])
    assert one.values.base is None


def test_put_many_keeps_the_bound() -> None:
    cache = BlockCache(3 * Cached.written(np.arange(100), np.arange(100), np.ones(100)).nbytes)
    items = [
        ((i, 9), Cached.written(np.arange(100), np.arange(100), np.ones(100))) for i in range(5)
    ]
    cache.put_many(items)
    assert cache.used <= cache.max_bytes
    assert cache.keys() == [(2, 9), (3, 9), (4, 9)]
