"""The block encoder (ingest/store/blocks.py) without a database: spans cut
to int4 microseconds, a commit's parts merged into one block per series, a
step written twice in an out-of-order series, the binary layout of a row.
(Round trips through PostgreSQL: tests/integration/test_blocks.py.)"""

from __future__ import annotations

import struct

import numpy as np

from ingest.store.blocks import (
    BLOCK_COLUMNS,
    GROUP_BLOCK,
    GROUP_POINTS,
    MAX_BLOCK_POINTS,
    MAX_SPAN_US,
    Block,
    encode_block_row,
    encode_blocks_chunks,
    encode_blocks_copy,
    merge_accepted,
    merge_taken,
    split_span,
)
from ingest.store.copy import COPY_HEADER, COPY_TRAILER


def _fields(row: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from(">h", row)
    out: list[bytes | None] = []
    at = 2
    for _ in range(count):
        (n,) = struct.unpack_from(">i", row, at)
        at += 4
        if n < 0:
            out.append(None)
        else:
            out.append(row[at : at + n])
            at += n
    assert at == len(row)
    return out


def test_a_span_within_int4_microseconds_is_one_block() -> None:
    t = np.array([0, MAX_SPAN_US, 5], dtype=np.int64)
    assert split_span(t) == [slice(0, 3)]


def test_a_longer_span_is_cut_where_it_would_overflow() -> None:
    t = np.array([0, 10, MAX_SPAN_US + 1, MAX_SPAN_US + 2, 3 * MAX_SPAN_US], dtype=np.int64)
    cuts = split_span(t)
    assert cuts == [slice(0, 2), slice(2, 4), slice(4, 5)]
    for s in cuts:
        assert int(t[s].max()) - int(t[s].min()) <= MAX_SPAN_US


def test_a_long_run_is_cut_every_max_block_points() -> None:
    t = np.arange(2 * MAX_BLOCK_POINTS + 5, dtype=np.int64)
    assert split_span(t) == [
        slice(0, MAX_BLOCK_POINTS),
        slice(MAX_BLOCK_POINTS, 2 * MAX_BLOCK_POINTS),
        slice(2 * MAX_BLOCK_POINTS, 2 * MAX_BLOCK_POINTS + 5),
    ]
    # Both bounds at once: a time jump inside the second run cuts it again.
    t[MAX_BLOCK_POINTS + 10 :] += MAX_SPAN_US + 1
    assert split_span(t) == [
        slice(0, MAX_BLOCK_POINTS),
        slice(MAX_BLOCK_POINTS, MAX_BLOCK_POINTS + 10),
        slice(MAX_BLOCK_POINTS + 10, 2 * MAX_BLOCK_POINTS),
        slice(2 * MAX_BLOCK_POINTS, 2 * MAX_BLOCK_POINTS + 5),
    ]


def test_parts_of_one_series_merge_in_commit_order() -> None:
    one = (7, np.array([1.0, 2.0]), np.array([0, 1]), np.array([0.5, 0.25]))
    two = (7, np.array([3.0]), np.array([2]), np.array([0.125]))
    other = (8, np.array([1.0]), np.array([0]), np.array([9.0]))
    blocks = merge_accepted([one, other, two], set())
    assert [b.series_id for b in blocks] == [7, 8]
    assert blocks[0].steps.tolist() == [0, 1, 2]
    assert blocks[0].values.tolist() == [0.5, 0.25, 0.125]
    assert blocks[0].hidden is None


def test_a_step_written_twice_out_of_order_keeps_the_last_write_visible() -> None:
    one = (7, np.zeros(3), np.array([5, 3, 9]), np.array([1.0, 2.0, 3.0]))
    two = (7, np.zeros(2), np.array([3, 5]), np.array([4.0, 5.0]))
    (block,) = merge_accepted([one, two], {7})
    assert block.hidden is not None
    assert block.hidden.tolist() == [True, True, False, False, False]
    # Not out of order: nothing is hidden (the step rules rejected repeats).
    (strict,) = merge_accepted([one, two], set())
    assert strict.hidden is None


def test_a_row_has_every_column_and_implied_steps_when_contiguous() -> None:
    values = np.array([np.nan, -np.inf, 2.0, -0.0])
    block = Block(3, np.array([10, 12, 11, 20], dtype=np.int64), np.arange(4, 8), values)
    fields = _fields(encode_block_row(block))
    assert len(fields) == len(BLOCK_COLUMNS)
    f = dict(zip(BLOCK_COLUMNS, fields, strict=True))
    assert f["steps"] is None and f["hidden"] is None  # steps 4..7 implied
    assert struct.unpack(">q", f["min_step"] or b"") == (4,)
    assert struct.unpack(">q", f["max_time"] or b"") == (20,)
    assert struct.unpack(">i", f["nan_count"] or b"") == (1,)
    assert struct.unpack(">d", f["min_value"] or b"") == (-np.inf,)
    assert struct.unpack(">d", f["max_value"] or b"") == (2.0,)
    assert f["last_value"] == struct.pack(">d", -0.0)
    raw = f["values"] or b""
    # ndim, flags, oid float8, length 4, lower bound 1, then (8, value) each
    assert struct.unpack_from(">iiiii", raw) == (1, 0, 701, 4, 1)
    body = np.frombuffer(raw[20:], dtype=[("len", ">i4"), ("v", ">f8")])
    assert body["len"].tolist() == [8] * 4
    assert [struct.pack(">d", v) for v in body["v"]] == [struct.pack(">d", v) for v in values]
    offsets = np.frombuffer((f["offsets"] or b"")[20:], dtype=[("len", ">i4"), ("v", ">i4")])
    assert offsets["v"].tolist() == [0, 2, 1, 10]


def test_gaps_in_steps_are_stored_and_all_nan_has_no_extremes() -> None:
    block = Block(3, np.zeros(3, dtype=np.int64), np.array([0, 2, 3]), np.full(3, np.nan))
    f = dict(zip(BLOCK_COLUMNS, _fields(encode_block_row(block)), strict=True))
    assert f["steps"] is not None
    assert f["min_value"] is None and f["max_value"] is None


def test_a_payload_holds_one_row_per_piece() -> None:
    t = np.array([0, 3 * MAX_SPAN_US], dtype=np.int64)
    payload, rows = encode_blocks_copy(
        [
            Block(1, t, np.array([0, 1]), np.array([1.0, 2.0])),
            Block(2, t[:1], np.array([0]), np.array([3.0])),
        ]
    )
    assert rows == 3
    assert payload.startswith(COPY_HEADER) and payload.endswith(COPY_TRAILER)


def reference_copy(blocks: list[Block]) -> tuple[bytes, int]:
    """encode_blocks_copy's answer built the reference way: encode_block_row
    for each piece (split_span) of each block, in order."""
    rows = [
        encode_block_row(
            Block(
                b.series_id,
                b.times_us[s],
                b.steps[s],
                b.values[s],
                None if b.hidden is None else b.hidden[s],
            )
        )
        for b in blocks
        if b.values.shape[0]
        for s in split_span(b.times_us)
    ]
    return COPY_HEADER + b"".join(rows) + COPY_TRAILER, len(rows)


def test_the_payload_is_the_rows_of_encode_block_row_byte_for_byte() -> None:
    """encode_blocks_copy computes every piece's summaries at once; its bytes
    are those of encode_block_row piece by piece (the reference), whatever
    the cuts, gaps in steps, NaN, infinities, -0.0, hidden points."""
    rng = np.random.default_rng(3)
    for _ in range(150):
        blocks = []
        for sid in range(int(rng.integers(1, 4))):
            n = int(rng.choice([0, 1, 2, 5, MAX_BLOCK_POINTS - 1, MAX_BLOCK_POINTS, 9000]))
            spread = int(rng.integers(0, 2 * MAX_SPAN_US // max(n, 1) + 1)) * int(
                rng.integers(0, 2)
            )
            t = np.sort(rng.integers(0, 10**6, n)) + np.arange(n) * spread
            steps = np.arange(n) + int(rng.integers(0, 2**40))
            if n > 3 and rng.random() < 0.4:
                steps[int(rng.integers(1, n))] += 5
            values = rng.standard_normal(n)
            if n and rng.random() < 0.5:
                values[rng.integers(0, n, size=max(1, n // 10))] = np.nan
            if rng.random() < 0.2:
                values[:] = np.nan
            if n and rng.random() < 0.3:
                values[rng.integers(0, n, size=3)] = [np.inf, -np.inf, -0.0]
            hidden = rng.random(n) < 0.2 if n and rng.random() < 0.3 else None
            blocks.append(Block(sid, t.astype(np.int64), steps, values, hidden))
        assert encode_blocks_copy(blocks) == reference_copy(blocks)


def test_parts_taken_at_their_positions_merge_as_if_gathered_first() -> None:
    """merge_taken takes each part's points at its positions (an increasing
    index, or None for all) straight into the block: the same blocks as
    merge_accepted of the gathered parts."""
    rng = np.random.default_rng(11)
    cols = [(rng.random(9) * 1e9, np.arange(9) * 3, rng.standard_normal(9)) for _ in range(3)]
    picks = [np.arange(9), np.array([0, 4, 8]), None]
    sids = [7, 7, 8]
    taken = merge_taken(
        [(sid, t, s, v, ix) for sid, (t, s, v), ix in zip(sids, cols, picks, strict=True)], {7}
    )
    gathered = merge_accepted(
        [
            (sid, t, s, v) if ix is None else (sid, t[ix], s[ix], v[ix])
            for sid, (t, s, v), ix in zip(sids, cols, picks, strict=True)
        ],
        {7},
    )
    assert len(taken) == len(gathered) == 2
    for a, b in zip(taken, gathered, strict=True):
        assert a.series_id == b.series_id
        for x, y in ((a.times_us, b.times_us), (a.steps, b.steps), (a.values, b.values)):
            assert x.tolist() == y.tolist()
        assert (a.hidden is None) == (b.hidden is None)
        if a.hidden is not None and b.hidden is not None:
            assert a.hidden.tolist() == b.hidden.tolist()
    assert taken[0].hidden is not None and taken[0].hidden.sum() == 3  # steps 0, 12, 24 twice
    # One part taken whole: its columns are used as they are (no copy).
    (alone,) = merge_taken([(8, *cols[2], np.arange(9))], set())
    assert alone.values is cols[2][2]


def test_the_payload_in_chunks_is_the_payload() -> None:
    """encode_blocks_chunks cuts the same bytes into pieces of whole rows of
    about COPY_CHUNK_BYTES (what the commit streams to PostgreSQL)."""
    rng = np.random.default_rng(2)
    blocks = [
        Block(sid, np.arange(n, dtype=np.int64), np.arange(n), rng.standard_normal(n))
        for sid, n in enumerate([20_000, 5, 0, 30_000, 17])
    ]
    chunks = list(encode_blocks_chunks(blocks))
    assert len(chunks) == 3  # cut after the first and the fourth series
    assert b"".join(chunks) == encode_blocks_copy(blocks)[0]
    assert list(encode_blocks_chunks([])) == [COPY_HEADER + COPY_TRAILER]


def test_many_small_blocks_encode_in_groups_as_one_by_one() -> None:
    """Small blocks are encoded together (groups of up to GROUP_POINTS
    points, a block of GROUP_BLOCK points or more alone): the bytes are
    still encode_block_row's, piece by piece, in the blocks' order, with
    block ids given in that order."""
    rng = np.random.default_rng(5)
    sizes = [300] * 40 + [GROUP_BLOCK, 7, 0, GROUP_BLOCK - 1, 5000] + [1] * 30 + [GROUP_POINTS]
    blocks = []
    for sid, n in enumerate(sizes):
        steps = np.arange(n) + int(rng.integers(0, 2**40))
        if n > 3 and rng.random() < 0.3:
            steps[int(rng.integers(1, n))] += 2
        values = rng.standard_normal(n)
        if n and rng.random() < 0.3:
            values[: max(1, n // 3)] = np.nan
        hidden = rng.random(n) < 0.1 if n and rng.random() < 0.3 else None
        t = np.sort(rng.integers(0, 10**6, n)).astype(np.int64)
        blocks.append(Block(sid + 1, t, steps, values, hidden))
    cuts = [split_span(b.times_us) for b in blocks]
    pieces = sum(len(c) for b, c in zip(blocks, cuts, strict=True) if b.values.shape[0])
    ids = list(range(100, 100 + pieces))
    assert encode_blocks_copy(blocks) == reference_copy(blocks)
    with_ids = b"".join(encode_blocks_chunks(blocks, cuts, ids))
    plain = b"".join(encode_blocks_chunks(blocks))
    assert plain == encode_blocks_copy(blocks)[0]
    assert len(with_ids) == len(plain) + 12 * len(ids)  # a block_id field (4 + 8) a row
