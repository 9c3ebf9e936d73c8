"""Numeric scalar points read as numpy columns, and the chart downsampling
computed on them (issue 13, the READ path).

A block's arrays leave PostgreSQL as their binary send form
(`array_send`: a 20-byte header, then a 4-byte length and the big-endian
element for each point), which `np.frombuffer` reads with a strided dtype:
no Python object per point on either side. Measured on the bench data
(2,500 blocks, 10M points): sending the arrays costs PostgreSQL about 30-100
ns a point, which no SQL over the points beats (unnest and aggregate cost
more), so decoded blocks are kept in a bounded cache keyed by
(block_id, xmin): a block's xmin changes with every UPDATE of the row (a
rewind hiding some of its points, an edit), and block ids are never reused,
so a cached block is always the version the read's snapshot sees; a read
lists the keys of its blocks first and has only the arrays of blocks not in
the cache sent.

Write-through: the blocks a commit stores (ingest/store/points.py, its
block ids allocated ahead from scalar_blocks_id_seq) and those a compaction
makes (ingest/store/compact.py, read back in its transaction: `made_here`)
are put into the cache once their transaction committed, keyed by
(block_id, the transaction's xid: pg_current_xact_id()::xid). That xid is
the rows' xmin because no subtransaction is open when they are inserted
(pg_current_xact_id() returns the top-level xid, a row inserted in a
subtransaction carries the subtransaction's) and nothing later in that
transaction updates them (a hide runs before the commit's COPY): a later
UPDATE (a rewind, a later write of the step) gives the row another xmin,
which the next read lists and fetches. A commit runs on a pipeline worker's
thread: `publisher` hands its blocks to the loop of the reads
(call_soon_threadsafe, before the commit's acknowledgement crosses back),
so the cache and its blocks are only ever touched on that loop. The first
chart of a run being written then sends no array at all.

A cached chart costs no Python per point and little per block: a block's
visible points are kept as runs of consecutive steps (Block.visible,
derived once), a series is put in step order run by run (a point by point
sort only when a step is visible twice), and the blocks of a series read
whole are joined once into one array (Base) whose slices they keep: the next
read of the series is a slice of it, no copy. Measured on the bench data
(100 series of 100k points logged with run.log and compacted: 11,143 blocks,
5% of them compacted with two runs of steps on both sides of other blocks,
which sent the whole series to the point by point sort before): the cached
chart went from 330-365 ms to 55-60 ms in the store at load 1-2.

Block summaries (min/max value, last value, nan_count) are not used here:
they cover a whole block (4,096 points at most) and include hidden points,
while a chart bucket of 1,000 buckets over 100k points holds ~100-300
points, so nearly every block straddles bucket edges and must be unpacked
anyway (see bench/README.md, Reads).

Every read of several queries runs in one REPEATABLE READ read-only
transaction, so the rows and the blocks are seen at one snapshot (a
compaction moving rows into blocks between two queries would otherwise
lose or double points).

Why one module of this length: the cache, the assembly of blocks and rows
into step order and the downsampling share the Block layout (its runs and
joined arrays) and are tested together, against points taken one by one
(tests/unit/test_columns.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
B = npt.NDArray[np.bool_]

# Decoded blocks kept by a store, in bytes of their arrays.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024

_F8 = np.dtype([("n", ">i4"), ("v", ">f8")])
_I8 = np.dtype([("n", ">i4"), ("v", ">i8")])
_I4 = np.dtype([("n", ">i4"), ("v", ">i4")])
_BOOL = np.dtype([("n", ">i4"), ("v", "u1")])


def unpack(raw: bytes | None, element: np.dtype[Any], out: type) -> npt.NDArray[Any]:
    """A one-dimensional array without NULLs from its binary send form."""
    if raw is None:
        raise ValueError("no array")
    ndim = int.from_bytes(raw[0:4], "big")
    if ndim == 0:
        return np.empty(0, dtype=out)
    if ndim != 1 or int.from_bytes(raw[4:8], "big") != 0:
        raise ValueError("a block array must be one-dimensional without NULLs")
    cells = np.frombuffer(raw, dtype=element, offset=20)
    return cells["v"].astype(out)


@dataclass(frozen=True, slots=True)
class Runs:
    """Points in their stored order (a block's visible ones, or a series'
    rows), their steps as runs of consecutive steps: row k of `table`,
    (first, pos, count, at), is the points pos .. pos + count - 1 of the
    stored order, at steps first, first + 1, ..., held in `values` and
    `times_us` at at .. at + count - 1. `base` None: those arrays are the
    points' own (at = pos); else they are the base's, the joined points of
    the blocks read together with this one (Base)."""

    values: F64
    times_us: I64
    table: I64  # shape (runs, 4)
    base: Base | None = None

    @classmethod
    def of(cls, b: Block) -> Runs:
        if b.hidden is None and b.steps is None:
            table = np.array([[b.min_step, 0, len(b.values), 0]], dtype=np.int64)
            return cls(b.values, b.times_us, table)
        steps = (
            np.arange(b.min_step, b.max_step + 1, dtype=np.int64) if b.steps is None else b.steps
        )
        if b.hidden is None:
            return cls.of_steps(steps, b.times_us, b.values)
        keep = ~b.hidden
        return cls.of_steps(steps[keep], b.times_us[keep], b.values[keep])

    @classmethod
    def of_steps(cls, steps: I64, times_us: I64, values: F64) -> Runs:
        if len(steps) == 0:
            return cls(values, times_us, np.empty((0, 4), dtype=np.int64))
        # A run breaks where the next step is not this one + 1 (the second
        # test: int64 differences wrap, 2**63 - 1 then -2**63 differ by 1).
        cut = np.flatnonzero((np.diff(steps) != 1) | (steps[1:] <= steps[:-1])) + 1
        pos = np.concatenate((np.zeros(1, dtype=np.int64), cut.astype(np.int64)))
        count = np.diff(np.append(pos, len(steps)))
        return cls(values, times_us, np.stack([steps[pos], pos, count, pos], axis=1))

    def own(self) -> Runs:
        """The same points in arrays of their own (out of their base)."""
        if self.base is None:
            return self
        t = self.table
        if len(t) == 0:
            return Runs(np.empty(0), np.empty(0, dtype=np.int64), t)
        parts = [(int(a), int(a + n)) for a, n in zip(t[:, 3], t[:, 2], strict=True)]
        values = np.concatenate([self.values[a:b] for a, b in parts])
        times = np.concatenate([self.times_us[a:b] for a, b in parts])
        table = t.copy()
        table[:, 3] = table[:, 1]
        return Runs(values, times, table)


@dataclass(eq=False, slots=True)
class Base:
    """The visible points of the blocks of one series read together, joined
    in step order: each member's runs are ranges of these arrays (its own
    arrays freed), so the next read of those blocks takes them as one slice,
    no copy. A member read again into another base leaves this one, and the
    members left then take arrays of their own (Block.rebase): a base holds
    no point of a block that is not its member. BlockCache evicts a base's
    members together (they were read together), which frees it."""

    values: F64
    times_us: I64
    members: weakref.WeakValueDictionary[int, Block]


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Block:
    """A block's points as arrays, in their stored order: the times in
    microseconds since the epoch. `steps` None: the steps are min_step,
    min_step + 1, ..., max_step; `hidden` None: none is hidden."""

    min_step: int
    max_step: int
    values: F64
    times_us: I64
    steps: I64 | None
    hidden: B | None
    # The visible points as runs of consecutive steps (Block.visible),
    # derived once per block, when first read.
    _runs: Runs | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        extra = (0 if self.steps is None else self.steps.nbytes) + (
            0 if self.hidden is None else self.hidden.nbytes
        )
        if self.hidden is not None or self.steps is not None:
            # The visible points' copies (Block.visible, or in a Base).
            extra += self.values.nbytes + self.times_us.nbytes
        return self.values.nbytes + self.times_us.nbytes + extra + 160

    def visible(self) -> Runs:
        """The block's visible points (hidden ones left out, stored order
        kept) and their steps as runs of consecutive steps: computed once,
        kept with the block (a cached block is read by every chart)."""
        runs = self._runs
        if runs is None:
            runs = Runs.of(self)
            object.__setattr__(self, "_runs", runs)
        return runs

    def rebase(self, runs: Runs) -> None:
        """Take `runs` (the same points, other arrays) as this block's own; a
        block of consecutive steps without hidden points also takes them as
        its values and times (its old arrays freed)."""
        object.__setattr__(self, "_runs", runs)
        if self.hidden is None and self.steps is None:
            at, n = int(runs.table[0, 3]), int(runs.table[0, 2])
            object.__setattr__(self, "values", runs.values[at : at + n])
            object.__setattr__(self, "times_us", runs.times_us[at : at + n])

    @classmethod
    def written(cls, steps: I64, times_us: I64, values: F64, hidden: B | None = None) -> Block:
        """A block as a read would decode it, from the points a writer stored
        in it (its arrays copied: the writer's may be views of larger ones):
        the steps implied when they are consecutive, no mask without a
        hidden point (Block.of's rules)."""
        lo, hi = int(steps[0]), int(steps[-1])
        n = len(steps)
        consecutive = hi - lo + 1 == n and (n == 1 or bool((np.diff(steps) == 1).all()))
        if not consecutive:
            lo, hi = int(steps.min()), int(steps.max())
        return cls(
            min_step=lo,
            max_step=hi,
            values=np.array(values, dtype=np.float64),
            times_us=np.array(times_us, dtype=np.int64),
            steps=None if consecutive else np.array(steps, dtype=np.int64),
            hidden=None if hidden is None or not hidden.any() else np.array(hidden, np.bool_),
        )

    @classmethod
    def of(cls, r: Any) -> Block:
        offsets = unpack(r["o"], _I4, np.int64)
        offsets += int(r["t0"])
        lo, hi = int(r["min_step"]), int(r["max_step"])
        steps = None if r["s"] is None else unpack(r["s"], _I8, np.int64)
        # Steps stored although they are lo, lo + 1, ..., hi (a compacted
        # block) are implied here, so the block joins the fast path.
        if steps is not None and hi - lo + 1 == len(steps) and bool((np.diff(steps) == 1).all()):
            steps = None
        hidden = None if r["h"] is None else unpack(r["h"], _BOOL, np.bool_)
        if hidden is not None and not hidden.any():
            hidden = None
        return cls(
            min_step=lo,
            max_step=hi,
            values=unpack(r["v"], _F8, np.float64),
            times_us=offsets,
            steps=steps,
            hidden=hidden,
        )


class BlockCache:
    """Decoded blocks by (block_id, xmin), least recently used first out,
    within a bound in bytes (0: no cache)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._blocks: OrderedDict[tuple[int, int], Block] = OrderedDict()
        self._key_of: dict[int, tuple[int, int]] = {}  # by id(block), the blocks held

    def get(self, key: tuple[int, int]) -> Block | None:
        got = self._blocks.get(key)
        if got is not None:
            self._blocks.move_to_end(key)
        return got

    def get_many(self, keys: Iterable[tuple[int, int]]) -> list[Block | None]:
        """get of each key, in order."""
        blocks, touch = self._blocks, self._blocks.move_to_end
        out: list[Block | None] = []
        for key in keys:
            got = blocks.get(key)
            if got is not None:
                touch(key)
            out.append(got)
        return out

    def keys(self) -> list[tuple[int, int]]:
        return list(self._blocks)

    def put_many(self, items: Iterable[tuple[tuple[int, int], Block]]) -> None:
        """put of each (key, block): the blocks a commit or a compaction
        just stored (write-through, after their transaction committed)."""
        for key, block in items:
            self.put(key, block)

    def put(self, key: tuple[int, int], block: Block) -> None:
        size = block.nbytes
        if size > self.max_bytes or key in self._blocks:
            return
        self._blocks[key] = block
        self._key_of[id(block)] = key
        self.used += size
        while self.used > self.max_bytes and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self._dropped(old)
            # The blocks read together with it (a Base) go with it.
            base = old.visible().base if old._runs is not None else None
            for mate in [] if base is None else list(base.members.values()):
                k = self._key_of.get(id(mate))
                if k is not None and self._blocks.get(k) is mate:
                    del self._blocks[k]
                    self._dropped(mate)

    def _dropped(self, block: Block) -> None:
        self.used -= block.nbytes
        self._key_of.pop(id(block), None)


@dataclass(frozen=True, slots=True)
class Points:
    """Numeric scalar points, in step order: steps, times (microseconds
    since the epoch) and values."""

    steps: I64
    times_us: I64
    values: F64

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def times(self) -> F64:
        """Epoch seconds, as the SQL reads give them (extract(epoch ...)::float8):
        the division is correctly rounded, like PostgreSQL's numeric to float8."""
        return self.times_us / 1e6

    def take(self, index: npt.NDArray[np.intp]) -> Points:
        return Points(self.steps[index], self.times_us[index], self.values[index])


@dataclass(frozen=True, slots=True)
class Gathered:
    """A series' visible points in a step range, in step order, as read: the
    values in one array; the steps in one array, or None when they are
    first_step, first_step + 1, ...; the times in consecutive chunks (one per
    block), joined only for the points a read returns."""

    values: F64
    steps: I64 | None
    first_step: int
    times: Sequence[I64]
    # With steps None: the steps as runs of consecutive steps (the index in
    # `values` where each run starts, ascending from 0, and its first step);
    # None: one run, first_step, first_step + 1, ...
    runs: tuple[I64, I64] | None = None

    def __len__(self) -> int:
        return len(self.values)

    def steps_at(self, index: npt.NDArray[np.intp]) -> I64:
        if self.steps is not None:
            return self.steps[index]
        if self.runs is None:
            return self.first_step + index.astype(np.int64)
        out, first = self.runs
        k = np.searchsorted(out, index, "right") - 1
        return first[k] + (index.astype(np.int64) - out[k])

    def start_of(self, step: int) -> int:
        """The index of the first point at `step` or after (len: none)."""
        if self.steps is not None:
            return int(self.steps.searchsorted(step, "left"))
        if self.runs is None:
            return min(max(0, step - self.first_step), len(self))
        out, first = self.runs
        k = int(first.searchsorted(step, "right")) - 1
        if k < 0:
            return 0
        end = int(out[k + 1]) if k + 1 < len(out) else len(self)
        return min(int(out[k]) + step - int(first[k]), end)

    def take(self, index: npt.NDArray[np.intp]) -> Points:
        """The points at these indices (ascending)."""
        steps = self.steps_at(index)
        if len(self.times) == 1:
            times = self.times[0][index]
        else:
            # The chunks as consecutive index ranges: the indices (ascending)
            # of each chunk are one slice of `index`.
            bounds = np.cumsum([0] + [len(t) for t in self.times])
            cuts = np.searchsorted(index, bounds, "left").tolist()
            times = np.empty(len(index), dtype=np.int64)
            base = bounds.tolist()
            for k, chunk in enumerate(self.times):
                a, b = cuts[k], cuts[k + 1]
                if b > a:
                    times[a:b] = chunk[index[a:b] - base[k]]
        return Points(steps, times, self.values[index])

    def all(self) -> Points:
        return self.take(np.arange(len(self), dtype=np.intp))


# The blocks of the series in a step range, by (block_id, xmin), a series a
# row in min_step order: only the keys; the arrays of those not in the cache
# come from _SEND (one snapshot).
_LIST = """
SELECT b.series_id, array_agg(b.block_id ORDER BY b.min_step, b.block_id) AS b,
       array_agg(b.xmin::text::bigint ORDER BY b.min_step, b.block_id) AS x
FROM scalar_blocks b
WHERE b.series_id = ANY($1::bigint[]) AND b.max_step >= $2::bigint AND b.min_step <= $3::bigint
  AND b.hidden_count < b.n
GROUP BY b.series_id
"""

_SEND = """
SELECT b.block_id, b.xmin::text::bigint AS x, b.min_step, b.max_step,
       (extract(epoch FROM b.min_time) * 1000000)::bigint AS t0,
       array_send(b.values) AS v, array_send(b.offsets) AS o,
       array_send(b.steps) AS s, array_send(b.hidden) AS h
FROM scalar_blocks b JOIN unnest($4::bigint[]) AS m(id) ON m.id = b.block_id
WHERE b.series_id = ANY($1::bigint[]) AND b.max_step >= $2::bigint AND b.min_step <= $3::bigint
"""

# The blocks of these series this transaction stored (their xmin is its
# xid; a transaction without subtransactions, as the compaction's): what a
# compaction just made, decoded for the cache once it commits.
_MADE = """
SELECT b.block_id, b.xmin::text::bigint AS x, b.min_step, b.max_step,
       (extract(epoch FROM b.min_time) * 1000000)::bigint AS t0,
       array_send(b.values) AS v, array_send(b.offsets) AS o,
       array_send(b.steps) AS s, array_send(b.hidden) AS h
FROM scalar_blocks b
WHERE b.series_id = ANY($1::bigint[]) AND b.xmin = pg_current_xact_id()::xid
"""

_ROWS = """
SELECT series_id,
       array_send(array_agg(step ORDER BY step, time)) AS s,
       array_send(array_agg((extract(epoch FROM time) * 1000000)::bigint ORDER BY step, time)) AS t,
       array_send(array_agg(value ORDER BY step, time)) AS v
FROM scalar_rows
WHERE series_id = ANY($1::bigint[]) AND NOT hidden AND step >= $2::bigint AND step <= $3::bigint
GROUP BY series_id
"""


# The blocks of one page of a full-resolution read: scalar_points_page's
# choice (migration 010) of the blocks that can hold the first $8 visible
# points from the resume position ($6, $7) in (series_id, step) order, with
# the arrays of those not in the cache ($4, $5).
_PAGE_BLOCKS = """
WITH c AS (
    SELECT b.series_id, b.block_id, b.xmin, b.min_step, b.max_step, b.min_time,
           b.values, b.offsets, b.steps, b.hidden,
           sum(CASE WHEN b.min_step >= $2::bigint AND b.max_step <= $3::bigint
                     AND (b.series_id > $6::bigint OR b.min_step >= $7::bigint)
                    THEN b.n - b.hidden_count ELSE 0 END)
               OVER (ORDER BY b.series_id, b.min_step, b.block_id) AS upto
    FROM scalar_blocks b
    WHERE b.series_id = ANY($1::bigint[]) AND b.max_step >= $2::bigint
      AND b.min_step <= $3::bigint AND (b.series_id, b.max_step) >= ($6::bigint, $7::bigint)
      AND b.hidden_count < b.n
), k AS (
    SELECT c.series_id, c.upto FROM c WHERE c.upto >= $8::bigint
    ORDER BY c.series_id, c.min_step, c.block_id LIMIT 1
), x AS (
    SELECT k.series_id AS sid,
           (SELECT max(c.max_step) FROM c WHERE c.series_id = k.series_id AND c.upto <= k.upto)
           AS step
    FROM k
)
SELECT c.series_id, c.block_id, c.xmin::text::bigint AS x, c.min_step, c.max_step,
       (extract(epoch FROM c.min_time) * 1000000)::bigint AS t0,
       CASE WHEN h.id IS NULL THEN array_send(c.values) END AS v,
       CASE WHEN h.id IS NULL THEN array_send(c.offsets) END AS o,
       CASE WHEN h.id IS NULL THEN array_send(c.steps) END AS s,
       CASE WHEN h.id IS NULL THEN array_send(c.hidden) END AS h
FROM c LEFT JOIN x ON true
LEFT JOIN unnest($4::bigint[], $5::bigint[]) AS h(id, x)
  ON h.id = c.block_id AND h.x = c.xmin::text::bigint
WHERE x.sid IS NULL OR c.series_id < x.sid OR (c.series_id = x.sid AND c.min_step <= x.step)
ORDER BY c.series_id, c.min_step, c.block_id
"""

# The first $6 visible rows of a page from the resume position ($4, $5).
_PAGE_ROWS = """
SELECT series_id,
       array_send(array_agg(step ORDER BY step, time)) AS s,
       array_send(array_agg((extract(epoch FROM time) * 1000000)::bigint ORDER BY step, time)) AS t,
       array_send(array_agg(value ORDER BY step, time)) AS v
FROM (SELECT series_id, step, time, value FROM scalar_rows
      WHERE series_id = ANY($1::bigint[]) AND NOT hidden AND step >= $2::bigint
        AND step <= $3::bigint AND (series_id, step) >= ($4::bigint, $5::bigint)
      ORDER BY series_id, step LIMIT $6::bigint) r
GROUP BY series_id
"""


_NONE: Gathered = Gathered(np.empty(0, np.float64), None, 0, [np.empty(0, np.int64)])


async def read_points(
    conns: Sequence[asyncpg.Connection],
    series_ids: Sequence[int],
    start: int,
    end: int,
    cache: BlockCache,
) -> dict[int, Gathered]:
    """The visible points of each series with a step in [start, end], in
    step order (rows and blocks, one snapshot), by series id (read_parts)."""
    found, loose = await read_parts(conns, series_ids, start, end, cache)
    return {
        sid: assemble(found.get(sid, []), loose.get(sid), start, end)
        for sid in sorted(set(series_ids))
    }


Parts = tuple[dict[int, list[Block]], dict[int, tuple[I64, I64, F64]]]


async def read_parts(
    conns: Sequence[asyncpg.Connection],
    series_ids: Sequence[int],
    start: int,
    end: int,
    cache: BlockCache,
) -> Parts:
    """The blocks (in min_step order) and the visible rows of each series
    with a step in [start, end], one snapshot, by series id: `assemble`
    makes a series' points of them. The blocks' keys are listed first and
    only the arrays of those not in the cache are sent. With several
    connections, the series are shared among them and read at once, every
    connection in the first one's snapshot (pg_export_snapshot): sending the
    arrays is PostgreSQL's work, and one backend does it on one core."""
    ids = sorted(set(series_ids))
    groups = [g for g in (ids[i :: len(conns)] for i in range(len(conns))) if g]
    lead = conns[0]

    async def fetch(conn: asyncpg.Connection, group: list[int]) -> dict[int, list[Block]]:
        listed = {int(r[0]): (r[1], r[2]) for r in await conn.fetch(_LIST, group, start, end)}
        found = {sid: cache.get_many(zip(b, x, strict=True)) for sid, (b, x) in listed.items()}
        missing = [
            bid
            for sid, blocks in found.items()
            for bid, blk in zip(listed[sid][0], blocks, strict=True)
            if blk is None
        ]
        if missing:
            sent = {
                int(r["block_id"]): r for r in await conn.fetch(_SEND, group, start, end, missing)
            }
            for sid, blocks in found.items():
                for i, (bid, x) in enumerate(zip(*listed[sid], strict=True)):
                    if blocks[i] is None:
                        r = sent.get(bid)
                        if r is None or int(r["x"]) != x:  # one snapshot: cannot happen
                            raise RuntimeError(f"block {bid} changed within a read's snapshot")
                        block = Block.of(r)
                        cache.put((bid, x), block)
                        blocks[i] = block
        return {sid: [b for b in blocks if b is not None] for sid, blocks in found.items()}

    async def beside(
        conn: asyncpg.Connection, group: list[int], snapshot: str
    ) -> dict[int, list[Block]]:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            return await fetch(conn, group)

    async with lead.transaction(isolation="repeatable_read", readonly=True):
        if len(groups) > 1:
            snapshot = str(await lead.fetchval("SELECT pg_export_snapshot()"))
            parts = await asyncio.gather(
                fetch(lead, groups[0]),
                *(beside(c, g, snapshot) for c, g in zip(conns[1:], groups[1:], strict=False)),
            )
        else:
            parts = [await fetch(lead, ids)]
        rows = await lead.fetch(_ROWS, ids, start, end)
    found: dict[int, list[Block]] = {}
    for part in parts:
        found.update(part)
    return found, _rows_of(rows)


Written = list[tuple[tuple[int, int], Block]]


async def made_here(conn: asyncpg.Connection, series_ids: Sequence[int]) -> list[Any]:
    """The blocks of `series_ids` the transaction open on `conn` stored, as
    sent (decoded by `decoded` once it committed, not before: a transaction
    rolled back stored nothing)."""
    return list(await conn.fetch(_MADE, list(series_ids)))


def decoded(records: Sequence[Any]) -> Written:
    """Blocks as sent (_MADE, _SEND), decoded, by cache key, for
    BlockCache.put_many; their visible runs derived here rather than by the
    first read."""
    out: Written = []
    for r in records:
        block = Block.of(r)
        block.visible()
        out.append(((int(r["block_id"]), int(r["x"])), block))
    return out


def publisher(cache: BlockCache, loop: asyncio.AbstractEventLoop) -> Callable[[Written], None]:
    """Hands the blocks a commit stored to `cache` on `loop`, the loop of
    every read (a commit runs on a worker thread of its own: the cache and
    its blocks are only touched on one loop). Never raises: a commit that
    happened must not fail for its cache (a closed loop drops them)."""

    def publish(items: Written) -> None:
        if items:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(cache.put_many, items)

    return publish


async def read_page(
    conn: asyncpg.Connection,
    series_ids: Sequence[int],
    start: int,
    end: int,
    after: tuple[int, int],
    room: int,
    cache: BlockCache,
) -> tuple[dict[int, Points], tuple[int, int] | None]:
    """One page of a full-resolution read: the first `room` visible points
    with a step in [start, end] from `after` = (series_id, step) on,
    inclusive, in (series_id, step) order, by series (series without points
    in the page left out), and where the next page starts (None: the end).
    Only the blocks that can hold those points (and the next one) are read."""
    ids = sorted(set(series_ids))
    known = cache.keys()
    lim = room + 1
    a_sid, a_step = after
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        blocks = await conn.fetch(
            _PAGE_BLOCKS,
            ids,
            start,
            end,
            [k[0] for k in known],
            [k[1] for k in known],
            a_sid,
            a_step,
            lim,
        )
        rows = await conn.fetch(_PAGE_ROWS, ids, start, end, a_sid, a_step, lim)
    found = _blocks_of(blocks, cache)
    loose = _rows_of(rows)
    out: dict[int, Points] = {}
    left = lim
    nxt: tuple[int, int] | None = None
    for sid in ids:
        if sid < a_sid or left <= 0:
            continue
        g = assemble(found.get(sid, []), loose.get(sid), start, end)
        first = g.start_of(a_step) if sid == a_sid and len(g) else 0
        count = min(max(len(g) - first, 0), left)
        if count <= 0:
            continue
        got = g.take(np.arange(first, first + count, dtype=np.intp))
        left -= count
        if left == 0:  # the last point read is where the next page starts
            nxt = (sid, int(got.steps[-1]))
            got = got.take(np.arange(count - 1, dtype=np.intp))
        if len(got):
            out[sid] = got
    return out, nxt


def _blocks_of(records: Sequence[Any], cache: BlockCache) -> dict[int, list[Block]]:
    """Blocks by series, decoded or from the cache (their arrays not sent)."""
    found: dict[int, list[Block]] = {}
    for r in records:
        key = (int(r["block_id"]), int(r["x"]))
        block = cache.get(key) if r["v"] is None else None
        if block is None:
            block = Block.of(r)
            cache.put(key, block)
        found.setdefault(int(r["series_id"]), []).append(block)
    return found


def _rows_of(records: Sequence[Any]) -> dict[int, tuple[I64, I64, F64]]:
    return {
        int(r["series_id"]): (
            unpack(r["s"], _I8, np.int64),
            unpack(r["t"], _I8, np.int64),
            unpack(r["v"], _F8, np.float64),
        )
        for r in records
    }


def assemble(
    blocks: Sequence[Block], rows: tuple[I64, I64, F64] | None, start: int, end: int
) -> Gathered:
    """A series' visible points in [start, end] in step order, from its
    blocks (in min_step order) and its visible rows in the range."""
    if not blocks and rows is None:
        return _NONE
    got = _by_runs(blocks, rows, start, end)
    if got is not None:
        return got
    # Runs that overlap (a step visible twice): every point sorted by step.
    parts: list[tuple[I64, I64, F64]] = []
    for b in blocks:
        steps = (
            np.arange(b.min_step, b.max_step + 1, dtype=np.int64) if b.steps is None else b.steps
        )
        keep = (steps >= start) & (steps <= end)
        if b.hidden is not None:
            keep &= ~b.hidden
        if keep.all():
            parts.append((steps, b.times_us, b.values))
        else:
            parts.append((steps[keep], b.times_us[keep], b.values[keep]))
    if rows is not None:
        parts.append(rows)
    all_steps = np.concatenate([p[0] for p in parts])
    times = np.concatenate([p[1] for p in parts])
    values = np.concatenate([p[2] for p in parts])
    if len(all_steps) > 1 and bool((all_steps[1:] < all_steps[:-1]).any()):
        order = np.argsort(all_steps, kind="stable")
        all_steps, times, values = all_steps[order], times[order], values[order]
    return Gathered(values, all_steps, 0, [times])


def _by_runs(
    blocks: Sequence[Block], rows: tuple[I64, I64, F64] | None, start: int, end: int
) -> Gathered | None:
    """assemble's points from the runs of consecutive steps of every block's
    visible points (Block.visible, kept with a cached block) and of the rows:
    the runs cut to [start, end] and put in step order, then runs that follow
    each other in one array taken as one slice, the slices joined. None when
    two runs overlap (the same step visible twice: assemble's point by point
    sort decides their order). Blocks read whole and joined become members
    of one Base (their points there, in step order): the next read of them
    is one slice, no copy."""
    sources = [b.visible() for b in blocks]
    if rows is not None:
        sources.append(Runs.of_steps(*rows))
    arrays: dict[int, int] = {}  # id(values) -> tag
    tags = [arrays.setdefault(id(r.values), len(arrays)) for r in sources]
    table = np.concatenate([r.table for r in sources])
    first, count, at = table[:, 0], table[:, 2], table[:, 3]
    tag = np.repeat(np.array(tags, dtype=np.int64), [len(r.table) for r in sources])
    last = first + (count - 1)
    lo, hi = np.maximum(first, start), np.minimum(last, end)
    whole = rows is None and bool((lo == first).all()) and bool((hi == last).all())
    inside = lo <= hi
    if not bool(inside.all()):
        lo, hi, first, at, tag = lo[inside], hi[inside], first[inside], at[inside], tag[inside]
    if len(lo) == 0:
        return _NONE
    at = at + (lo - first)
    order = np.argsort(lo, kind="stable")
    first, last, at, tag = lo[order], hi[order], at[order], tag[order]
    count = last - first + 1
    if len(first) > 1 and not bool((first[1:] > last[:-1]).all()):
        return None
    heads = np.ones(len(first), dtype=bool)
    heads[1:] = (tag[1:] != tag[:-1]) | (at[1:] != at[:-1] + count[:-1])
    cut = np.flatnonzero(heads)
    by_tag = {t: r for t, r in zip(tags, sources, strict=True)}
    values: list[F64] = []
    times: list[I64] = []
    sizes = np.add.reduceat(count, cut).tolist()
    slices = zip(tag[cut].tolist(), at[cut].tolist(), sizes, strict=True)
    for t, a, n in slices:
        r = by_tag[t]
        if a == 0 and n == len(r.values):
            values.append(r.values)
            times.append(r.times_us)
        else:
            values.append(r.values[a : a + n])
            times.append(r.times_us[a : a + n])
    out = np.cumsum(count) - count
    if len(values) == 1:
        joined, when = values[0], times
    else:
        # The times joined too: one copy costs less than a look-up per chunk
        # of the points a read returns (one chunk a block, ~100 a series).
        joined, when = np.concatenate(values), [np.concatenate(times)]
        if whole and blocks:
            _rejoin(blocks, sources, joined, when[0], out, order)
    if len(first) == 1 or bool((first[1:] == last[:-1] + 1).all()):
        return Gathered(joined, None, int(first[0]), when)
    return Gathered(joined, None, int(first[0]), when, (out, first))


def _rejoin(
    blocks: Sequence[Block],
    sources: Sequence[Runs],
    values: F64,
    times: I64,
    out: I64,
    order: npt.NDArray[np.intp],
) -> None:
    """Make `blocks`, read whole and joined into `values` and `times` (their
    runs, in the order `order`, start at `out`), the members of one Base;
    unless that would leave behind, in the bases they are members of, other
    blocks of more than a quarter of their points (those would be copied out:
    a page of a long series read after its chart would undo the chart's
    base, and the next chart the page's)."""
    olds = {id(r.base): r.base for r in sources if r.base is not None}
    if olds:
        mine = {id(b) for b in blocks}
        behind = sum(
            int(m.visible().table[:, 2].sum())
            for old in olds.values()
            for m in old.members.values()
            if id(m) not in mine
        )
        if 4 * behind > len(values):
            return
    base = Base(values, times, weakref.WeakValueDictionary())
    at = np.empty(len(out), dtype=np.int64)
    at[order] = out
    for b in blocks:
        for old in olds.values():
            old.members.pop(id(b), None)
    k = 0
    for b, r in zip(blocks, sources, strict=False):
        table = r.table.copy()
        table[:, 3] = at[k : k + len(table)]
        k += len(table)
        b.rebase(Runs(values, times, table, base))
        base.members[id(b)] = b
    # Blocks of an earlier base not read here take arrays of their own.
    for old in olds.values():
        for left in list(old.members.values()):
            left.rebase(left.visible().own())
        old.members.clear()


def downsample(points: Gathered, max_points: int) -> Points:
    """The chart downsampling of numeric scalars (query_service.proto,
    ReadSeriesRequest.max_points), on points in step order:

    - buckets: the points split into B = max(1, max_points // 3) buckets of
      equal point counts, in step order (PostgreSQL's ntile(B): the first
      N mod B buckets hold one point more; with N < B, a bucket a point);
    - each bucket offers its first NaN, the first point holding its largest
      non-NaN value, the first holding its smallest (so +Inf and -Inf
      survive: they are the extremes of their bucket), and its first point;
    - a point offered twice counts once, with its better reason; when the
      offers are more than max_points, they are kept by reason (NaN, largest,
      smallest, first), then bucket, then step, and the first max_points
      kept;
    - the kept points are returned in step order.

    With max_points 0 or N <= max_points, every point is returned. The same
    as the SQL of queries._DOWNSAMPLE_EXTREMES (tests/unit/test_columns.py
    compares them), in two passes over the values for buckets without NaN."""
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return points.all()
    buckets = max(1, max_points // 3)
    v = points.values
    if n < buckets:  # a bucket a point
        size, big = 1, n
    else:
        q, r = divmod(n, buckets)
        size, big = q + 1, r * (q + 1)
    # The buckets as two rectangles: `r` buckets of q + 1 points, then the
    # others of q points (or, with N < B, N buckets of one point).
    offers: list[npt.NDArray[np.int64]] = []
    for lo_i, hi_i, width in ((0, big, size), (big, n, size - 1)):
        if hi_i > lo_i and width > 0:
            offers.append(_offers(v[lo_i:hi_i], width, lo_i))
    found = np.concatenate(offers, axis=1)  # rows: NaN, largest, smallest, first
    prio = np.repeat(np.arange(4, dtype=np.int64), found.shape[1])
    cand = found.reshape(-1)
    real = cand >= 0
    cand, prio = cand[real], prio[real]
    # One offer per point: its best reason.
    order = np.lexsort((prio, cand))
    cand, prio = cand[order], prio[order]
    first = np.ones(len(cand), dtype=bool)
    first[1:] = cand[1:] != cand[:-1]
    cand, prio = cand[first], prio[first]
    if len(cand) > max_points:
        # By reason, then bucket, then step (the point's index orders both).
        keep = np.lexsort((cand, prio))[:max_points]
        cand = np.sort(cand[keep])
    return points.take(cand.astype(np.intp))


def _offers(v: F64, width: int, base: int) -> npt.NDArray[np.int64]:
    """For buckets of `width` consecutive points (v holds a whole number of
    them, its first at index `base`): rows of point indices, -1 for none:
    each bucket's first NaN, first largest non-NaN, first smallest non-NaN,
    and first point."""
    m = len(v) // width
    vv = v.reshape(m, width)
    starts = base + np.arange(m, dtype=np.int64) * width
    rows = np.arange(m)
    # argmin and argmax give the first index of the extreme, or of the first
    # NaN when the bucket holds one: only those buckets are looked at again.
    i_lo = vv.argmin(axis=1)
    i_hi = vv.argmax(axis=1)
    i_nan = np.full(m, -1, dtype=np.int64)
    has_num = np.ones(m, dtype=bool)
    ks = np.flatnonzero(np.isnan(vv[rows, i_lo]))
    if len(ks):
        # The buckets holding a NaN, all at once: the first NaN, and the
        # first point equal to the bucket's smallest (largest) non-NaN value
        # (fmin/fmax skip NaN; equal compares -0.0 and 0.0 alike, as argmin).
        sub = vv[ks]
        nn = np.isnan(sub)
        i_nan[ks] = nn.argmax(axis=1)
        has_num[ks] = ~nn.all(axis=1)
        lo = np.fmin.reduce(sub, axis=1)
        hi = np.fmax.reduce(sub, axis=1)
        i_lo[ks] = (sub == lo[:, None]).argmax(axis=1)
        i_hi[ks] = (sub == hi[:, None]).argmax(axis=1)
    return np.stack(
        [
            np.where(i_nan >= 0, starts + i_nan, -1),
            np.where(has_num, starts + i_hi, -1),
            np.where(has_num, starts + i_lo, -1),
            starts,
        ]
    )
