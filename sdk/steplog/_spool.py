"""The spool: sequenced batches on local disk, and their replay.

Format: files `<writer_id>.<n>.spool` in the spool directory, each a sequence of
records `varint(length) + serialized IngestRequest` (workspace, and a batch with
writer_id and sequence). A crash can leave a torn last record; readers stop
there and report it. Because every record carries its writer id and sequence
number, replaying a spool any number of times stores each point once: the
service answers `duplicate_batch` for what it already committed.

Files are written unbuffered (raw `FileIO`) so a forked child that inherits an
open spool can never flush the parent's bytes a second time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from steplog._buffers import encode_varint, series_points
from steplog._transport import Backoff, Rejection, Transport, TransportError
from steplog.v1 import ingest_service_pb2 as pb

SPOOL_SUFFIX = ".spool"
SEGMENT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpoolRef:
    """Where one record's payload lives."""

    path: Path
    offset: int
    length: int


class SpoolWriter:
    """Appends records to segment files of one writer, reads them back, and (in
    `keep=False` mode, the online spill) deletes a segment once every record in
    it has been released. Used by the writer's sender thread only."""

    def __init__(self, directory: Path, name: str, *, keep: bool) -> None:
        self.directory = directory
        self.name = name
        self.keep = keep
        self._file: _RawFile | None = None
        self._path: Path | None = None
        self._size = 0
        self._index = 0
        self._live: dict[Path, int] = {}
        self._dirty = False

    def append(self, payload: bytes) -> SpoolRef:
        if self._file is None or self._size >= SEGMENT_BYTES:
            self._rotate()
        assert self._file is not None and self._path is not None
        header = encode_varint(len(payload))
        self._file.write_all(header + payload)
        ref = SpoolRef(self._path, self._size + len(header), len(payload))
        self._size += len(header) + len(payload)
        self._live[self._path] = self._live.get(self._path, 0) + 1
        self._dirty = True
        return ref

    def _rotate(self) -> None:
        previous = self._path
        if self._file is not None:
            self._file.sync()
            self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            self._index += 1
            path = self.directory / f"{self.name}.{self._index:06d}{SPOOL_SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # a previous process with this writer id left a segment
            break
        self._file = _RawFile(fd)
        self._path = path
        self._size = 0
        self._live.setdefault(path, 0)
        _fsync_dir(self.directory)
        if previous is not None:
            self._collect(previous)

    def read(self, ref: SpoolRef) -> bytes:
        with open(ref.path, "rb", buffering=0) as f:
            f.seek(ref.offset)
            data = f.read(ref.length)
        if len(data) != ref.length:
            raise OSError(f"spool record truncated in {ref.path}")
        return data

    def release(self, ref: SpoolRef) -> None:
        """The record was acknowledged: its segment may go once all are."""
        if self.keep:
            return
        self._live[ref.path] = self._live.get(ref.path, 1) - 1
        if ref.path != self._path:
            self._collect(ref.path)

    def _collect(self, path: Path) -> None:
        if not self.keep and self._live.get(path, 0) <= 0:
            self._live.pop(path, None)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def sync(self) -> None:
        if self._file is not None and self._dirty:
            self._file.sync()
            self._dirty = False

    def close(self) -> None:
        if self._file is not None:
            self._file.sync()
            self._file.close()
            self._file = None
        for path in list(self._live):
            self._collect(path)
        self._path = None

    def abandon(self) -> None:
        """In a forked child: drop the parent's file without touching it."""
        self._file = None
        self._path = None
        self._live.clear()


class _RawFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def iter_records(path: Path) -> Iterator[tuple[SpoolRef, bytes]]:
    """Every complete record of one spool file; stops at a torn tail
    (ValueError after the last good record)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        try:
            length, start = _decode_varint(data, pos)
        except ValueError:
            raise ValueError(f"{path}: torn record at byte {pos}") from None
        if start + length > len(data):
            raise ValueError(f"{path}: torn record at byte {pos}")
        yield SpoolRef(path, start, length), data[start : start + length]
        pos = start + length


def spool_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{SPOOL_SUFFIX}") if p.is_file())


@dataclass
class ReplayReport:
    """What `replay_spool` did. `ok` when every spooled batch was acknowledged."""

    files: int = 0
    batches: int = 0
    points: int = 0
    duplicate_batches: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    # writer id -> why its remaining batches were not sent
    errors: dict[str, str] = field(default_factory=dict)
    torn_files: list[Path] = field(default_factory=list)
    removed_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        text = (
            f"{self.batches} batches ({self.duplicate_batches} already stored) from "
            f"{self.files} files: {self.accepted} points accepted, {self.duplicates} "
            f"duplicates, {self.rejected} rejected"
        )
        for writer, error in self.errors.items():
            text += f"\nwriter {writer}: {error}"
        for path in self.torn_files:
            text += f"\n{path}: torn last record ignored"
        return text


_MAX_REJECTIONS_KEPT = 10_000


def replay_spool(
    spool_dir: Path,
    transport: Transport,
    *,
    timeout: float = 60.0,
    attempts: int = 8,
    remove: bool = False,
    backoff: Backoff | None = None,
) -> ReplayReport:
    """Send every spooled batch with the unary `Write`, in sequence order per
    writer. Safe to run any number of times: the service acknowledges what it
    already stored as a duplicate batch and writes nothing again.

    Retryable errors are retried (`attempts` tries per batch, jittered backoff);
    a batch that still fails, or fails with a non-retryable code, stops that
    writer (its later batches would leave a gap) and is reported in `errors`.
    With `remove=True`, files whose batches were all acknowledged are deleted.
    """
    report = ReplayReport()
    # First pass: an index, not the data, so a large spool is never all in memory.
    index: dict[str, dict[int, SpoolRef]] = defaultdict(dict)
    files_of: dict[Path, set[tuple[str, int]]] = defaultdict(set)
    for path in spool_files(Path(spool_dir)):
        report.files += 1
        try:
            for ref, payload in iter_records(path):
                request = pb.IngestRequest.FromString(payload)
                writer, seq = request.batch.writer_id, int(request.batch.sequence)
                index[writer].setdefault(seq, ref)
                files_of[path].add((writer, seq))
        except ValueError:
            report.torn_files.append(path)
    delivered: set[tuple[str, int]] = set()
    wait = backoff or Backoff(0.2, 10.0)
    for writer in sorted(index):
        for seq in sorted(index[writer]):
            ref = index[writer][seq]
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                write = pb.WriteRequest.FromString(f.read(ref.length))  # same fields
            error = _write_with_retries(transport, write, timeout, attempts, wait)
            if isinstance(error, TransportError):
                report.errors[writer] = f"sequence {seq}: {error}"
                break
            report.batches += 1
            report.points += sum(series_points(rs.series) for rs in write.batch.series)
            _account(report, error)
            delivered.add((writer, seq))
    if remove:
        for path, records in files_of.items():
            if records <= delivered and path not in report.torn_files:
                path.unlink(missing_ok=True)
                report.removed_files.append(path)
    return report


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
            if not err.retryable or attempt == attempts - 1:
                return err
            time.sleep(backoff.next_delay(err.retry_after))
    return TransportError(grpc.StatusCode.UNKNOWN, "no attempt made")


def _account(report: ReplayReport, response: pb.WriteResponse) -> None:
    if response.duplicate_batch:
        report.duplicate_batches += 1
    result = response.result
    report.accepted += result.accepted
    report.duplicates += result.duplicates
    report.rejected += result.rejected
    for point in result.rejected_points:
        if len(report.rejections) < _MAX_REJECTIONS_KEPT:
            report.rejections.append(Rejection.from_proto(point))
