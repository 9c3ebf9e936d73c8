"""The numpy read path of numeric scalars (ingest/store/columns.py): the
binary arrays PostgreSQL sends decode bit for bit, a series is assembled
from blocks and rows with hidden points and out-of-range steps left out, the
block cache stays within its bound, and the downsampling equals the
documented rule (query_service.proto, ReadSeriesRequest.max_points) computed
point by point in plain Python."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest

from ingest.store.columns import Block, BlockCache, Gathered, assemble, downsample, unpack

_F8 = np.dtype([("n", ">i4"), ("v", ">f8")])
_I8 = np.dtype([("n", ">i4"), ("v", ">i8")])
_I4 = np.dtype([("n", ">i4"), ("v", ">i4")])
_BOOL = np.dtype([("n", ">i4"), ("v", "u1")])


def send(fmt: str, oid: int, items: list[object]) -> bytes:
    """An array's binary send form, as PostgreSQL's array_send writes it."""
    if not items:
        return struct.pack(">iii", 0, 0, oid)
    size = struct.calcsize(">" + fmt)
    out = [struct.pack(">iiiii", 1, 0, oid, len(items), 1)]
    out += [struct.pack(">i" + fmt, size, x) for x in items]
    return b"".join(out)


def test_unpack_reads_postgres_binary_arrays_bit_for_bit() -> None:
    values = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.5, -2.25e300]
    got = unpack(send("d", 701, values), _F8, np.float64)
    assert [struct.pack("<d", x) for x in got] == [struct.pack("<d", x) for x in values]
    steps = [-(2**63), 0, 2**63 - 1]
    assert unpack(send("q", 20, steps), _I8, np.int64).tolist() == steps
    assert unpack(send("i", 23, [0, 2**31 - 1]), _I4, np.int32).tolist() == [0, 2**31 - 1]
    assert unpack(send("?", 16, [True, False]), _BOOL, np.bool_).tolist() == [True, False]
    assert len(unpack(send("d", 701, []), _F8, np.float64)) == 0
    nulls = struct.pack(">iiiii", 1, 1, 701, 1, 1) + struct.pack(">i", -1)
    with pytest.raises(ValueError, match="without NULLs"):
        unpack(nulls, _F8, np.float64)


def block(
    min_step: int,
    values: list[float],
    steps: list[int] | None = None,
    hidden: list[bool] | None = None,
    t0: int = 1_000_000,
) -> Block:
    n = len(values)
    return Block(
        min_step=min_step if steps is None else min(steps),
        max_step=min_step + n - 1 if steps is None else max(steps),
        values=np.array(values, dtype=np.float64),
        times_us=t0 + np.arange(n, dtype=np.int64) * 10,
        steps=None if steps is None else np.array(steps, dtype=np.int64),
        hidden=None if hidden is None else np.array(hidden, dtype=bool),
    )


def test_assemble_joins_consecutive_blocks_without_copying_steps() -> None:
    got = assemble([block(0, [1.0, 2.0]), block(2, [3.0])], None, -10, 10)
    assert got.steps is None and got.first_step == 0
    pts = got.all()
    assert pts.steps.tolist() == [0, 1, 2]
    assert pts.values.tolist() == [1.0, 2.0, 3.0]
    assert pts.times_us.tolist() == [1_000_000, 1_000_010, 1_000_000]


def test_assemble_leaves_out_hidden_points_and_steps_outside_the_range() -> None:
    # An out-of-order series: overlapping blocks, unsorted steps, a hidden
    # point inside a block, and rows beside them (the query gives only the
    # visible rows in the range).
    a = block(0, [0.0, 1.0, 2.0, 3.0], hidden=[False, True, False, False])
    b = block(0, [40.0, 10.0, 20.0], steps=[4, 1, 2], hidden=[False, False, True], t0=5)
    rows = (
        np.array([5, 6], dtype=np.int64),
        np.array([70, 80], dtype=np.int64),
        np.array([50.0, 70.0]),
    )
    pts = assemble([a, b], rows, 1, 6).all()
    assert pts.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert pts.values.tolist() == [10.0, 2.0, 3.0, 40.0, 50.0, 70.0]
    assert pts.times_us.tolist() == [15, 1_000_020, 1_000_030, 5, 70, 80]


def test_the_cache_keeps_its_bound_and_drops_the_least_recently_used() -> None:
    one = block(0, [1.0] * 100)
    cache = BlockCache(max_bytes=one.nbytes * 2)
    cache.put((1, 1), one)
    cache.put((2, 1), one)
    assert cache.get((1, 1)) is one  # (1, 1) is now the most recently used
    cache.put((3, 1), one)
    assert cache.get((2, 1)) is None and cache.get((1, 1)) is one
    assert cache.used <= cache.max_bytes
    # Another version of a block (its xmin changed) is another key.
    assert cache.get((1, 2)) is None
    BlockCache(max_bytes=0).put((1, 1), one)  # no cache: nothing kept, no error


def reference(values: list[float], max_points: int) -> list[int]:
    """The documented rule, point by point: the indices kept."""
    n = len(values)
    if max_points <= 0 or n <= max_points:
        return list(range(n))
    nb = max(1, max_points // 3)
    q, r = divmod(n, nb)
    bucket: list[int] = []
    for b in range(min(nb, n)):
        bucket += [b] * (q + 1 if b < r else q) if n >= nb else [b]
    offers: dict[int, int] = {}
    for b in sorted(set(bucket)):
        idx = [i for i in range(n) if bucket[i] == b]
        nums = [i for i in idx if not math.isnan(values[i])]
        nans = [i for i in idx if math.isnan(values[i])]
        mine = []
        if nans:
            mine.append((nans[0], 0))
        if nums:
            hi = max(values[i] for i in nums)
            lo = min(values[i] for i in nums)
            mine.append((next(i for i in nums if values[i] == hi), 1))
            mine.append((next(i for i in nums if values[i] == lo), 2))
        mine.append((idx[0], 3))
        for i, prio in mine:
            offers[i] = min(prio, offers.get(i, 9))
    ranked = sorted(offers, key=lambda i: (offers[i], bucket[i], i))
    return sorted(ranked[:max_points])


SPECIALS = [math.nan, math.inf, -math.inf, -0.0, 0.0]


@pytest.mark.parametrize("seed", range(40))
def test_downsampling_equals_the_rule_computed_point_by_point(seed: int) -> None:
    rnd = random.Random(seed)
    n = rnd.choice([1, 2, 5, 17, 100, 333, 1000, 2500])
    pick = rnd.random()
    values = [
        rnd.choice(SPECIALS) if rnd.random() < pick * 0.3 else float(rnd.randint(-5, 5))
        for _ in range(n)
    ]
    if seed % 7 == 0:  # whole buckets of NaN or of one infinity
        values = [math.nan] * (n // 2) + [math.inf] * (n - n // 2)
    steps = np.array(sorted(rnd.sample(range(10 * n + 10), n)), dtype=np.int64)
    g = Gathered(np.array(values, dtype=np.float64), steps, 0, [np.arange(n, dtype=np.int64) * 7])
    for max_points in [0, 1, 2, 3, 4, 7, 10, 99, 300, n - 1, n, n + 1]:
        got = downsample(g, max_points)
        want = reference(values, max_points)
        assert got.steps.tolist() == [int(steps[i]) for i in want], (n, max_points)
        assert got.times_us.tolist() == [i * 7 for i in want]
        assert [struct.pack("<d", v) for v in got.values] == [
            struct.pack("<d", values[i]) for i in want
        ]
        if max_points > 0:
            assert len(got) <= max_points


def test_downsampling_keeps_nan_and_both_infinities_of_a_long_series() -> None:
    values = np.sin(np.arange(100_000) / 1000.0)
    values[[17, 50_000, 99_998]] = [math.nan, math.inf, -math.inf]
    g = Gathered(values, None, 10, [np.zeros(100_000, dtype=np.int64)])
    got = downsample(g, 1000)
    assert len(got) <= 1000
    assert np.isnan(got.values).any() and math.inf in got.values and -math.inf in got.values
    assert got.steps[0] == 10 and bool((np.diff(got.steps) > 0).all())


def test_scalar_columns_encoded_with_numpy_equal_protobufs_own_encoding() -> None:
    from ingest.api.series import scalar_arrays
    from ingest.store.columns import Points
    from steplog.v1 import data_pb2

    rng = np.random.default_rng(7)
    edges = [0, 1, 127, 128, 16383, 16384, 2**35, 2**63 - 1, -1, -(2**63)]
    steps = np.concatenate([np.array(edges), rng.integers(-(2**63), 2**63 - 1, 500)])
    values = rng.standard_normal(len(steps))
    values[:4] = [math.nan, -0.0, math.inf, 5e-324]
    times = rng.integers(0, 2**52, len(steps))
    pts = Points(steps.astype(np.int64), times.astype(np.int64), values)
    want = data_pb2.ScalarColumns(steps=steps.tolist(), times=pts.times.tolist(), values=values)
    assert scalar_arrays(pts).SerializeToString() == want.SerializeToString()
    empty = Points(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
    assert scalar_arrays(empty).SerializeToString() == b""


def test_a_block_with_stored_consecutive_steps_reads_as_implied_steps() -> None:
    """A compacted block stores its steps even when they are consecutive; read
    back they are implied, so the series takes the fast path, and the points
    are the same."""
    record = {
        "min_step": 10,
        "max_step": 12,
        "t0": 100,
        "v": send("d", 701, [1.0, 2.0, 3.0]),
        "o": send("i", 23, [0, 1, 2]),
        "s": send("q", 20, [10, 11, 12]),
        "h": send("?", 16, [False, False, False]),
    }
    b = Block.of(record)
    assert b.steps is None and b.hidden is None and b.times_us.tolist() == [100, 101, 102]
    record["s"] = send("q", 20, [10, 12, 11])
    record["h"] = send("?", 16, [False, True, False])
    b = Block.of(record)
    assert b.steps is not None and b.steps.tolist() == [10, 12, 11]
    assert b.hidden is not None
    assert assemble([b], None, 0, 99).all().steps.tolist() == [10, 11]


def straightforward(
    blocks: list[Block], rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None, lo: int, hi: int
) -> list[tuple[int, int, bytes]]:
    """A series' visible points in [lo, hi] point by point: every block's
    visible points, then the rows, sorted by step (stable)."""
    out: list[tuple[int, int, bytes]] = []
    for b in blocks:
        n = len(b.values)
        steps = list(range(b.min_step, b.min_step + n)) if b.steps is None else b.steps.tolist()
        for i in range(n):
            if (b.hidden is None or not b.hidden[i]) and lo <= steps[i] <= hi:
                out.append((steps[i], int(b.times_us[i]), struct.pack("<d", b.values[i])))
    if rows is not None:
        out += [
            (int(s), int(t), struct.pack("<d", v))
            for s, t, v in zip(rows[0], rows[1], rows[2], strict=True)
        ]
    return sorted(out, key=lambda p: p[0])


def random_series(
    rnd: random.Random,
) -> tuple[list[Block], tuple[np.ndarray, np.ndarray, np.ndarray] | None, int, int]:
    """Blocks as a series' commits, rewinds and compaction leave them: runs
    of consecutive steps, a rewind hiding a block's tail and logging the
    steps again, compacted blocks holding two distant runs (stored steps),
    sparse steps, every kind of special value, rows after the blocks."""
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0]

    def vals(n: int) -> list[float]:
        return [
            rnd.choice(specials) if rnd.random() < 0.2 else float(rnd.randint(-9, 9))
            for _ in range(n)
        ]

    blocks: list[Block] = []
    step, t0 = rnd.randint(-5, 5), 1_000_000
    pending: list[int] = []  # steps of small pieces left for a compacted block
    for _ in range(rnd.randint(0, 8)):
        n = rnd.randint(1, 40)
        kind = rnd.random()
        if kind < 0.15:  # a small piece, compacted later with another one
            pending += list(range(step, step + n))
        elif kind < 0.3:  # sparse stored steps
            steps = sorted(rnd.sample(range(step, step + 3 * n), n))
            blocks.append(block(0, vals(n), steps=steps, t0=t0))
            step = steps[-1] + 1 - n
        elif kind < 0.45 and blocks:  # a rewind: the last block's tail hidden, logged again
            last = blocks[-1]
            cut = rnd.randint(0, len(last.values) - 1)
            hidden = [i >= cut for i in range(len(last.values))]
            blocks[-1] = block(
                last.min_step,
                last.values.tolist(),
                steps=None if last.steps is None else last.steps.tolist(),
                hidden=hidden,
                t0=int(last.times_us[0]),
            )
            lsteps = (
                list(range(last.min_step, last.min_step + len(last.values)))
                if last.steps is None
                else last.steps.tolist()
            )
            step = lsteps[cut]
            blocks.append(block(step, vals(n), t0=t0))
        else:
            hidden = [rnd.random() < 0.2 for _ in range(n)] if rnd.random() < 0.3 else None
            blocks.append(block(step, vals(n), hidden=hidden, t0=t0))
        step += n
        t0 += 7_000
    if pending:
        blocks.append(block(0, vals(len(pending)), steps=pending, t0=t0))
    rows = None
    if rnd.random() < 0.5:
        k = rnd.randint(1, 20)
        steps = sorted(rnd.sample(range(step, step + 2 * k), k))
        rows = (
            np.array(steps, dtype=np.int64),
            np.array([t0 + i for i in range(k)], dtype=np.int64),
            np.array(vals(k)),
        )
    blocks.sort(key=lambda b: b.min_step)  # the query's order
    lo = rnd.choice([-(2**63), rnd.randint(-5, step)])
    hi = rnd.choice([2**63 - 1, rnd.randint(lo if lo > -100 else -5, step + 50)])
    if rows is not None:  # the query gives the visible rows in the range only
        inside = (rows[0] >= lo) & (rows[0] <= hi)
        rows = (rows[0][inside], rows[1][inside], rows[2][inside]) if inside.any() else None
    return blocks, rows, lo, hi


@pytest.mark.parametrize("seed", range(300))
def test_assemble_equals_the_points_taken_one_by_one(seed: int) -> None:
    """Any mix of blocks (hidden points, rewinds, stored and implied steps,
    runs of one block on both sides of another's) and rows, cut by any step
    range: the same points in the same order as taken one by one, and the
    downsampling of them the documented rule's."""
    rnd = random.Random(seed)
    blocks, rows, lo, hi = random_series(rnd)
    if seed % 10 == 9 and blocks:  # a step visible twice: the point by point sort
        b = blocks[0]
        blocks.append(block(b.min_step, [99.0], t0=5))
        blocks.sort(key=lambda x: x.min_step)
    want = straightforward(blocks, rows, lo, hi)
    g = assemble(blocks, rows, lo, hi)
    pts = g.all()
    got = list(
        zip(
            pts.steps.tolist(),
            pts.times_us.tolist(),
            [struct.pack("<d", v) for v in pts.values],
            strict=True,
        )
    )
    assert got == want
    steps = [p[0] for p in want]
    for probe in {lo, hi, *steps[:3], *(s + 1 for s in steps[-3:]), *(s - 1 for s in steps)}:
        if -(2**63) <= probe < 2**63:
            assert g.start_of(probe) == sum(1 for s in steps if s < probe), probe
    values = [struct.unpack("<d", p[2])[0] for p in want]
    for max_points in [1, 3, 5, 10, 31]:
        kept = downsample(g, max_points)
        assert kept.steps.tolist() == [steps[i] for i in reference(values, max_points)]
        assert kept.times_us.tolist() == [want[i][1] for i in reference(values, max_points)]


def test_a_block_read_once_keeps_its_visible_runs() -> None:
    b = block(0, [1.0, 2.0, 3.0, 4.0], hidden=[False, True, False, False])
    runs = b.visible()
    assert b.visible() is runs
    assert runs.values.tolist() == [1.0, 3.0, 4.0]
    assert runs.table.tolist() == [[0, 0, 1, 0], [2, 1, 2, 1]]
    # Steps wrapping around int64 are two runs, not one.
    wrap = block(0, [1.0, 2.0], steps=[2**63 - 1, -(2**63)])
    assert wrap.visible().table.tolist() == [[2**63 - 1, 0, 1, 0], [-(2**63), 1, 1, 1]]


@pytest.mark.parametrize("width", range(1, 11))
def test_varints_equal_protobufs_at_every_width(width: int) -> None:
    from ingest.api.series import scalar_bytes
    from ingest.store.columns import Points
    from steplog.v1 import data_pb2

    # Values around each width's edges up to this width (all one width and mixed).
    edges = [(1 << (7 * k)) + d for k in range(width) for d in (-1, 0, 1)]
    steps = np.array([e for e in edges if 0 <= e < 2**63] or [-1], dtype=np.int64)
    if width == 10:
        steps = np.concatenate([steps, np.array([-1, -(2**63), 5])])
    pts = Points(steps, np.zeros(len(steps), dtype=np.int64), np.zeros(len(steps)))
    want = data_pb2.ScalarColumns(steps=steps.tolist(), times=pts.times.tolist(), values=pts.values)
    assert scalar_bytes(pts) == want.SerializeToString()


def points_of(g: Gathered) -> list[tuple[int, int, bytes]]:
    pts = g.all()
    return list(
        zip(
            pts.steps.tolist(),
            pts.times_us.tolist(),
            [struct.pack("<d", v) for v in pts.values],
            strict=True,
        )
    )


@pytest.mark.parametrize("seed", range(200))
def test_blocks_read_again_from_their_joined_arrays_give_the_same_points(seed: int) -> None:
    """A series read whole makes its blocks members of one joined array
    (Base); reading them again (whole, a step range, some of them, or with
    one block replaced by its next version, as a rewind does) gives the
    points taken one by one, and a block left behind in an old base keeps
    its points."""
    rnd = random.Random(seed)
    blocks, _, _, _ = random_series(rnd)
    lo, hi = -(2**63), 2**63 - 1
    for _ in range(2):
        assert points_of(assemble(blocks, None, lo, hi)) == straightforward(blocks, None, lo, hi)
    if not blocks:
        return
    steps = [p[0] for p in straightforward(blocks, None, lo, hi)] or [0]
    a, b = sorted(rnd.choice(steps) for _ in range(2))
    assert points_of(assemble(blocks, None, a, b)) == straightforward(blocks, None, a, b)
    some = [x for x in blocks if rnd.random() < 0.6]
    assert points_of(assemble(some, None, lo, hi)) == straightforward(some, None, lo, hi)
    # A block replaced by another version of itself (a point hidden).
    j = rnd.randrange(len(blocks))
    old = blocks[j]
    hidden = [False] * len(old.values) if old.hidden is None else old.hidden.tolist()
    hidden[rnd.randrange(len(hidden))] = True
    new = Block(
        old.min_step,
        old.max_step,
        old.values.copy(),
        old.times_us.copy(),
        old.steps,
        np.array(hidden),
    )
    again = [*blocks[:j], new, *blocks[j + 1 :]]
    for _ in range(2):
        assert points_of(assemble(again, None, lo, hi)) == straightforward(again, None, lo, hi)
    assert points_of(assemble([old], None, lo, hi)) == straightforward([old], None, lo, hi)
    for x in blocks:
        assert points_of(assemble([x], None, lo, hi)) == straightforward([x], None, lo, hi)


def test_a_joined_read_is_one_slice_of_its_blocks_arrays() -> None:
    blocks = [block(0, [1.0, 2.0]), block(2, [3.0], steps=[2]), block(3, [4.0, 5.0])]
    first = assemble(blocks, None, -10, 10)
    again = assemble(blocks, None, -10, 10)
    assert again.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert np.shares_memory(again.values, first.values)  # no copy the second time
    assert np.shares_memory(blocks[0].values, first.values)  # the block's own arrays freed


def test_the_cache_evicts_the_blocks_of_a_joined_read_together() -> None:
    a, b, c = block(0, [1.0] * 100), block(100, [2.0] * 100), block(500, [3.0] * 100)
    cache = BlockCache(max_bytes=a.nbytes * 3)
    for k, x in enumerate([a, b, c]):
        cache.put((k, 1), x)
    assemble([a, b], None, 0, 1000)  # a and b joined into one base
    cache.get((0, 1))
    cache.get((1, 1))  # c is now the least recently used
    cache.put((3, 1), block(900, [4.0] * 100))
    assert cache.get((2, 1)) is None and cache.get((0, 1)) is a
    cache.put((4, 1), block(990, [5.0] * 100))  # a (now the oldest) takes b with it
    assert cache.get((0, 1)) is None and cache.get((1, 1)) is None
    assert cache.used == 2 * a.nbytes


def test_a_few_blocks_read_after_their_series_leave_its_joined_array_alone() -> None:
    blocks = [block(10 * k, [float(k)] * 10) for k in range(8)]
    assemble(blocks, None, -100, 1000)
    chart = assemble(blocks, None, -100, 1000)
    # Two of the eight blocks, not side by side in the joined array: a copy.
    page = assemble([blocks[2], blocks[5]], None, -100, 1000)
    assert page.values.tolist() == [2.0] * 10 + [5.0] * 10
    again = assemble(blocks, None, -100, 1000)
    assert np.shares_memory(again.values, chart.values)  # still one slice of one base
