"""The store of table rows and evaluation documents (asyncpg).

Only the write pipeline's transaction calls the writers (a KindCheck and
KindWriters, ingest/store/kinds.py) and only the query servicer calls the
readers (KindReaders, ingest/store/queries.py); ingest/server.py wires them in.

Storage (migrations/002): a table series' columns live in `table_columns`
(name -> type and slot, fixed by the column's first value); each row is one
`table_rows` row whose cells sit in typed arrays (doubles, ints, bools,
strings) at their column's slot, a missing cell being a NULL element or past
the end of the array. So a row carries no column names, the column set grows
without rewriting old rows, and the rows of a request become one binary COPY
payload built with numpy: per request, every row has the same layout, so the
rows are one structured array; missing cells and strings are handled by
dropping the bytes they do not use with one boolean mask.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.core.batch import KIND_TABLE
from ingest.core.evaluations import Document
from ingest.core.order import Accepted
from ingest.core.tables import BOOL, DOUBLE, INT64, STRING, ColumnPart, TableBlock, resolve_types
from ingest.core.validate import Limits
from ingest.store.copy import COPY_HEADER, COPY_TRAILER, POINT_HEAD, fill_point_head
from ingest.store.db import acquire
from ingest.store.kinds import CheckItem, hide_superseded
from ingest.store.queries import Column, Read, SeriesHead, Window, visible_points

log = logging.getLogger(__name__)

Row = Mapping[str, Any]

TABLE_ROW_COLUMNS = ["time", "series_id", "step", "doubles", "ints", "bools", "hidden", "strings"]
# Fixed-width array types in table_rows column order: (type, element oid, dtype).
_FIXED = ((DOUBLE, 701, ">f8"), (INT64, 20, ">i8"), (BOOL, 16, "u1"))
_FIXED_DTYPE = {ctype: dtype for ctype, _, dtype in _FIXED}
_NUMPY_DTYPE = {DOUBLE: np.float64, INT64: np.int64, BOOL: np.bool_}
_TEXT_OID = 25
_ARRAY_FIELD = {DOUBLE: "doubles", INT64: "ints", STRING: "strings", BOOL: "bools"}
# Bytes of padded string cells one encoding slice may hold.
_STRING_BUDGET = 32 * 1024 * 1024


@dataclass
class Cells:
    """The cells of one type for the rows of a request: (rows, slots)."""

    values: Any  # ndarray (m, k) for fixed types; list of k lists of str for strings
    present: npt.NDArray[np.bool_]  # (m, k)

    @property
    def slots(self) -> int:
        return int(self.present.shape[1])


# -- binary COPY encoding -----------------------------------------------------------


def _row_dtype(cells: Mapping[int, Cells], widths: Sequence[int]) -> np.dtype[Any]:
    """The layout of one row of table_rows in PostgreSQL's binary COPY format:
    field count, then (length, value) per column; an array value is a header
    (ndim, has-null flag, element oid, length, lower bound) and its elements
    (length or -1, value)."""
    fields: list[tuple[Any, ...]] = [*POINT_HEAD]
    for ctype, _, dtype in _FIXED:
        fields.append((f"l_{ctype}", ">i4"))
        if ctype in cells:
            k = cells[ctype].slots
            fields.append((f"h_{ctype}", ">i4", (5,)))
            fields.append((f"e_{ctype}", [("len", ">i4"), ("val", dtype)], (k,)))
    fields += [("l_hidden", ">i4"), ("hidden", "u1"), (f"l_{STRING}", ">i4")]
    if STRING in cells:
        fields.append((f"h_{STRING}", ">i4", (5,)))
        for j, w in enumerate(widths):
            fields.append((f"sl_{j}", ">i4"))
            if w:
                fields.append((f"sv_{j}", f"S{w}"))
    return np.dtype(fields)


def _encode_slice(
    times: npt.NDArray[np.float64],
    series_id: int,
    steps: npt.NDArray[np.int64],
    cells: Mapping[int, Cells],
) -> bytes:
    m = times.shape[0]
    encoded: list[list[bytes]] = []
    lengths: list[npt.NDArray[np.int64]] = []
    if STRING in cells:
        sc = cells[STRING]
        for j, column in enumerate(sc.values):
            enc = [s.encode() for s in column]
            lens = np.fromiter(map(len, enc), dtype=np.int64, count=m)
            lens[~sc.present[:, j]] = 0
            encoded.append(enc)
            lengths.append(lens)
    widths = [int(lens.max()) if m else 0 for lens in lengths]
    dtype = _row_dtype(cells, widths)
    rows = np.zeros(m, dtype=dtype)
    fill_point_head(rows, len(TABLE_ROW_COLUMNS), times, series_id, steps)
    rows["l_hidden"] = 1
    keep: npt.NDArray[np.bool_] | None = None
    itemsize = dtype.itemsize

    def drop(offset: int, mask: npt.NDArray[np.bool_]) -> None:
        nonlocal keep
        if keep is None:
            keep = np.ones((m, itemsize), dtype=np.bool_)
        keep[:, offset : offset + mask.shape[1]] = mask

    for ctype, oid, _ in _FIXED:
        if ctype not in cells:
            rows[f"l_{ctype}"] = -1
            continue
        c = cells[ctype]
        k = c.slots
        width = np.dtype(_FIXED_DTYPE[ctype]).itemsize
        el = rows[f"e_{ctype}"]
        el["val"] = c.values
        rows[f"h_{ctype}"] = np.array([1, 0, oid, k, 1], dtype=np.int32)
        if c.present.all():  # the common case: constants, no mask
            rows[f"l_{ctype}"] = 20 + (4 + width) * k
            el["len"] = width
            continue
        n_present = c.present.sum(axis=1)
        rows[f"l_{ctype}"] = 20 + 4 * k + width * n_present
        rows[f"h_{ctype}"][:, 1] = n_present < k
        el["len"] = np.where(c.present, width, -1)
        mask = np.ones((m, k, 4 + width), dtype=np.bool_)
        mask[:, :, 4:] = c.present[:, :, None]
        drop(dtype.fields[f"e_{ctype}"][1], mask.reshape(m, -1))  # type: ignore[index]
    if STRING not in cells:
        rows[f"l_{STRING}"] = -1
    else:
        sc = cells[STRING]
        k = sc.slots
        rows[f"l_{STRING}"] = 20 + 4 * k + np.sum(lengths, axis=0)
        rows[f"h_{STRING}"] = np.array([1, 0, _TEXT_OID, k, 1], dtype=np.int32)
        rows[f"h_{STRING}"][:, 1] = (~sc.present).any(axis=1)
        for j, (enc, lens, w) in enumerate(zip(encoded, lengths, widths, strict=True)):
            present = sc.present[:, j]
            rows[f"sl_{j}"] = np.where(present, lens, -1)
            if w:
                rows[f"sv_{j}"] = enc
                if not (lens == w).all():  # padding to drop (not when all as wide)
                    drop(
                        dtype.fields[f"sv_{j}"][1],  # type: ignore[index]
                        np.arange(w)[None, :] < lens[:, None],
                    )
    if keep is None:
        return rows.tobytes()
    flat: npt.NDArray[np.uint8] = rows.view(np.uint8).reshape(m, itemsize)
    return flat[keep].tobytes()


def _head_dtype(key: tuple[tuple[int, int], ...]) -> np.dtype[Any]:
    """The fixed-width head of a row whose fixed-type cells are all present:
    everything up to the first string cell's bytes (its array header and the
    first element's length included). key: (type, slots) of the row's cells."""
    dtype = _HEAD_DTYPES.get(key)
    if dtype is None:
        slots = dict(key)
        fields: list[tuple[Any, ...]] = [*POINT_HEAD]
        for ctype, _, fixed in _FIXED:
            fields.append((f"l_{ctype}", ">i4"))
            if ctype in slots:
                fields.append((f"h_{ctype}", ">i4", (5,)))
                fields.append((f"e_{ctype}", [("len", ">i4"), ("val", fixed)], (slots[ctype],)))
        fields += [("l_hidden", ">i4"), ("hidden", "u1"), (f"l_{STRING}", ">i4")]
        if STRING in slots:
            fields += [(f"h_{STRING}", ">i4", (5,)), ("sl_0", ">i4")]
        dtype = _HEAD_DTYPES[key] = np.dtype(fields)
    return dtype


_HEAD_DTYPES: dict[tuple[tuple[int, int], ...], np.dtype[Any]] = {}


def _utf8(column: Sequence[str], present: npt.NDArray[np.bool_]) -> list[bytes]:
    """The UTF-8 bytes of a string slot's cells, b"" where a cell is missing."""
    if present.all():
        return list(map(str.encode, column))
    return [s.encode() if p else b"" for s, p in zip(column, present.tolist(), strict=True)]


def _encode_joined(
    times: npt.NDArray[np.float64],
    series_id: int,
    steps: npt.NDArray[np.int64],
    cells: Mapping[int, Cells],
) -> bytes:
    """encode_table_rows when every fixed-type cell is present (the common
    case): the rows' heads are one structured array of equal-width rows, and
    each row's strings follow its head, joined by bytes.join (each row's head
    one bytes object, each cell one), so no string is padded and no mask
    drops bytes. Missing string cells are handled (length -1, no bytes)."""
    m = times.shape[0]
    dtype = _head_dtype(tuple((t, c.slots) for t, c in sorted(cells.items())))
    rows = np.empty(m, dtype=dtype)
    fill_point_head(rows, len(TABLE_ROW_COLUMNS), times, series_id, steps)
    for ctype, oid, fixed in _FIXED:
        c = cells.get(ctype)
        if c is None:
            rows[f"l_{ctype}"] = -1
            continue
        k = c.slots
        width = np.dtype(fixed).itemsize
        rows[f"l_{ctype}"] = 20 + (4 + width) * k
        rows[f"h_{ctype}"] = np.array([1, 0, oid, k, 1], dtype=np.int32)
        el = rows[f"e_{ctype}"]
        el["len"] = width
        el["val"] = c.values
    rows["l_hidden"] = 1
    rows["hidden"] = 0
    sc = cells.get(STRING)
    if sc is None:
        rows[f"l_{STRING}"] = -1
        return rows.tobytes()
    k = sc.slots
    present = sc.present
    encoded = [_utf8(column, present[:, j]) for j, column in enumerate(sc.values)]
    lengths = [np.fromiter(map(len, enc), dtype=np.int64, count=m) for enc in encoded]
    rows[f"l_{STRING}"] = 20 + 4 * k + np.sum(lengths, axis=0)
    header = rows[f"h_{STRING}"]
    header[:] = np.array([1, 0, _TEXT_OID, k, 1], dtype=np.int32)
    everywhere = bool(present.all())
    if not everywhere:
        header[:, 1] = (~present).any(axis=1)
    marked = lengths if everywhere else np.where(present.T, lengths, -1)
    rows["sl_0"] = marked[0]
    # A row's pieces: its head (ending with the first cell's length), the
    # first cell's bytes, then (length, bytes) of each further cell.
    pieces: list[bytes] = [b""] * (2 * k * m)
    pieces[:: 2 * k] = rows.view(np.dtype((np.void, dtype.itemsize))).tolist()
    pieces[1 :: 2 * k] = encoded[0]
    for j in range(1, k):
        length = np.asarray(marked[j], dtype=">i4")
        pieces[2 * j :: 2 * k] = length.view(np.dtype((np.void, 4))).tolist()
        pieces[2 * j + 1 :: 2 * k] = encoded[j]
    return b"".join(pieces)


def encode_table_rows(
    times: npt.NDArray[np.float64],
    series_id: int,
    steps: npt.NDArray[np.int64],
    cells: Mapping[int, Cells],
) -> bytes:
    """The binary COPY rows (no header or trailer) of one request's rows.

    Vectorized. When every fixed-type cell is present, `_encode_joined`.
    Otherwise one structured array per slice of rows, missing cells' bytes
    dropped with a mask; strings are padded to the slice's longest, so
    slices are cut to keep that padding bounded."""
    m = times.shape[0]
    if all(c.slots and (t == STRING or c.present.all()) for t, c in cells.items()):
        return _encode_joined(times, series_id, steps, cells)
    if STRING not in cells or m == 0:
        return _encode_slice(times, series_id, steps, cells)
    sc = cells[STRING]
    widest = max((max(map(len, column), default=0) for column in sc.values), default=0)
    per_row = max(1, 4 * widest * max(1, sc.slots))
    step = max(1, _STRING_BUDGET // per_row)
    if step >= m:
        return _encode_slice(times, series_id, steps, cells)
    out = []
    for s in range(0, m, step):
        e = min(m, s + step)
        part = {
            t: Cells(
                [col[s:e] for col in c.values] if t == STRING else c.values[s:e],
                c.present[s:e],
            )
            for t, c in cells.items()
        }
        out.append(_encode_slice(times[s:e], series_id, steps[s:e], part))
    return b"".join(out)


# -- layout of a request's accepted rows ---------------------------------------------


def _merge(parts: Sequence[ColumnPart], index: npt.NDArray[np.int64]) -> tuple[Any, Any]:
    """The cells of one column at `index`, from its parts (one type)."""
    if len(parts) == 1:
        return parts[0].take(index), parts[0].present[index]
    present = np.zeros(index.shape[0], dtype=np.bool_)
    values: Any = None
    for p in parts:
        got, mask = p.take(index), p.present[index]
        if values is None:
            values = got
        elif isinstance(values, list):
            values = [g if k else v for v, g, k in zip(values, got, mask.tolist(), strict=True)]
        else:
            values = np.where(mask, got, values)
        present |= mask
    return values, present


def layout(
    block: TableBlock,
    index: npt.NDArray[np.int64],
    columns: dict[str, Column],
    new: list[Column],
) -> dict[int, Cells]:
    """Place the cells of rows `index` at their columns' slots, adding the
    columns this request introduces (to `columns` and `new`)."""
    per_type: dict[int, list[tuple[int, Any, Any]]] = {}
    m = index.shape[0]
    for name, parts in block.columns():
        live = [p for p in parts if p.present[index].any()]
        if not live:
            continue
        ctype = live[0].type
        if any(p.type != ctype for p in live):
            raise AssertionError(f"column {name!r}: types were not resolved before writing")
        col = columns.get(name)
        if col is None:
            slot = sum(1 for c in columns.values() if c.type == ctype)
            col = columns[name] = Column(name, ctype, slot, len(columns))
            new.append(col)
        elif col.type != ctype:
            raise AssertionError(f"column {name!r} is {col.type}, cells are {ctype}")
        values, present = _merge(live, index)
        per_type.setdefault(ctype, []).append((col.slot, values, present))
    out: dict[int, Cells] = {}
    for ctype, entries in per_type.items():
        k = max(slot for slot, _, _ in entries) + 1
        present = np.zeros((m, k), dtype=np.bool_)
        if ctype == STRING:
            strings: list[list[str]] = [[""] * m for _ in range(k)]
            for slot, values, mask in entries:
                strings[slot] = values
                present[:, slot] = mask
            out[ctype] = Cells(strings, present)
            continue
        matrix: npt.NDArray[Any] = np.zeros((m, k), dtype=_NUMPY_DTYPE[ctype])
        for slot, values, mask in entries:
            matrix[:, slot] = values
            present[:, slot] = mask
        out[ctype] = Cells(matrix, present)
    return out


async def _copy_stream(
    laid_out: Sequence[tuple[Accepted, dict[int, Cells]]],
) -> AsyncIterator[bytes]:
    """The COPY stream of the accepted chunks, each chunk's rows encoded
    when asyncpg asks for them (after it sent the chunk before)."""
    yield COPY_HEADER
    for a, cells in laid_out:
        yield encode_table_rows(a.chunk.times[a.index], a.series_id, a.chunk.steps[a.index], cells)
    yield COPY_TRAILER


# -- the store --------------------------------------------------------------------------


class TableStore:
    """Writers (inside the pipeline's transaction) and readers (for queries)
    of table and evaluation series."""

    def __init__(self, pool: asyncpg.Pool, limits: Limits) -> None:
        self.pool = pool
        self.limits = limits

    def _conn(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return acquire(self.pool)

    @staticmethod
    async def _columns(
        conn: asyncpg.Connection, series_ids: Sequence[int]
    ) -> dict[int, dict[str, Column]]:
        rows = await conn.fetch(
            "SELECT series_id, name, type, slot, position FROM table_columns"
            " WHERE series_id = ANY($1::bigint[]) ORDER BY series_id, position",
            list(series_ids),
        )
        out: dict[int, dict[str, Column]] = {}
        for r in rows:
            out.setdefault(r["series_id"], {})[r["name"]] = Column(
                r["name"], r["type"], r["slot"], r["position"]
            )
        return out

    # -- writes (the pipeline's transaction; series rows are locked) -------------

    async def check_tables(self, conn: asyncpg.Connection, items: Sequence[CheckItem]) -> None:
        """Before order.apply (a KindCheck): reject cells whose type differs from their
        column's (stored, or fixed earlier in this group), naming the column."""
        tables = [(i.chunk, i.state, i.outcome) for i in items if i.state.kind == KIND_TABLE]
        if not tables:
            return
        stored = await self._columns(conn, sorted({s.series_id for _, s, _ in tables}))
        known: dict[int, dict[str, int]] = {
            sid: {name: col.type for name, col in cols.items()} for sid, cols in stored.items()
        }
        for chunk, state, outcome in tables:
            block = chunk.payload[0] if chunk.payload else None
            if not isinstance(block, TableBlock):
                continue
            types = known.setdefault(state.series_id, {})
            rejections, new = resolve_types(
                block, chunk.alive, types, self.limits.max_table_columns
            )
            for r in rejections:
                outcome.reject(chunk, r.rows, r.reason, r.message)
            types.update(new)

    async def write_tables(self, conn: asyncpg.Connection, accepted: list[Accepted]) -> int:
        """Append the accepted rows (one binary COPY) and any new columns.

        The rows are laid out (their columns' slots fixed) before the COPY
        and encoded during it, one accepted chunk at a time as asyncpg asks
        for the next piece: PostgreSQL parses a chunk's rows while the next
        one is encoded, instead of waiting for all of them."""
        columns = await self._columns(conn, sorted({a.series_id for a in accepted}))
        new: list[tuple[int, Column]] = []
        laid_out: list[tuple[Accepted, dict[int, Cells]]] = []
        rows = 0
        for a in accepted:
            await hide_superseded(conn, "table_rows", a)
        for a in accepted:
            block = a.chunk.payload[0] if a.chunk.payload else None
            assert isinstance(block, TableBlock)
            added: list[Column] = []
            cells = layout(block, a.index, columns.setdefault(a.series_id, {}), added)
            new += [(a.series_id, c) for c in added]
            laid_out.append((a, cells))
            rows += int(a.index.size)
        if new:
            await conn.execute(
                "INSERT INTO table_columns (series_id, position, name, type, slot)"
                " SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::int2[], $5::int[])",
                [sid for sid, _ in new],
                [c.position for _, c in new],
                [c.name for _, c in new],
                [c.type for _, c in new],
                [c.slot for _, c in new],
            )
        await conn.copy_to_table(
            "table_rows",
            source=_copy_stream(laid_out),
            columns=TABLE_ROW_COLUMNS,
            format="binary",
        )
        return rows

    async def write_evaluations(self, conn: asyncpg.Connection, accepted: list[Accepted]) -> int:
        """Append the accepted documents (the JSON text as validated; jsonb
        parses it again, a cost that does not matter at these volumes)."""
        cols: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for a in accepted:
            await hide_superseded(conn, "evaluation_points", a)
            docs = a.chunk.payload or []
            for i in a.index.tolist():
                doc = docs[i]
                assert isinstance(doc, Document)
                for col, value in zip(
                    cols,
                    (
                        datetime.fromtimestamp(float(a.chunk.times[i]), UTC),
                        a.series_id,
                        int(a.chunk.steps[i]),
                        doc.schema_type,
                        doc.schema_version,
                        doc.text,
                    ),
                    strict=True,
                ):
                    col.append(value)
        await conn.execute(
            "INSERT INTO evaluation_points"
            " (time, series_id, step, schema_type, schema_version, document)"
            " SELECT t, s, st, ty, v, d::jsonb FROM unnest($1::timestamptz[], $2::bigint[],"
            " $3::bigint[], $4::text[], $5::text[], $6::text[]) AS u(t, s, st, ty, v, d)",
            *cols,
        )
        return len(cols[0])

    # -- reads -------------------------------------------------------------------

    async def read_tables(self, series: Sequence[SeriesHead], window: Window) -> Read:
        """Visible rows of a window in step order (for an unstepped table the
        step is the row index, so start/end select a row range). Every row
        carries a cell of every column, so a row's encoded bytes are bounded
        by 16 per column plus its strings."""
        ids = [s.series_id for s in series]
        async with self._conn() as conn:
            columns = await self._columns(conn, ids)
            header = sum(
                len(c.name.encode()) + 24 for cols in columns.values() for c in cols.values()
            )
            got = await visible_points(
                conn,
                "table_rows",
                [(c, c) for c in ("doubles", "ints", "strings", "bools")],
                ids,
                replace(window, budget=window.budget - header),
                cost="18 + coalesce(octet_length(array_to_string(strings, '')), 0)",
                per_point={sid: 16 * len(columns.get(sid, {})) for sid in ids},
            )
        ordered = {
            sid: sorted(cols.values(), key=lambda c: c.position) for sid, cols in columns.items()
        }
        return Read(replace(got, used=got.used + header), columns=ordered)

    async def read_evaluations(self, series: Sequence[SeriesHead], window: Window) -> Read:
        ids = [s.series_id for s in series]
        async with self._conn() as conn:
            got = await visible_points(
                conn,
                "evaluation_points",
                [("document::text", "document")],
                ids,
                window,
                cost="octet_length(document) + 24",
            )
        return Read(got)
