"""The spool: sequenced batches (and offline run operations) on local disk,
and their replay (`steplog sync`).

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
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from steplog._buffers import series_points
from steplog._retry import RETRY_TABLE
from steplog._transport import Backoff, Rejection, Transport, TransportError, reason_name
from steplog.v1 import ingest_service_pb2 as pb

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


# ------------------------------------------------------------------- replay


@dataclass
class ReplayReport:
    """What `replay_spool` did. `ok` when every spooled record was delivered
    and stored (no batch refused or left unsent, no point rejected)."""

    files: int = 0
    batches: int = 0
    points: int = 0
    duplicate_batches: int = 0
    accepted: int = 0
    already_stored: int = 0  # points of duplicate batches the service had stored before
    duplicates: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    refused_batches: int = 0  # refused whole (a non-retryable status)
    refused_points: int = 0
    unsent_points: int = 0  # not sent: the service could not be reached (run sync again)
    operations: int = 0  # offline run operations applied
    # writer id (or the file / operation) -> why records were not delivered
    errors: dict[str, str] = field(default_factory=dict)
    # what the spool does not hold, per writer: acknowledged earlier, or gone
    gaps: list[str] = field(default_factory=list)
    unreadable_files: list[Path] = field(default_factory=list)
    removed_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.errors or self.rejected or self.refused_points or self.unreadable_files)

    def __str__(self) -> str:
        text = (
            f"{self.files} file(s), {self.batches} batch(es), {self.points} point(s): "
            f"{self.accepted} accepted, {self.already_stored} already stored "
            f"({self.duplicate_batches} batch(es) already stored), {self.duplicates} duplicate, "
            f"{self.rejected} rejected, {self.refused_points} refused, "
            f"{self.unsent_points} not sent; {self.operations} run operation(s) applied"
        )
        if self.rejected_by_reason:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected_by_reason.items()))
            text += f"\nrejected points by reason: {reasons}"
        for gap in self.gaps:
            text += f"\n{gap}"
        for who, error in self.errors.items():
            text += f"\n{who}: {error}"
        for path in self.unreadable_files:
            text += f"\n{path}: unreadable, skipped"
        return text


_MAX_REJECTIONS_KEPT = 10_000

# Applies one offline run operation (kind, serialized request); raises
# TransportError when the service refuses it.
ApplyOperation = Callable[[str, bytes], None]


@dataclass(slots=True)
class _Record:
    order_time: float
    file: int
    rowid: int
    kind: str
    writer_id: str
    sequence: int
    points: int
    replay_writer_id: str | None
    replay_sequence: int | None


def _is_outage(err: TransportError) -> bool:
    """The service cannot take anything now (retried without a bound in
    steplog._retry): later records must wait too, or they would overtake."""
    rule = RETRY_TABLE.get(err.retry_code)  # a lost stream counts as UNAVAILABLE
    return err.retryable and rule is not None and rule.attempts is None


def _is_gap(err: TransportError) -> bool:
    """The service answers ABORTED only for a sequence gap (see protos)."""
    return err.code == grpc.StatusCode.ABORTED


def _gap_id(writer_id: str, sequence: int) -> str:
    """The writer id a writer's batches from `sequence` on are re-sent under
    when the service cannot take them under their own (deterministic, so a
    second replay finds the same id and is told "duplicate")."""
    suffix = f".g{sequence}"
    return writer_id[: 128 - len(suffix)] + suffix


def _ranges(numbers: list[int]) -> str:
    """ "3, 7-9" for [3, 7, 8, 9] (sorted)."""
    out: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:]:
        if n != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = n
        prev = n
    out.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def replay_spool(
    spool_dir: Path,
    transport: Transport,
    *,
    timeout: float = 60.0,
    attempts: int = 8,
    remove: bool = False,
    backoff: Backoff | None = None,
    apply_operation: ApplyOperation | None = None,
) -> ReplayReport:
    """Send every spooled record, in the order it was logged, with the unary
    `Write` (batches) and `apply_operation` (offline run operations). Safe to
    run any number of times: what the service already stored is acknowledged
    as a duplicate batch and written nothing again.

    - Errors are retried as steplog._retry says, at most `attempts` tries with
      jittered backoff. When the service stays unreachable the replay stops
      there (the later records would overtake it), and what was not sent is
      counted in `unsent_points`.
    - A batch the service refuses whole (a code not retried, or INTERNAL /
      UNKNOWN after their bound) is counted in
      `refused_points` and kept; the writer's later batches go on under a new
      writer id (`<id>.g<sequence>`), so the refused one holds nothing back.
    - A sequence gap (a batch the service never stored and the spool does not
      hold: gone) is reported, and the writer's later batches go on likewise.
    - With `remove=True`, delivered records are deleted, and files left empty.
    """
    report = ReplayReport()
    conns: list[sqlite3.Connection] = []
    paths: list[Path] = []
    records: list[_Record] = []
    acked: dict[str, int] = {}
    for path in spool_files(Path(spool_dir)):
        report.files += 1
        try:
            db = open_spool(path, create=False)
            rows = db.execute(
                "SELECT order_time, id, kind, writer_id, sequence, points,"
                " replay_writer_id, replay_sequence FROM records"
            ).fetchall()
            for writer, through in db.execute("SELECT writer_id, through FROM acked"):
                acked[writer] = max(acked.get(writer, 0), int(through))
        except (OSError, sqlite3.Error) as exc:
            report.unreadable_files.append(path)
            report.errors[str(path)] = f"unreadable: {exc}"
            continue
        index = len(conns)
        conns.append(db)
        paths.append(path)
        records.extend(_Record(r[0], index, r[1], *r[2:]) for r in rows)
    try:
        _report_gaps(records, acked, report)
        records.sort(key=lambda r: (r.order_time, r.file, r.rowid))
        _replay(
            records, conns, transport, report, timeout, attempts, backoff, apply_operation, remove
        )
        if remove:
            for db, path in zip(conns, paths, strict=True):
                left = db.execute("SELECT count(*) FROM records").fetchone()[0]
                if left == 0:
                    db.close()
                    remove_spool_file(path)
                    report.removed_files.append(path)
    finally:
        for db in conns:
            with contextlib.suppress(sqlite3.Error):
                db.close()
    return report


def _report_gaps(records: list[_Record], acked: dict[str, int], report: ReplayReport) -> None:
    by_writer: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if r.kind == BATCH:
            by_writer[r.writer_id].append(r.sequence)
    for writer, seqs in sorted(by_writer.items()):
        seqs.sort()
        through = acked.get(writer, 0)
        if through:
            report.gaps.append(
                f"writer {writer}: sequences 1-{through} were acknowledged by the service "
                "before (not in the spool, nothing to send)"
            )
        present = set(seqs)
        missing = [s for s in range(through + 1, seqs[-1]) if s not in present]
        if missing:
            report.gaps.append(
                f"writer {writer}: sequences {_ranges(missing)} are not in the spool and were "
                "not acknowledged: gone (points lost before they reached the disk)"
            )


def _replay(
    records: list[_Record],
    conns: list[sqlite3.Connection],
    transport: Transport,
    report: ReplayReport,
    timeout: float,
    attempts: int,
    backoff: Backoff | None,
    apply_operation: ApplyOperation | None,
    remove: bool,
) -> None:
    wait = backoff or Backoff(0.2, 10.0)
    # writer id -> (the id its later batches are re-sent under, next sequence)
    moved: dict[str, tuple[str, int]] = {}
    for i, rec in enumerate(records):
        db = conns[rec.file]
        row = db.execute("SELECT payload FROM records WHERE id = ?", (rec.rowid,)).fetchone()
        if rec.kind != BATCH:
            error = _apply(apply_operation, rec.kind, bytes(row[0]), wait, attempts)
            if isinstance(error, TransportError) and error.retryable:
                _stop(records[i:], report, f"operation {rec.kind}: {error}")
                return
            if error is not None:
                report.errors[f"operation {rec.kind} (record {rec.rowid})"] = str(error)
                _mark(db, rec, str(error))
            else:
                report.operations += 1
                _delivered(db, rec, remove)
            continue
        request = pb.WriteRequest.FromString(bytes(row[0]))  # the same fields
        batch = request.batch
        if rec.replay_writer_id:
            batch.writer_id, batch.sequence = rec.replay_writer_id, rec.replay_sequence or 0
        elif rec.writer_id in moved:
            _move(db, rec, batch, moved)
        else:
            batch.writer_id, batch.sequence = rec.writer_id, rec.sequence
        result = _write_with_retries(transport, request, timeout, attempts, wait)
        if isinstance(result, TransportError) and _is_gap(result) and not rec.replay_writer_id:
            report.gaps.append(
                f"writer {rec.writer_id}: the service expects an earlier sequence than "
                f"{rec.sequence}, which the spool does not hold (gone); sequences from "
                f"{rec.sequence} on are sent as writer {_gap_id(rec.writer_id, rec.sequence)}"
            )
            moved[rec.writer_id] = (_gap_id(rec.writer_id, rec.sequence), 1)
            _move(db, rec, batch, moved)
            result = _write_with_retries(transport, request, timeout, attempts, wait)
        points = sum(series_points(rs.series) for rs in batch.series)
        if isinstance(result, TransportError):
            if _is_outage(result):
                _stop(records[i:], report, f"sequence {rec.sequence}: {result}")
                return
            report.refused_batches += 1
            report.refused_points += points
            report.errors[f"writer {rec.writer_id}"] = (
                f"sequence {rec.sequence} ({points} points) refused: {result}"
            )
            _mark(db, rec, str(result))
            if rec.writer_id not in moved:
                nxt = rec.sequence + 1
                moved[rec.writer_id] = (_gap_id(rec.writer_id, nxt), 1)
            continue
        report.batches += 1
        report.points += points
        _account(report, result)
        _delivered(db, rec, remove)


def _move(
    db: sqlite3.Connection, rec: _Record, batch: pb.Batch, moved: dict[str, tuple[str, int]]
) -> None:
    """Send `rec` as the next batch of its writer's new id; persisted first,
    so a later replay sends it under the same id and sequence."""
    new_id, seq = moved[rec.writer_id]
    db.execute(
        "UPDATE records SET replay_writer_id = ?, replay_sequence = ? WHERE id = ?",
        (new_id, seq, rec.rowid),
    )
    rec.replay_writer_id, rec.replay_sequence = new_id, seq
    moved[rec.writer_id] = (new_id, seq + 1)
    batch.writer_id, batch.sequence = new_id, seq


def _stop(rest: list[_Record], report: ReplayReport, why: str) -> None:
    report.unsent_points += sum(r.points for r in rest)
    report.errors["service"] = (
        f"{why}; stopped there, {len(rest)} record(s) not sent (run `steplog sync` again)"
    )


def _mark(db: sqlite3.Connection, rec: _Record, why: str) -> None:
    with contextlib.suppress(sqlite3.Error):
        db.execute("UPDATE records SET refused = ? WHERE id = ?", (why[:1000], rec.rowid))


def _delivered(db: sqlite3.Connection, rec: _Record, remove: bool) -> None:
    """A record was delivered: deleted with `remove`, else kept as it is."""
    if remove:
        db.execute("DELETE FROM records WHERE id = ?", (rec.rowid,))


def _apply(
    apply_operation: ApplyOperation | None,
    kind: str,
    payload: bytes,
    backoff: Backoff,
    attempts: int,
) -> TransportError | None:
    if apply_operation is None:
        return TransportError(grpc.StatusCode.FAILED_PRECONDITION, "no way to apply it here")
    backoff.reset()
    for attempt in range(attempts):
        try:
            apply_operation(kind, payload)
            return None
        except TransportError as err:
            if not err.retryable or attempt == attempts - 1:
                return err
            time.sleep(backoff.next_delay(err.retry_after))
    return None


def _write_with_retries(
    transport: Transport,
    request: pb.WriteRequest,
    timeout: float,
    attempts: int,
    backoff: Backoff,
) -> pb.WriteResponse | TransportError:
    backoff.reset()
    for attempt in range(attempts):
        try:
            return transport.write(request, timeout=timeout)
        except TransportError as err:
            if _is_gap(err) or not err.retry_again(attempt + 1) or attempt == attempts - 1:
                return err
            time.sleep(backoff.next_delay(err.retry_after))
    return TransportError(grpc.StatusCode.UNKNOWN, "no attempt made")


def _account(report: ReplayReport, response: pb.WriteResponse) -> None:
    result = response.result
    if response.duplicate_batch:
        report.duplicate_batches += 1
        report.already_stored += result.accepted
    else:
        report.accepted += result.accepted
    report.duplicates += result.duplicates
    report.rejected += result.rejected
    for count in result.reject_counts:
        reason = reason_name(count.reason)
        report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + count.count
    for point in result.rejected_points:
        if len(report.rejections) < _MAX_REJECTIONS_KEPT:
            report.rejections.append(Rejection.from_proto(point))
