"""The spool: sequenced batches (and offline run operations) on local disk.
Their replay (`steplog sync`) is steplog._writer.replay.

Format: one SQLite database per writer process, `<writer id>.spool.sqlite` in
the spool directory, in WAL mode with `synchronous=NORMAL` (as
neptune-client-scale keeps its queue). Every record is its own transaction, so
a record is either whole or absent after a crash; a committed record survives
`kill -9` of the process (it is in the WAL, in the OS page cache) and, once the
writer has synced (flush, close; a WAL checkpoint), a power loss as well.

    meta(key, value)          format = "1"
    records(id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind,             "batch", or an offline run operation
                              ("UpdateRunStatus", "UpdateRunTags", "AddRunProperties")
            order_time,       wall-clock seconds the record was made; never
                              decreasing within a file (the logical order)
            writer_id, sequence,
                              a batch's identity on the wire; they override the
                              ones inside the payload (a batch may be re-stamped
                              under a new writer id before it is sent)
            points,           points in the batch (0 for an operation)
            payload,          the serialized IngestRequest, or the operation's
                              RunService request
            replay_writer_id, replay_sequence,
                              set by `steplog sync` when it re-sequences a
                              batch past a gap; later replays reuse them
            refused)          why `steplog sync` could not deliver it last time
    acked(writer_id, through) every sequence <= through was acknowledged by the
                              service, and its record deleted

Replay sorts the records of every file in the directory by (order_time, file,
id): the order the points were logged in, across writer ids, processes and
hosts (clocks of different hosts are trusted to agree within the time between
a crash and the resume). Because every batch carries its writer id and
sequence, replaying a spool any number of times stores each point once: the
service answers `duplicate_batch` for what it already committed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SPOOL_SUFFIX = ".spool.sqlite"
FORMAT_VERSION = "1"
BATCH = "batch"
RUN_OPERATIONS = ("UpdateRunStatus", "UpdateRunTags", "AddRunProperties")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    order_time REAL NOT NULL,
    writer_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    points INTEGER NOT NULL,
    payload BLOB NOT NULL,
    replay_writer_id TEXT,
    replay_sequence INTEGER,
    refused TEXT
);
CREATE TABLE IF NOT EXISTS acked (writer_id TEXT PRIMARY KEY, through INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('format', '1');
"""


class SpoolFormatError(OSError):
    """A file in the spool directory is not a spool this version can read."""


def open_spool(path: Path, *, create: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (each statement, or BEGIN..COMMIT, is a
    transaction), WAL journal, usable from any thread (callers serialize)."""
    if not create and not path.exists():
        raise FileNotFoundError(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if create:
            db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise SpoolFormatError(f"{path}: not a steplog spool ({exc})") from None
    if row is None or row[0] != FORMAT_VERSION:
        db.close()
        raise SpoolFormatError(f"{path}: spool format {row and row[0]!r}, expected 1")
    return db


@dataclass(slots=True, eq=False)
class SpoolRef:
    """One batch record: its row, and the identity it is stored under."""

    rowid: int
    writer_id: str
    sequence: int


class SpoolWriter:
    """Appends the records of one writer process and deletes them once
    acknowledged (`keep=False`, the online spool; offline records stay until
    `steplog sync --remove`). Thread-safe; one connection, opened lazily."""

    def __init__(self, directory: Path, name: str, *, keep: bool) -> None:
        self.directory = directory
        self.path = directory / f"{name}{SPOOL_SUFFIX}"
        self.keep = keep
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._last_time = 0.0
        self._dirty = False

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = open_spool(self.path, create=True)
        return self._db

    def _order_time(self) -> float:
        self._last_time = max(time.time(), self._last_time)
        return self._last_time

    def append(self, payload: bytes, writer_id: str, sequence: int, points: int) -> SpoolRef:
        """Store one batch (committed when this returns). Raises OSError."""
        with self._lock:
            try:
                cur = self._conn().execute(
                    "INSERT INTO records (kind, order_time, writer_id, sequence, points, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (BATCH, self._order_time(), writer_id, sequence, points, payload),
                )
            except sqlite3.Error as exc:
                raise OSError(f"spool {self.path}: {exc}") from exc
            self._dirty = True
            assert cur.lastrowid is not None
            return SpoolRef(cur.lastrowid, writer_id, sequence)

    def append_operation(self, kind: str, payload: bytes) -> None:
        """Store an offline run operation, after every batch stored so far."""
        assert kind in RUN_OPERATIONS, kind
        with self._lock:
            try:
                self._conn().execute(
                    "INSERT INTO records (kind, order_time, writer_id, sequence, points, payload)"
                    " VALUES (?, ?, '', 0, 0, ?)",
                    (kind, self._order_time(), payload),
                )
            except sqlite3.Error as exc:
                raise OSError(f"spool {self.path}: {exc}") from exc
            self._dirty = True

    def read(self, ref: SpoolRef) -> bytes:
        with self._lock:
            try:
                row = (
                    self._conn()
                    .execute("SELECT payload FROM records WHERE id = ?", (ref.rowid,))
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise OSError(f"spool {self.path}: {exc}") from exc
        if row is None:
            raise OSError(f"spool {self.path}: record {ref.rowid} is gone")
        return bytes(row[0])

    def restamp(self, ref: SpoolRef, writer_id: str, sequence: int) -> None:
        """The batch will be sent under another writer id and sequence."""
        if (ref.writer_id, ref.sequence) == (writer_id, sequence):
            return
        with self._lock:
            try:
                self._conn().execute(
                    "UPDATE records SET writer_id = ?, sequence = ? WHERE id = ?",
                    (writer_id, sequence, ref.rowid),
                )
            except sqlite3.Error as exc:
                raise OSError(f"spool {self.path}: {exc}") from exc
        ref.writer_id, ref.sequence = writer_id, sequence

    def release(self, ref: SpoolRef) -> None:
        """The batch was acknowledged: delete it, remember the progress."""
        if self.keep:
            return
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN")
                db.execute("DELETE FROM records WHERE id = ?", (ref.rowid,))
                db.execute(
                    "INSERT INTO acked (writer_id, through) VALUES (?, ?) ON CONFLICT (writer_id)"
                    " DO UPDATE SET through = max(through, excluded.through)",
                    (ref.writer_id, ref.sequence),
                )
                db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                # Not fatal: a replay sends it again and is told it is a duplicate.

    def sync(self) -> None:
        """Make every committed record durable against a power loss too."""
        with self._lock:
            if self._db is None or not self._dirty:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(FULL)")
            except sqlite3.Error as exc:
                raise OSError(f"spool {self.path}: {exc}") from exc
            self._dirty = False

    def close(self) -> None:
        """Close; an online spool with nothing left in it is deleted."""
        with self._lock:
            db, self._db = self._db, None
            if db is None:
                return
            left = 1
            with contextlib.suppress(sqlite3.Error):
                left = db.execute("SELECT count(*) FROM records").fetchone()[0]
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
            if not self.keep and left == 0:
                remove_spool_file(self.path)

    def abandon(self) -> object | None:
        """In a forked child: forget the parent's connection without using it
        (returned, so the caller keeps it referenced and never finalized)."""
        db, self._db = self._db, None
        self._lock = threading.Lock()
        return db


def remove_spool_file(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def spool_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob(f"*{SPOOL_SUFFIX}") if p.is_file())


def spooled_records(path: Path) -> Iterator[tuple[str, str, int, int]]:
    """(kind, writer_id, sequence, points) of every record of one file, in order."""
    db = open_spool(path, create=False)
    try:
        yield from db.execute("SELECT kind, writer_id, sequence, points FROM records ORDER BY id")
    finally:
        db.close()
