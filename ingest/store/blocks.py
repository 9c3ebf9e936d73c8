"""Numeric scalar points as blocks (migration 010_scalar_blocks): one row of
`scalar_blocks` per series per commit, its points as array columns, built
with numpy and sent as one binary COPY. Pure: numpy and struct only.

A block's columns: `values` float8[] (bit for bit), `offsets` int4[] (the
time in microseconds after `min_time`), `steps` int8[] or NULL when the steps
are min_step, min_step + 1, ... in order, `hidden` bool[] or NULL when no
point is hidden; and the summaries the readers prune and downsample with
(min/max step and time, n, hidden_count, nan_count, min/max value without
NaN, last value).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.store.copy import COPY_HEADER, COPY_TRAILER, PG_EPOCH, SCALAR_COLUMNS, SCALAR_ROW

BLOCK_COLUMNS = [
    "series_id",
    "min_time",
    "max_time",
    "min_step",
    "max_step",
    "n",
    "hidden_count",
    "nan_count",
    "min_value",
    "max_value",
    "last_value",
    "steps",
    "offsets",
    "values",
    "hidden",
]

# The columns of a COPY whose rows bring their block_id (allocated ahead
# from scalar_blocks_id_seq, so the writer knows each block's id).
BLOCK_COLUMNS_WITH_ID = ["block_id", *BLOCK_COLUMNS]

# A block spans at most this many microseconds (int4 offsets).
MAX_SPAN_US = 2**31 - 1
# ... and holds at most this many points: a read that needs a few points of a
# block unpacks all of it (its arrays are read whole from TOAST), so a block
# stays a few tens of kilobytes (4096 points: 48 KiB of values and offsets)
# while its ~260 bytes of row, index and array headers cost under 0.1 byte
# a point.
MAX_BLOCK_POINTS = 4096
# A commit's points of a series become a block when there are at least this
# many, rows of scalar_rows otherwise: a block's fixed ~270 bytes would cost
# more than a row's ~100 per point below that. The compaction sweep
# (ingest/store/compact.py, migration 011) merges rows and small blocks
# into full ones later.
MIN_BLOCK_POINTS = 16

_OID_INT8 = 20
_OID_INT4 = 23
_OID_FLOAT8 = 701
_OID_BOOL = 16
_NULL = struct.pack(">i", -1)
_ELEMENT = {_OID_INT8: ">i8", _OID_INT4: ">i4", _OID_FLOAT8: ">f8", _OID_BOOL: "u1"}


@dataclass
class Block:
    """The points of one block, in the order they were written."""

    series_id: int
    times_us: np.ndarray[Any, Any]  # int64 microseconds since 2000-01-01 (PostgreSQL's origin)
    steps: np.ndarray[Any, Any]  # int64
    values: np.ndarray[Any, Any]  # float64
    hidden: np.ndarray[Any, Any] | None = None  # bool, None: none hidden


def _array(oid: int, data: np.ndarray[Any, Any]) -> bytes:
    """A one-dimensional array without NULLs in PostgreSQL's binary format:
    the header, then (length, big-endian value) per element."""
    n = int(data.shape[0])
    width = np.dtype(_ELEMENT[oid]).itemsize
    el = np.empty(n, dtype=[("len", ">i4"), ("v", _ELEMENT[oid])])
    el["len"] = width
    el["v"] = data
    body = struct.pack(">iiiii", 1, 0, oid, n, 1) + el.tobytes()
    return struct.pack(">i", len(body)) + body


def _field(fmt: str, value: Any) -> bytes:
    raw = struct.pack(">" + fmt, value)
    return struct.pack(">i", len(raw)) + raw


def split_span(times_us: np.ndarray[Any, Any], most: int = MAX_BLOCK_POINTS) -> list[slice]:
    """Cut positions into consecutive runs of at most `most` points whose
    times span at most MAX_SPAN_US (a block's int4 offsets)."""
    n = int(times_us.shape[0])
    if n == 0:
        return [slice(0, 0)]
    cuts: list[slice] = []
    for first in range(0, n, most):
        last = min(n, first + most)
        part = times_us[first:last]
        if int(part.max()) - int(part.min()) <= MAX_SPAN_US:
            cuts.append(slice(first, last))
            continue
        start = first
        lo = hi = int(times_us[first])
        for i in range(first + 1, last):  # rare: points over more than ~35 minutes
            t = int(times_us[i])
            lo, hi = min(lo, t), max(hi, t)
            if hi - lo > MAX_SPAN_US:
                cuts.append(slice(start, i))
                start, lo, hi = i, t, t
        cuts.append(slice(start, last))
    return cuts


def _pieces(block: Block) -> Iterator[Block]:
    for s in split_span(block.times_us):
        yield Block(
            block.series_id,
            block.times_us[s],
            block.steps[s],
            block.values[s],
            None if block.hidden is None else block.hidden[s],
        )


def encode_block_row(block: Block) -> bytes:
    """One scalar_blocks row (BLOCK_COLUMNS) in binary COPY format; the
    block's times must span at most MAX_SPAN_US."""
    t = block.times_us
    steps = block.steps
    values = np.ascontiguousarray(block.values, dtype=np.float64)
    n = int(values.shape[0])
    t0, t1 = int(t.min()), int(t.max())
    s0, s1 = int(steps.min()), int(steps.max())
    nan = np.isnan(values)
    nan_count = int(nan.sum())
    finite = values[~nan] if nan_count else values
    contiguous = s1 - s0 + 1 == n and (n == 1 or bool(np.all(steps[1:] - steps[:-1] == 1)))
    hidden = block.hidden
    hidden_count = 0 if hidden is None else int(hidden.sum())
    parts = [
        struct.pack(">h", len(BLOCK_COLUMNS)),
        _field("q", block.series_id),
        _field("q", t0),
        _field("q", t1),
        _field("q", s0),
        _field("q", s1),
        _field("i", n),
        _field("i", hidden_count),
        _field("i", nan_count),
        _field("d", float(finite.min())) if finite.size else _NULL,
        _field("d", float(finite.max())) if finite.size else _NULL,
        _field("d", float(values[-1])),
        _NULL if contiguous else _array(_OID_INT8, steps),
        _array(_OID_INT4, (t - t0).astype(np.int32)),
        _array(_OID_FLOAT8, values),
        _NULL if not hidden_count else _array(_OID_BOOL, hidden.astype(np.uint8)),  # type: ignore[union-attr]
    ]
    return b"".join(parts)


# A row's fixed start: the field count, then (length, value) of series_id,
# min_time, max_time, min_step, max_step (int8), n, hidden_count, nan_count (int4).
_ROW_HEAD = struct.Struct(">h" + "iq" * 5 + "ii" * 3)
# With the block_id first (BLOCK_COLUMNS_WITH_ID): the field count, the
# block_id, then the same fields.
_ID_ROW_HEAD = struct.Struct(">hiq" + "iq" * 5 + "ii" * 3)
_FLOAT_FIELD = struct.Struct(">id")
# An array column's start: its length, then ndim, flags, element oid, n, lower bound.
_ARRAY_HEAD = struct.Struct(">iiiiii")


def _elements(oid: int, data: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """(length, big-endian value) per element of a whole column: the body of
    its arrays, sliced per block."""
    width = np.dtype(_ELEMENT[oid]).itemsize
    el = np.empty(int(data.shape[0]), dtype=[("len", ">i4"), ("v", _ELEMENT[oid])])
    el["len"] = width
    el["v"] = data
    return el


class _Pieces:
    """The scalar_blocks rows of several blocks (each cut by split_span, or
    by the cuts given), every summary computed for all their pieces at once
    (one reduceat per column over the blocks' joined arrays) and each array
    a slice of one whole-column buffer: the numpy work of a commit is a
    fixed number of whole-array operations whatever its number of series
    (a commit of many small series, 200 writers of 10 series each, paid
    some twenty array operations a series before). `rows(i)` appends the
    rows of block i; their bytes are those of encode_block_row for each
    piece."""

    def __init__(self, blocks: Sequence[Block], cuts: Sequence[list[slice]] | None = None) -> None:
        sizes = [int(b.values.shape[0]) for b in blocks]
        self.sizes = sizes
        kept = [i for i, n in enumerate(sizes) if n]
        starts_of: list[np.ndarray[Any, Any]] = []
        at = 0
        # Block i's rows are pieces first_piece[i] .. first_piece[i + 1] - 1.
        first_piece = [0]
        for i, b in enumerate(blocks):
            n = sizes[i]
            if n:
                pieces = split_span(b.times_us) if cuts is None else cuts[i]
                starts_of.append(
                    np.fromiter((c.start for c in pieces), dtype=np.int64, count=len(pieces)) + at
                )
                at += n
            first_piece.append(first_piece[-1] + (len(starts_of[-1]) if n else 0))
        self.first_piece = first_piece
        total = at
        if not kept:
            return

        def joined(column: str, dtype: type) -> np.ndarray[Any, Any]:
            parts: list[np.ndarray[Any, Any]] = [
                np.asarray(getattr(blocks[i], column), dtype=dtype) for i in kept
            ]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        t = joined("times_us", np.int64)
        steps = joined("steps", np.int64)
        values = np.ascontiguousarray(joined("values", np.float64))
        starts = np.concatenate(starts_of)
        counts = np.diff(np.append(starts, total))
        t_min = np.minimum.reduceat(t, starts)
        nan = np.isnan(values)
        if nan.any():
            nan_counts = np.add.reduceat(nan, starts, dtype=np.int64)
            v_min = np.minimum.reduceat(np.where(nan, np.inf, values), starts)
            v_max = np.maximum.reduceat(np.where(nan, -np.inf, values), starts)
        else:
            nan_counts = np.zeros(len(starts), dtype=np.int64)
            v_min = np.minimum.reduceat(values, starts)
            v_max = np.maximum.reduceat(values, starts)
        # Steps implied when each step of a piece is the one before it plus
        # one: a piece is not when a break falls inside it (a break at a
        # piece's first point, a block's first among them, does not count).
        contiguous = np.ones(len(starts), dtype=np.bool_)
        breaks = np.flatnonzero(steps[1:] - steps[:-1] != 1) + 1
        if breaks.size:
            piece = np.searchsorted(starts, breaks, side="right") - 1
            contiguous[piece[breaks != starts[piece]]] = False
        hidden: np.ndarray[Any, Any] | None = None
        if any(blocks[i].hidden is not None for i in kept):
            hidden = np.concatenate(
                [
                    np.zeros(sizes[i], dtype=np.bool_)
                    if blocks[i].hidden is None
                    else np.asarray(blocks[i].hidden, dtype=np.bool_)
                    for i in kept
                ]
            )
        hidden_counts = (
            np.zeros(len(starts), dtype=np.int64)
            if hidden is None
            else np.add.reduceat(hidden, starts, dtype=np.int64)
        )
        self.el_values = _elements(_OID_FLOAT8, values)
        # Each point's time less its piece's first: the pieces' t_min laid out
        # by a cumulative sum of their differences (np.repeat with counts is
        # several times slower).
        if len(starts) == 1:
            offsets = t - t_min[0]
        else:
            base = np.zeros(total, dtype=np.int64)
            base[starts] = np.diff(t_min, prepend=np.int64(0))
            offsets = t - np.cumsum(base)
        self.el_offsets = _elements(_OID_INT4, offsets)
        self.el_steps = None if contiguous.all() else _elements(_OID_INT8, steps)
        self.el_hidden = (
            None
            if hidden is None or not hidden_counts.any()
            else _elements(_OID_BOOL, hidden.astype(np.uint8))
        )
        self.sids = [int(b.series_id) for b in blocks]
        self.table = list(
            zip(
                starts.tolist(),
                counts.tolist(),
                t_min.tolist(),
                np.maximum.reduceat(t, starts).tolist(),
                np.minimum.reduceat(steps, starts).tolist(),
                np.maximum.reduceat(steps, starts).tolist(),
                nan_counts.tolist(),
                hidden_counts.tolist(),
                v_min.tolist(),
                v_max.tolist(),
                values[starts + counts - 1].tolist(),
                contiguous.tolist(),
                strict=True,
            )
        )

    def rows(
        self, i: int, parts: list[bytes | memoryview], ids: Iterator[int] | None = None
    ) -> int:
        """Append the rows of block i to `parts`; with `ids`, each row starts
        with its block_id, the next of `ids` (BLOCK_COLUMNS_WITH_ID). The row
        count (0 for an empty block)."""
        lo, hi = self.first_piece[i], self.first_piece[i + 1]
        if lo == hi:
            return 0
        sid = self.sids[i]
        el_values, el_offsets, el_steps, el_hidden = (
            self.el_values,
            self.el_offsets,
            self.el_steps,
            self.el_hidden,
        )
        for a, k, t0, t1, s0, s1, nc, hc, v_lo, v_hi, last, cont in self.table[lo:hi]:
            b = a + k
            fields = (8, sid, 8, t0, 8, t1, 8, s0, 8, s1, 4, k, 4, hc, 4, nc)
            if ids is None:
                parts.append(_ROW_HEAD.pack(len(BLOCK_COLUMNS), *fields))
            else:
                parts.append(_ID_ROW_HEAD.pack(len(BLOCK_COLUMNS_WITH_ID), 8, next(ids), *fields))
            if nc < k:
                parts += (_FLOAT_FIELD.pack(8, v_lo), _FLOAT_FIELD.pack(8, v_hi))
            else:
                parts += (_NULL, _NULL)
            parts.append(_FLOAT_FIELD.pack(8, last))
            if cont:
                parts.append(_NULL)
            else:
                assert el_steps is not None
                parts += (
                    _ARRAY_HEAD.pack(20 + 12 * k, 1, 0, _OID_INT8, k, 1),
                    el_steps[a:b].data,
                )
            parts += (
                _ARRAY_HEAD.pack(20 + 8 * k, 1, 0, _OID_INT4, k, 1),
                el_offsets[a:b].data,
            )
            parts += (
                _ARRAY_HEAD.pack(20 + 12 * k, 1, 0, _OID_FLOAT8, k, 1),
                el_values[a:b].data,
            )
            if hc:
                assert el_hidden is not None
                parts += (
                    _ARRAY_HEAD.pack(20 + 5 * k, 1, 0, _OID_BOOL, k, 1),
                    el_hidden[a:b].data,
                )
            else:
                parts.append(_NULL)
        return hi - lo


def encode_blocks_copy(blocks: Sequence[Block]) -> tuple[bytes, int]:
    """A binary COPY payload of scalar_blocks rows for `blocks` (each split
    into runs of at most MAX_BLOCK_POINTS points spanning at most int4
    microseconds), and the row count: the rows of encode_block_row, built a
    group of series at a time (_Pieces) and joined once (no Python work per point, one copy of
    the columns into the payload)."""
    parts: list[bytes | memoryview] = [COPY_HEADER]
    rows = 0
    for lo, hi in _groups(blocks):
        pieces = _Pieces(blocks[lo:hi])
        rows += sum(pieces.rows(i, parts) for i in range(hi - lo))
    parts.append(COPY_TRAILER)
    return b"".join(parts), rows


# Small blocks (fewer than GROUP_BLOCK points) are encoded together, in
# groups of at most GROUP_POINTS points: enough to share the array
# operations among many small series, few enough that the joined arrays stay
# small allocations (a larger one is fresh pages from the kernel, whose
# faults cost more than the work on them). A larger block is encoded alone,
# from its own arrays (no copy).
GROUP_BLOCK = 1024
GROUP_POINTS = 8192


def _groups(blocks: Sequence[Block]) -> Iterator[tuple[int, int]]:
    """Consecutive ranges [lo, hi) of `blocks`: runs of small blocks of at
    most GROUP_POINTS points together, each larger block alone."""
    lo, n = 0, 0
    for i, b in enumerate(blocks):
        k = int(b.values.shape[0])
        if n and (n + k > GROUP_POINTS or k >= GROUP_BLOCK):
            yield lo, i
            lo, n = i, 0
        n += k
        if k >= GROUP_BLOCK:
            yield lo, i + 1
            lo, n = i + 1, 0
    if lo < len(blocks):
        yield lo, len(blocks)


# A COPY of blocks is sent in pieces of about this many bytes (whole rows):
# PostgreSQL stores the first while the service encodes the next.
COPY_CHUNK_BYTES = 256 * 1024


def encode_blocks_chunks(
    blocks: Sequence[Block],
    cuts: Sequence[list[slice]] | None = None,
    ids: Sequence[int] | None = None,
) -> Iterator[bytes]:
    """The payload of encode_blocks_copy in pieces of about COPY_CHUNK_BYTES
    (whole rows, a series at a time), each encoded when it is asked for.
    With `cuts` (split_span of each block) and `ids` (one block_id a piece,
    in order): rows of BLOCK_COLUMNS_WITH_ID."""
    parts: list[bytes | memoryview] = [COPY_HEADER]
    size = 0
    next_id = None if ids is None else iter(ids)
    for lo, hi in _groups(blocks):
        pieces = _Pieces(blocks[lo:hi], None if cuts is None else cuts[lo:hi])
        for i, n in enumerate(pieces.sizes):
            if n:
                rows = pieces.rows(i, parts, next_id)
                size += 20 * n + 160 * rows  # values, offsets and a row's fixed fields
                if size >= COPY_CHUNK_BYTES:
                    yield b"".join(parts)
                    parts, size = [], 0
    parts.append(COPY_TRAILER)
    yield b"".join(parts)


async def blocks_copy_source(
    blocks: Sequence[Block],
    cuts: Sequence[list[slice]] | None = None,
    ids: Sequence[int] | None = None,
) -> AsyncIterator[bytes]:
    """encode_blocks_chunks as the source of asyncpg's copy_to_table: each
    piece is encoded once the one before it is on the wire."""
    for chunk in encode_blocks_chunks(blocks, cuts, ids):
        yield chunk


def encode_block_rows(blocks: Sequence[Block]) -> bytes:
    """The points of `blocks` as scalar_rows rows (SCALAR_COLUMNS: time,
    series_id, step, value, hidden), one binary COPY payload: what a commit
    stores for a series with fewer than MIN_BLOCK_POINTS points."""
    n = sum(int(b.values.shape[0]) for b in blocks)
    rows = np.empty(n, dtype=SCALAR_ROW)
    rows["nfields"] = len(SCALAR_COLUMNS)
    rows["l_time"] = rows["l_sid"] = rows["l_step"] = rows["l_value"] = 8
    rows["l_hidden"] = 1
    at = 0
    for b in blocks:
        k = int(b.values.shape[0])
        part = rows[at : at + k]
        part["time"] = b.times_us
        part["sid"] = b.series_id
        part["step"] = b.steps
        part["value"] = b.values
        part["hidden"] = 0 if b.hidden is None else b.hidden
        at += k
    return COPY_HEADER + rows.tobytes() + COPY_TRAILER


def to_pg_us(times: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Wall times in seconds since the Unix epoch (float64) to PostgreSQL's
    int64 microseconds since 2000-01-01, rounded as the row layout rounds them."""
    us: np.ndarray[Any, Any] = np.subtract(times, PG_EPOCH, dtype=np.float64)  # worked in place
    us *= 1e6
    np.rint(us, out=us)
    return us.astype(np.int64)


def merge_accepted(
    parts: Sequence[tuple[int, np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]],
    last_write_wins: set[int],
) -> list[Block]:
    """One block per series from (series_id, times, steps, values) parts in
    commit order. In a series of `last_write_wins` (out of order), a step
    written twice keeps its last point visible and the earlier ones hidden."""
    return merge_taken([(sid, t, s, v, None) for sid, t, s, v in parts], last_write_wins)


def _whole(index: np.ndarray[Any, Any] | None, n: int) -> bool:
    """Whether a strictly increasing index of positions (as order.apply
    makes them) takes all n of them."""
    return index is None or index.size == n


def merge_taken(
    parts: Sequence[
        tuple[
            int,
            np.ndarray[Any, Any],
            np.ndarray[Any, Any],
            np.ndarray[Any, Any],
            np.ndarray[Any, Any] | None,
        ]
    ],
    last_write_wins: set[int],
) -> list[Block]:
    """merge_accepted of (series_id, times, steps, values, index) parts: the
    points at the increasing positions `index` (None: all) of each part's
    columns, taken straight into the series' block (one copy; none when a
    series has one part taken whole)."""
    by_series: dict[int, list[int]] = {}
    for i, part in enumerate(parts):
        by_series.setdefault(part[0], []).append(i)
    blocks: list[Block] = []
    for sid, idx in by_series.items():
        # Each part's columns and the positions to take (None: all of them).
        taken = []
        for i in idx:
            _, t, s, v, ix = parts[i]
            taken.append((t, s, v, None if _whole(ix, int(v.shape[0])) else ix))
        if len(taken) == 1 and taken[0][3] is None:
            times, steps, values, _ = taken[0]
        else:
            sizes = [int((v if ix is None else ix).shape[0]) for _, _, v, ix in taken]
            n = sum(sizes)
            times = np.empty(n, dtype=np.float64)
            steps = np.empty(n, dtype=np.int64)
            values = np.empty(n, dtype=np.float64)
            at = 0
            for (t, s, v, ix), k in zip(taken, sizes, strict=True):
                for src, dst in ((t, times), (s, steps), (v, values)):
                    if ix is None:
                        dst[at : at + k] = src
                    else:
                        np.take(src, ix, out=dst[at : at + k])
                at += k
        hidden = None
        if sid in last_write_wins and steps.size > 1:
            _, last = np.unique(steps[::-1], return_index=True)
            if last.size < steps.size:
                hidden = np.ones(steps.size, dtype=np.bool_)
                hidden[steps.size - 1 - last] = False
        blocks.append(Block(sid, to_pg_us(times), steps, values, hidden))
    return blocks
