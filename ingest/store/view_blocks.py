"""The web UI's long-series summaries (see ingest/store/views.py, "Long
series"): per-block columns of a series' extremes, last point and first NaN,
reduced to a chart's buckets with numpy; the LRU cache of them in memory and
in files. Read only, like the views."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

log = logging.getLogger("steplog.ui")

# The block cache: series with more points than CACHE_MIN_POINTS keep up to
# about BLOCKS summary blocks each in memory, CACHE_BYTES at most in all.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
CACHE_MIN_POINTS = 20_000
BLOCKS = 4096

Arr = npt.NDArray[Any]
# A chart's points: steps (int64), times (epoch seconds) and values (float64).
Points = tuple[Arr, Arr, Arr]
NO_NAN = np.iinfo(np.int64).min


def _firsts(keys: Arr) -> Arr:
    """Mask of the first element of each run of equal keys (keys sorted)."""
    if keys.size == 0:
        return np.zeros(0, dtype=bool)
    out: Arr = np.concatenate([[True], keys[1:] != keys[:-1]])
    return out


def reduce_buckets(bucket: Arr, steps: Arr, values: Arr) -> Arr:
    """Indices (ascending) of the points a chart keeps: in each bucket its
    minimum and maximum (NaN left out; the first step on ties), its last
    point and its first NaN. The points are in step order."""
    picked = []
    nan = np.isnan(values)
    num = np.flatnonzero(~nan)
    if num.size:
        o = num[np.lexsort((steps[num], values[num], bucket[num]))]
        picked.append(o[_firsts(bucket[o])])
        o = num[np.lexsort((steps[num], -values[num], bucket[num]))]
        picked.append(o[_firsts(bucket[o])])
    o = np.lexsort((-steps, bucket))
    picked.append(o[_firsts(bucket[o])])
    nans = np.flatnonzero(nan)
    if nans.size:
        o = nans[np.lexsort((steps[nans], bucket[nans]))]
        picked.append(o[_firsts(bucket[o])])
    out: Arr = np.unique(np.concatenate(picked))
    return out


_FIELDS = (
    "key",
    "count",
    "lo_s",
    "lo_t",
    "lo_v",
    "hi_s",
    "hi_t",
    "hi_v",
    "last_s",
    "last_t",
    "last_v",
    "nan_s",
    "nan_t",
)
_INT_FIELDS = frozenset({"key", "count", "lo_s", "hi_s", "last_s", "nan_s"})


@dataclass
class Summary:
    """Groups of consecutive points (blocks of steps, or single points) in
    step order, as columns: each group's first step (`key`), its number of
    points, the step, time and value of its minimum and of its maximum (NaN
    left out: the values are NaN when the group holds no number), of its last
    point, and of its first NaN (`nan_s` is NO_NAN when it has none)."""

    key: Arr
    count: Arr
    lo_s: Arr
    lo_t: Arr
    lo_v: Arr
    hi_s: Arr
    hi_t: Arr
    hi_v: Arr
    last_s: Arr
    last_t: Arr
    last_v: Arr
    nan_s: Arr
    nan_t: Arr

    @staticmethod
    def of_points(steps: Arr, times: Arr, values: Arr) -> Summary:
        """Each point its own group."""
        nan = np.isnan(values)
        return Summary(
            steps,
            np.ones(steps.size, np.int64),
            steps,
            times,
            values,
            steps,
            times,
            values,
            steps,
            times,
            values,
            np.where(nan, steps, NO_NAN),
            times,
        )

    @staticmethod
    def concat(parts: Sequence[Summary]) -> Summary:
        return Summary(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def take(self, which: Arr) -> Summary:
        return Summary(*(getattr(self, f)[which] for f in _FIELDS))

    def arrays(self) -> dict[str, Arr]:
        return {f: getattr(self, f) for f in _FIELDS}

    @property
    def size(self) -> int:
        return int(self.key.size)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in _FIELDS)


def _first_of_group(group: Arr, mask: Arr) -> Arr:
    """Per group (groups sorted) that has a True in `mask`, the index of its first True."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return idx
    out: Arr = idx[_firsts(group[idx])]
    return out


def reduce_summary(bucket: Arr, s: Summary, head: tuple[int, float, float] | None) -> Points:
    """The points a chart keeps of groups assigned to buckets (`bucket`
    non-decreasing): in each bucket its minimum and maximum (NaN left out;
    the first on ties), its last point and its first NaN; and `head` (the
    series' first point) when given. Steps ascending, each once."""
    n = s.size
    if n == 0:
        if head is None:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        return np.array([head[0]], np.int64), np.array([head[1]]), np.array([head[2]])
    firsts = _firsts(bucket)
    starts = np.flatnonzero(firsts)
    group = np.cumsum(firsts) - 1
    num = ~np.isnan(s.lo_v)
    lo_f = np.where(num, s.lo_v, np.inf)
    hi_f = np.where(num, s.hi_v, -np.inf)
    lo_m = np.minimum.reduceat(lo_f, starts)
    hi_m = np.maximum.reduceat(hi_f, starts)
    lo_i = _first_of_group(group, num & (lo_f == lo_m[group]))
    hi_i = _first_of_group(group, num & (hi_f == hi_m[group]))
    last_i = np.append(starts[1:], n) - 1
    nan_i = _first_of_group(group, s.nan_s != NO_NAN)
    steps = [s.lo_s[lo_i], s.hi_s[hi_i], s.last_s[last_i], s.nan_s[nan_i]]
    times = [s.lo_t[lo_i], s.hi_t[hi_i], s.last_t[last_i], s.nan_t[nan_i]]
    values = [s.lo_v[lo_i], s.hi_v[hi_i], s.last_v[last_i], np.full(nan_i.size, np.nan)]
    if head is not None:
        steps.append(np.array([head[0]], np.int64))
        times.append(np.array([head[1]]))
        values.append(np.array([head[2]]))
    all_steps = np.concatenate(steps)
    kept, at = np.unique(all_steps, return_index=True)
    return kept, np.concatenate(times)[at], np.concatenate(values)[at]


@dataclass
class Blocks:
    """A long series summarized in blocks of `span` steps from `origin`
    (`summary.key` is each block's first step), its first point (`head`),
    valid while the series has `point_count` points up to `last_step`."""

    series_id: int
    origin: int
    span: int
    point_count: int
    last_step: int
    head: tuple[int, float, float]
    summary: Summary

    @property
    def nbytes(self) -> int:
        return self.summary.nbytes + 200

    def extent(self, x: str) -> tuple[float, float]:
        """The first and last x of the series' points (for wall time: of its
        first point and of its blocks' last points)."""
        s = self.summary
        if x == "step":
            return float(self.head[0]), float(s.last_s[-1] if s.size else self.head[0])
        t = s.last_t
        return min(self.head[1], float(t.min(initial=self.head[1]))), float(
            t.max(initial=self.head[1])
        )

    def select(
        self, x: str, lo: float, hi: float, width: int, full: bool
    ) -> tuple[Summary, list[tuple[int, int]]] | None:
        """The blocks inside [lo, hi] and the step ranges of the (at most two)
        blocks the range cuts, whose points inside it the database gives; None
        when fewer than 2 blocks per bucket are inside (a narrow zoom: the
        database answers it whole). By wall time only the whole series."""
        s = self.summary
        if x == "time":
            return (s, []) if full and s.size >= 2 * width else None
        inside = (s.key >= lo) & (s.last_s <= hi)
        if inside.all():
            return (s, []) if s.size >= 2 * width else None
        if int(inside.sum()) < 2 * width:
            return None
        cut = ~inside & (s.key <= hi) & (s.last_s >= lo)
        ranges = [(max(int(lo), int(k)), min(int(hi), int(k) + self.span - 1)) for k in s.key[cut]]
        return s.take(inside), ranges


def _blocks_sql() -> str:
    """One row per block from `$4` on, in block order, every column a
    non-null int8/float8 (a fixed-width binary COPY row); TimescaleDB's
    first(a, b)/last(a, b) give the step and time at a block's extremes."""
    num = "FILTER (WHERE value <> 'NaN')"
    nan = "FILTER (WHERE value = 'NaN')"
    cols = [
        "b",
        "count(*)",
        f"coalesce(first(step, value) {num}, 0)",
        f"coalesce(first(t, value) {num}, 0)",
        f"coalesce(min(value) {num}, 'NaN')",
        f"coalesce(last(step, value) {num}, 0)",
        f"coalesce(last(t, value) {num}, 0)",
        f"coalesce(max(value) {num}, 'NaN')",
        "max(step)",
        "last(t, step)",
        "last(value, step)",
        f"coalesce(min(step) {nan}, '{NO_NAN}'::bigint)",
        f"coalesce(first(t, step) {nan}, 0)",
    ]
    return (
        f"SELECT {', '.join(cols)} FROM (SELECT (step - $2::bigint) / $3::bigint AS b, step,"
        " value, extract(epoch FROM time)::float8 AS t FROM scalar_points"
        " WHERE series_id = $1::bigint AND NOT hidden AND step >= $4::bigint) p"
        " GROUP BY b ORDER BY b"
    )


_BLOCKS_SQL = _blocks_sql()
# One binary COPY row of _BLOCKS_SQL: a field count, then (length, 8 bytes) per column.
_BLOCK_ROW = np.dtype(
    [("n", ">i2")]
    + [
        (name, dt)
        for f in _FIELDS
        for name, dt in ((f"len_{f}", ">i4"), (f, ">i8" if f in _INT_FIELDS else ">f8"))
    ]
)


def _parse_blocks(payload: bytes, origin: int, span: int) -> Summary:
    """The rows of a binary COPY of _BLOCKS_SQL (header 19 bytes, trailer 2)."""
    body = payload[19:-2]
    rows = np.frombuffer(body, dtype=_BLOCK_ROW, count=len(body) // _BLOCK_ROW.itemsize)
    cols = {}
    for f in _FIELDS:
        cols[f] = rows[f].astype(np.int64 if f in _INT_FIELDS else np.float64)
    cols["key"] = origin + cols["key"] * span
    return Summary(**cols)


class BlockCache:
    """Blocks of long series, most recently used kept, `max_bytes` in all,
    and (when `directory` is set) kept on disk too, `max_bytes` there as
    well, so a restarted UI process answers from its files.

    A series that only grew since its blocks were made (more points, a later
    last step) gets its last block and the new ones computed again; any other
    change (a rewind) recomputes it whole. Series that accept out-of-order
    steps are never cached (a point can replace one inside an old block).
    A file names the database (`namespace`), the series id, its run and
    name, and records the point count and last step it is valid for.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_bytes: int,
        directory: Path | None = None,
        namespace: str = "",
    ) -> None:
        self.pool = pool
        self.max_bytes = max_bytes
        self.directory = directory
        self.namespace = namespace
        self._entries: OrderedDict[int, Blocks] = OrderedDict()
        self._locks: dict[int, asyncio.Lock] = {}
        self.bytes = 0
        self.computed = 0  # blocks computed from the database (tests, benchmarks)
        self.loaded = 0  # entries read from disk

    def fits(self, s: Mapping[str, Any]) -> bool:
        return (
            self.max_bytes > 0
            and int(s["point_count"]) > CACHE_MIN_POINTS
            and not s["out_of_order"]
            and s["last_step"] is not None
        )

    async def get(self, s: Mapping[str, Any]) -> Blocks | None:
        sid = int(s["series_id"])
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            try:
                return await self._get(s, sid, int(s["point_count"]), int(s["last_step"]))
            finally:
                if not lock._waiters:
                    self._locks.pop(sid, None)

    def _path(self, s: Mapping[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        ident = f"{self.namespace}\0{s['series_id']}\0{s['run_id']}\0{s['name']}\0{s['labels']}"
        return self.directory / (hashlib.sha256(ident.encode()).hexdigest()[:40] + _SUFFIX)

    async def _get(
        self, s: Mapping[str, Any], sid: int, count: int, last_step: int
    ) -> Blocks | None:
        old = self._entries.get(sid)
        path = self._path(s)
        if old is None and path is not None:
            old = _load(path, sid)  # one read of a few hundred KiB: not worth a thread
            if old is not None:
                self.loaded += 1
                if old.point_count == count and old.last_step == last_step:
                    self._put(old)
                    return old
        if old is not None and old.point_count == count and old.last_step == last_step:
            self._entries.move_to_end(sid)
            return old
        async with self.pool.acquire() as conn:
            if (
                old is not None
                and count > old.point_count
                and last_step > old.last_step
                and (last_step - old.origin) // old.span < 2 * BLOCKS
                and old.summary.size
            ):
                start = int(old.summary.key[-1])
                fresh = await _compute_blocks(conn, sid, old.origin, old.span, start)
                keep = old.summary.take(old.summary.key < start)
                new = Blocks(
                    sid,
                    old.origin,
                    old.span,
                    count,
                    last_step,
                    old.head,
                    Summary.concat([keep, fresh]),
                )
            else:
                head = await conn.fetchrow(
                    "SELECT step, extract(epoch FROM time)::float8 AS t, value FROM scalar_points"
                    " WHERE series_id = $1 AND NOT hidden ORDER BY step LIMIT 1",
                    sid,
                )
                if head is None:
                    return None
                origin = int(head["step"])
                span = max(1, -(-(last_step - origin + 1) // BLOCKS))
                fresh = await _compute_blocks(conn, sid, origin, span, origin)
                new = Blocks(
                    sid,
                    origin,
                    span,
                    count,
                    last_step,
                    (origin, float(head["t"]), float(head["value"])),
                    fresh,
                )
        self.computed += 1
        self._put(new)
        if path is not None:
            await asyncio.to_thread(self._save, path, new)
        return new

    def _put(self, b: Blocks) -> None:
        old = self._entries.pop(b.series_id, None)
        if old is not None:
            self.bytes -= old.nbytes
        if b.nbytes > self.max_bytes:
            return
        self._entries[b.series_id] = b
        self.bytes += b.nbytes
        while self.bytes > self.max_bytes and self._entries:
            _, gone = self._entries.popitem(last=False)
            self.bytes -= gone.nbytes

    def _save(self, path: Path, b: Blocks) -> None:
        """Write the file (a temporary, then renamed: readers never see half
        a file), then remove the oldest files while the directory holds more
        than `max_bytes`."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
            tmp.write_bytes(_encode_file(b))
            os.replace(tmp, path)
            files = [(p.stat(), p) for p in path.parent.glob("*" + _SUFFIX)]
            total = sum(st.st_size for st, _ in files)
            for st, p in sorted(files, key=lambda f: f[0].st_mtime):
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                total -= st.st_size
        except OSError as exc:
            log.warning("chart cache: cannot write %s: %s", path, exc)


# A cache file: MAGIC, int64 series id, origin, span, point count, last
# step, the first point's step and the number of blocks n, float64 the first
# point's time and value, then the summary's columns (n int64 or float64
# each), all little-endian.
_MAGIC = b"STLBLK01"
_SUFFIX = ".blocks"
_HEAD = len(_MAGIC) + 7 * 8 + 2 * 8


def _encode_file(b: Blocks) -> bytes:
    s = b.summary
    meta = np.array(
        [b.series_id, b.origin, b.span, b.point_count, b.last_step, b.head[0], s.size], "<i8"
    )
    cols = [getattr(s, f).astype("<i8" if f in _INT_FIELDS else "<f8") for f in _FIELDS]
    head = np.array(b.head[1:], "<f8")
    return b"".join([_MAGIC, meta.tobytes(), head.tobytes(), *(c.tobytes() for c in cols)])


def _load(path: Path, sid: int) -> Blocks | None:
    """A cache file, or None when absent, unreadable or of another series."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _HEAD or data[: len(_MAGIC)] != _MAGIC:
        return None
    meta = [int(v) for v in np.frombuffer(data, "<i8", 7, len(_MAGIC))]
    head = np.frombuffer(data, "<f8", 2, len(_MAGIC) + 56)
    n = meta[6]
    if meta[0] != sid or n < 0 or len(data) != _HEAD + 8 * n * len(_FIELDS):
        return None
    cols = {}
    for i, f in enumerate(_FIELDS):
        at = _HEAD + 8 * n * i
        cols[f] = np.frombuffer(data, "<i8" if f in _INT_FIELDS else "<f8", n, at).astype(
            np.int64 if f in _INT_FIELDS else np.float64
        )
    return Blocks(
        sid,
        meta[1],
        meta[2],
        meta[3],
        meta[4],
        (meta[5], float(head[0]), float(head[1])),
        Summary(**cols),
    )


async def _compute_blocks(
    conn: asyncpg.Connection, sid: int, origin: int, span: int, from_step: int
) -> Summary:
    buf = io.BytesIO()
    await conn.copy_from_query(
        _BLOCKS_SQL, sid, origin, span, from_step, output=buf, format="binary"
    )
    return _parse_blocks(buf.getvalue(), origin, span)


def ts(epoch: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC)
