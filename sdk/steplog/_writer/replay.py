"""`steplog sync`: replay every spooled record to the service, in the order
the points were logged (across writer ids, processes and hosts), any number of
times; what the service already stored is acknowledged as a duplicate batch.
The spool format is steplog._writer.spool."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from steplog._retry import RETRY_TABLE
from steplog._writer.spool import (
    BATCH,
    open_spool,
    remove_spool_file,
    spool_files,
)
from steplog._writer.transport import Backoff, Rejection, Transport, TransportError, reason_name
from steplog._writer.wire import series_points
from steplog.v1 import ingest_service_pb2 as pb


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
