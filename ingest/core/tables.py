"""Table chunks: parsing, validation and column types. Pure: numpy only.

A table batch arrives as `TableColumns`: typed columns with optional presence
masks. `validate_table` turns it into a `TableBlock` of numpy arrays and
rejects what is malformed: a column whose array does not hold row_count
values, an unknown type or a bad name spoils the whole chunk (the client built
it wrong); an oversize string cell or a cell given twice spoils only its row.

A column's type is fixed by its first value for the life of the series. That
needs the stored schema, so `resolve_types` runs in the store's transaction,
after the series row is locked: a cell of another type is rejected with the
column named (an int64 cell in a double column is widened, the one change that
loses nothing a user cares about). The same name may arrive as several typed
parts in one chunk; that is how a client sends a column holding mixed types,
and the rows whose cell has the wrong type are rejected, the others kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingest.core.batch import (
    INVALID_TABLE,
    INVALID_VALUE,
    LIMIT_EXCEEDED,
    Chunk,
    Mask,
    Outcome,
)
from ingest.core.checks import CONTROL, clip

# steplog.v1.ColumnType values (kept here so pure code needs no proto import).
DOUBLE = 1
INT64 = 2
STRING = 3
BOOL = 4
TYPE_NAMES = {DOUBLE: "double", INT64: "int64", STRING: "string", BOOL: "bool"}

MAX_COLUMN_NAME = 255
# A column name may arrive as one part per type (a column of mixed types).
PARTS_PER_COLUMN = len(TYPE_NAMES)


@dataclass
class ColumnPart:
    """The cells of one column with one type. `values` holds row_count
    entries (a placeholder where `present` is false)."""

    name: str
    type: int
    values: Any  # float64 / int64 / bool ndarray, or list[str]
    present: Mask

    def take(self, index: Any) -> Any:
        """The cells at `index` (sorted, distinct: np.flatnonzero of a mask),
        a list for strings: every row is the list itself, not a copy by index."""
        if isinstance(self.values, list):
            n = len(self.values)
            if n and index.shape[0] == n and index[0] == 0 and index[-1] == n - 1:
                return self.values
            return [self.values[i] for i in index.tolist()]
        return self.values[index]


@dataclass
class TableBlock:
    """A validated table chunk: row_count rows as typed column parts."""

    row_count: int
    parts: list[ColumnPart] = field(default_factory=list)

    def columns(self) -> Iterator[tuple[str, list[ColumnPart]]]:
        """(name, parts) in order of first appearance."""
        grouped: dict[str, list[ColumnPart]] = {}
        for part in self.parts:
            grouped.setdefault(part.name, []).append(part)
        yield from grouped.items()


@dataclass
class Rejection:
    """Rows to reject, why, and the message that names the column."""

    rows: Mask
    reason: int
    message: str


def column_name_problem(name: str) -> str | None:
    if not name:
        return "a column name is empty"
    if len(name) > MAX_COLUMN_NAME:
        return f"column name {clip(name, 40)!r} is longer than {MAX_COLUMN_NAME} characters"
    if CONTROL.search(name):
        return f"column name {clip(name, 70)!r} contains a control character"
    return None


def _column_problem(col: Any, n: int) -> str | None:
    """Why a proto Column cannot be n rows of one type, from its lengths
    alone (nothing is copied)."""
    name = col.name
    problem = column_name_problem(name)
    if problem:
        return problem
    arrays = {DOUBLE: col.doubles, INT64: col.ints, STRING: col.strings, BOOL: col.bools}
    ctype = int(col.type)
    if ctype not in arrays:
        return f"column {name!r} has no type (one of double, int64, string, bool)"
    own = arrays.pop(ctype)
    if len(own) != n or any(len(other) for other in arrays.values()):
        return (
            f"column {name!r} is {TYPE_NAMES[ctype]}: it must carry exactly row_count ({n}) "
            f"{TYPE_NAMES[ctype]} values and nothing else (it has {len(own)})"
        )
    if len(col.present) not in (0, n):
        return f"column {name!r} has {len(col.present)} presence flags for {n} rows"
    return None


def table_structure_problem(
    msg: Any, n: int, max_rows: int, max_columns: int
) -> tuple[int, str] | None:
    """(reason, message) when a TableColumns cannot be n rows, checked from
    lengths before anything is allocated for them: row_count over the limit,
    rows that no column, step or time carries (row_count is a claim the data
    must back), too many columns, a malformed column."""
    if n > max_rows:
        return LIMIT_EXCEEDED, f"{n} rows in one request; the limit is {max_rows}"
    columns = msg.columns
    if len(columns) == 0 and len(msg.steps) == 0 and len(msg.times) == 0:
        return INVALID_TABLE, f"row_count is {n} but no column, step or time carries a row"
    if len(columns) > PARTS_PER_COLUMN * max_columns:
        return (
            LIMIT_EXCEEDED,
            f"{len(columns)} column parts in one request; the limit is {max_columns} columns",
        )
    names: set[str] = set()
    for col in columns:
        problem = _column_problem(col, n)
        if problem is not None:
            return INVALID_TABLE, problem
        names.add(col.name)
    if len(names) > max_columns:
        return LIMIT_EXCEEDED, f"{len(names)} columns in one request; the limit is {max_columns}"
    return None


def _part(col: Any, n: int) -> ColumnPart:
    """One proto Column (already checked) -> ColumnPart."""
    ctype = int(col.type)
    own = {DOUBLE: col.doubles, INT64: col.ints, STRING: col.strings, BOOL: col.bools}[ctype]
    present = (
        np.array(col.present, dtype=np.bool_) if len(col.present) else np.ones(n, dtype=np.bool_)
    )
    values: Any
    if ctype == DOUBLE:
        values = np.array(own, dtype=np.float64)
    elif ctype == INT64:
        values = np.array(own, dtype=np.int64)
    elif ctype == BOOL:
        values = np.array(own, dtype=np.bool_)
    else:
        values = list(own)
    return ColumnPart(col.name, ctype, values, present)


def parse_table(
    msg: Any, n: int, max_columns: int, checked: bool = False, max_rows: int | None = None
) -> tuple[TableBlock, int, str | None]:
    """TableColumns -> TableBlock; on a whole-chunk problem, (empty block,
    reason, message). checked: table_structure_problem already passed."""
    if not checked:
        found = table_structure_problem(msg, n, n if max_rows is None else max_rows, max_columns)
        if found is not None:
            return TableBlock(n), found[0], found[1]
    return TableBlock(n, [_part(col, n) for col in msg.columns]), 0, None


def cell_problems(block: TableBlock, max_text_chars: int) -> list[Rejection]:
    """Row-level problems inside one chunk: a cell given twice, a string with
    NUL (INVALID_VALUE: PostgreSQL text cannot hold it) or over the length
    limit (LIMIT_EXCEEDED)."""
    out: list[Rejection] = []
    for name, parts in block.columns():
        if len(parts) > 1:
            twice = np.sum([p.present for p in parts], axis=0) > 1
            if twice.any():
                out.append(
                    Rejection(twice, INVALID_TABLE, f"column {name!r} has two values in one row")
                )
        for p in parts:
            if p.type != STRING:
                continue
            strings: list[str] = p.values
            if max(map(len, strings), default=0) <= max_text_chars and "\x00" not in "".join(
                strings
            ):
                continue  # the common case, checked in C
            nul = np.fromiter(("\x00" in s for s in strings), dtype=np.bool_, count=len(strings))
            nul &= p.present
            if nul.any():
                out.append(Rejection(nul, INVALID_VALUE, f"column {name!r}: string contains NUL"))
            long = np.fromiter(
                (len(s) > max_text_chars for s in strings), dtype=np.bool_, count=len(strings)
            )
            long &= p.present & ~nul
            if long.any():
                out.append(
                    Rejection(
                        long,
                        LIMIT_EXCEEDED,
                        f"column {name!r}: string longer than {max_text_chars} characters",
                    )
                )
    return out


def validate_table(
    chunk: Chunk,
    outcome: Outcome,
    max_columns: int,
    max_rows: int,
    max_text_chars: int,
    checked: bool = False,
) -> None:
    """Replace the chunk's TableColumns payload with a TableBlock and reject
    what is malformed; the valid rows stay alive. checked: decode already ran
    table_structure_problem on it."""
    n = len(chunk)
    msg = chunk.payload[0] if chunk.payload else None
    if msg is None:
        chunk.payload = [TableBlock(n)]
        outcome.reject(chunk, None, INVALID_TABLE, "a table chunk without its columns")
        return
    block, reason, problem = parse_table(msg, n, max_columns, checked, max_rows)
    chunk.payload = [block]
    if problem is not None:
        outcome.reject(chunk, None, reason, problem)
        return
    for r in cell_problems(block, max_text_chars):
        outcome.reject(chunk, r.rows, r.reason, r.message)


def resolve_types(
    block: TableBlock, alive: Mask, known: dict[str, int], max_columns: int
) -> tuple[list[Rejection], dict[str, int]]:
    """Check the alive cells against the series' column types (`known`) and
    fix the type of each new column by its first alive cell in row order.

    Columns with a stored type go first, so a row rejected there cannot fix
    the type of a new column. Int64 parts of double columns are converted in
    place (idempotent: a retried transaction may run this again). Returns the
    rows to reject and the new columns with their types; `known` is kept."""
    alive = alive.copy()
    rejections: list[Rejection] = []
    new: dict[str, int] = {}

    def reject(rows: Mask, reason: int, message: str) -> None:
        rows = rows & alive
        if rows.any():
            rejections.append(Rejection(rows, reason, message))
            alive[rows] = False

    columns = list(block.columns())
    for name, parts in sorted(columns, key=lambda c: c[0] not in known):
        ctype = known.get(name)
        if ctype is None:
            first = [
                (int(np.argmax(p.present & alive)), i)
                for i, p in enumerate(parts)
                if (p.present & alive).any()
            ]
            if not first:
                continue
            if len(known) + len(new) >= max_columns:
                reject(
                    np.any([p.present for p in parts], axis=0),
                    LIMIT_EXCEEDED,
                    f"column {name!r} would be column {len(known) + len(new) + 1} of this "
                    f"table; the limit is {max_columns}",
                )
                continue
            ctype = parts[min(first)[1]].type
            new[name] = ctype
        for p in parts:
            if p.type == ctype:
                continue
            if p.type == INT64 and ctype == DOUBLE:
                p.values = p.values.astype(np.float64)
                p.type = DOUBLE
                continue
            reject(
                p.present,
                INVALID_TABLE,
                f"column {name!r} holds {TYPE_NAMES[ctype]} values; this row's is "
                f"{TYPE_NAMES[p.type]} (a column's type is fixed by its first value)",
            )
    return rejections, new
