"""Files of a run: the background uploader, downloads, and image bytes.
(Over 500 lines: uploads and downloads share the hashing, the retry loop
over one stream and the temporary-file handling described below.)

Uploads run on a few daemon threads per client (`Uploader`), so a training
loop can hand a checkpoint over and go on (`wait=False`); by default the
call waits for the file to be stored, as Azure ML's did. One upload:

1. hashes the bytes (SHA-256): the header carries the hash, so the service
   can write straight to the content address and verify every byte before
   the file becomes visible;
2. streams the header and 1 MiB chunks (ArtifactService.UploadArtifact);
3. on a retryable status (steplog._retry) waits a jittered, growing delay
   and starts again from the first byte: the protocol has no offset, and
   nothing half-sent is ever visible. A retry of an upload that was stored
   but whose answer was lost is answered at once ("unchanged").
   DATA_LOSS means the bytes changed while being read: hashed again, once.
   Anything else (ALREADY_EXISTS, INVALID_ARGUMENT, NOT_FOUND) is raised.

Streams that cannot seek are copied to a temporary file first, and so are
all streams handed over with wait=False (the caller may close them).

Downloads run on the calling thread (it wants the file): the bytes go to a
temporary file beside the target, are checked against the size and SHA-256
in the header, and only then renamed into place; retryable failures start
again. A progress bar (tqdm) shows on a terminal for many or large files.

Over 500 lines because uploads and downloads share one retry loop, the
hashing and the progress bar; the uploader's threads are closed at exit and
reset after fork by steplog._lifecycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import queue
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import IO, TYPE_CHECKING, Any

import grpc

from steplog import _lifecycle
from steplog._writer.transport import Backoff, TransportError
from steplog.errors import InvalidArgumentError, ServiceError, SteplogError, from_rpc_error
from steplog.v1 import artifact_service_pb2 as ap
from steplog.v1 import artifact_service_pb2_grpc

if TYPE_CHECKING:
    from steplog.client import Client

CHUNK_BYTES = 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024
WORKERS = 4
# A progress bar shows (on a terminal) for more files than one, or this many bytes.
PROGRESS_BYTES = 32 * 1024 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_DOWNLOAD_ATTEMPTS_ON_MISMATCH = 3

BinarySource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


class UploadError(SteplogError):
    """An upload could not finish (the uploader closed, or was cancelled)."""


@dataclass(frozen=True)
class FileInfo:
    """A stored file of a run. `unchanged`: that content was there already."""

    name: str
    size: int
    sha256: str
    content_type: str
    unchanged: bool = False


def check_name(name: str, what: str = "name") -> str:
    """The service's rules for a file name, checked before any byte moves:
    relative, '/'-separated, no empty, '.' or '..' segment, no backslash, no
    NUL or control character."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "must be a non-empty string"
    elif _CONTROL.search(name):
        problem = "contains NUL or a control character"
    elif "\\" in name:
        problem = "contains a backslash; separate with '/'"
    elif name.startswith("/") or _DRIVE.match(name):
        problem = "must be relative"
    elif any(seg in ("", ".", "..") for seg in name.split("/")):
        problem = "has an empty, '.' or '..' segment"
    if problem:
        raise InvalidArgumentError(f"file {what} {str(name)[:80]!r} {problem}", field=what)
    return name


# -- sources ----------------------------------------------------------------------------


class Source:
    """Bytes to upload, readable again for every attempt."""

    def __init__(
        self,
        opener: Callable[[], contextlib.AbstractContextManager[IO[bytes]]],
        label: str,
        temporary: Path | None = None,
    ) -> None:
        self._opener = opener
        self.label = label
        self._temporary = temporary

    def open(self) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self._opener()

    def digest(self) -> tuple[str, int]:
        """SHA-256 and size of the bytes as they are now."""
        h = hashlib.sha256()
        size = 0
        with self.open() as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
                size += len(block)
        return h.hexdigest(), size

    def size(self) -> int | None:
        with contextlib.suppress(OSError, AttributeError, ValueError), self.open() as f:
            start = f.tell()
            end = f.seek(0, io.SEEK_END)
            return int(end - start)
        return None

    def discard(self) -> None:
        if self._temporary is not None:
            self._temporary.unlink(missing_ok=True)
            self._temporary = None


def source_of(value: BinarySource, *, snapshot: bool = False) -> Source:
    """A path, bytes, or a binary stream. With snapshot, a stream is copied
    now (to a temporary file), so the caller may close it at once."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        return Source(lambda: open(path, "rb"), str(path))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return Source(lambda: io.BytesIO(data), f"<{len(data)} bytes>")
    if not callable(getattr(value, "read", None)):
        raise InvalidArgumentError(
            f"expected a path, bytes or a binary stream, not {type(value).__name__}",
            field="path_or_stream",
        )
    stream = value
    seekable = False
    with contextlib.suppress(OSError, AttributeError, ValueError):
        seekable = bool(stream.seekable())
    if seekable and not snapshot:
        start = stream.tell()

        def reopen() -> contextlib.AbstractContextManager[IO[bytes]]:
            stream.seek(start)
            return contextlib.nullcontext(stream)

        return Source(reopen, repr(stream))
    fd, name = tempfile.mkstemp(prefix="steplog-upload-")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, _HASH_BLOCK)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return Source(lambda: open(temporary, "rb"), repr(stream), temporary)


def image_bytes(path: Any = None, plot: Any = None) -> bytes:
    """The encoded bytes of `log_image`'s argument: a file path, bytes, a
    binary stream, or (plot) a matplotlib figure or pyplot, rendered to PNG.
    matplotlib is never imported here: a figure brings its own savefig."""
    if (path is None) == (plot is None):
        raise InvalidArgumentError("log_image needs exactly one of path and plot", field="path")
    if plot is not None:
        savefig = getattr(plot, "savefig", None)
        if not callable(savefig):
            raise InvalidArgumentError(
                f"plot must be a matplotlib figure (or pyplot), not {type(plot).__name__}",
                field="plot",
            )
        buf = io.BytesIO()
        savefig(buf, format="png")
        return buf.getvalue()
    if isinstance(path, (bytes, bytearray, memoryview)):
        return bytes(path)
    if isinstance(path, (str, os.PathLike)):
        return Path(path).read_bytes()
    read = getattr(path, "read", None)
    if callable(read):
        data = read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidArgumentError(
                "the image stream must be opened in binary mode", field="path"
            )
        return bytes(data)
    raise InvalidArgumentError(
        f"path must be a file path, bytes or a binary stream, not {type(path).__name__}",
        field="path",
    )


# -- progress -----------------------------------------------------------------------------


class Progress:
    """Bytes done of a group of files: a tqdm bar on a terminal, else nothing."""

    def __init__(self, total: int, files: int, desc: str, show: bool | None) -> None:
        if show is None:
            show = _stderr_is_tty() and (files > 1 or total >= PROGRESS_BYTES)
        self._bar: Any = None
        self._lock = threading.Lock()
        if show:
            try:  # untyped; a nicety that may be missing
                tqdm: Any = importlib.import_module("tqdm").tqdm
            except ImportError:
                return
            self._bar = tqdm(
                total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False
            )

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.close()


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


# -- uploads --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    run_id: str
    name: str
    source: Source
    overwrite: bool
    content_type: str
    deadline: float | None
    progress: Progress
    future: Future[FileInfo] = field(default_factory=Future)
    cancelled: bool = False
    call: Any = None


class Upload:
    """One file's upload: finished when a waiting call returns it, running in
    the background when it comes from wait=False."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    @property
    def name(self) -> str:
        return self._job.name

    def done(self) -> bool:
        return self._job.future.done()

    def result(self, timeout: float | None = None) -> FileInfo:
        """Wait for the file to be stored; raises what made the upload fail."""
        return self._job.future.result(timeout)

    def cancel(self) -> None:
        """Stop the upload; the service keeps nothing of it."""
        _cancel(self._job)


def _cancel(job: _Job) -> None:
    job.cancelled = True
    call = job.call
    if call is not None:
        call.cancel()


class Uploader:
    """A few daemon threads that upload files to one service; started lazily.

    `close(timeout)` (also at interpreter exit) waits for the queued uploads,
    then cancels what is left and warns which files were not stored."""

    def __init__(self, client: Client, workers: int = WORKERS) -> None:
        self._client = client
        self._workers = workers
        self._reset()
        _lifecycle.register(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._active: set[_Job] = set()
        self._stop = threading.Event()
        self._closed = False

    def submit(
        self,
        run_id: str,
        name: str,
        source: Source,
        *,
        overwrite: bool = False,
        content_type: str = "",
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> Upload:
        if progress is None:
            progress = Progress(0, 0, "", False)
        job = _Job(
            run_id,
            check_name(name),
            source,
            overwrite,
            content_type,
            None if timeout is None else monotonic() + timeout,
            progress,
        )
        with self._lock:
            if self._closed:
                raise UploadError("the uploader is closed")
            self._active.add(job)
            if len(self._threads) < self._workers:
                t = threading.Thread(target=self._work, name="steplog-uploader", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put(job)
        return Upload(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.cancelled or self._stop.is_set():
                    raise UploadError(f"upload of {job.name!r} was cancelled")
                result = self._upload(job)
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                job.source.discard()
                with self._lock:
                    self._active.discard(job)

    def _upload(self, job: _Job) -> FileInfo:
        backoff = Backoff(0.2, 10.0)
        sha, size = job.source.digest()
        rehashed = False
        while True:
            try:
                return self._attempt(job, sha, size)
            except grpc.RpcError as err:
                code = err.code() if callable(getattr(err, "code", None)) else None
                if job.cancelled or self._stop.is_set():
                    raise UploadError(f"upload of {job.name!r} was cancelled") from None
                if code == grpc.StatusCode.DATA_LOSS and not rehashed:
                    rehashed = True  # the file changed while it was read: once more
                    sha, size = job.source.digest()
                    continue
                failure = TransportError.from_rpc_error(err)
                if not failure.retry_again(backoff.attempts + 1):  # the one retry table
                    raise from_rpc_error(err) from None
                delay = backoff.next_delay(failure.retry_after)
                if job.deadline is not None and monotonic() + delay > job.deadline:
                    raise from_rpc_error(err) from None
                if self._stop.wait(delay):
                    raise UploadError(f"upload of {job.name!r} was cancelled") from None

    def _attempt(self, job: _Job, sha: str, size: int) -> FileInfo:
        sent = 0
        read_error: list[BaseException] = []
        header = ap.UploadArtifactHeader(
            workspace=self._client.workspace,
            run_id=job.run_id,
            path=job.name,
            size=size,
            sha256=sha,
            content_type=job.content_type,
            overwrite=job.overwrite,
        )

        def requests() -> Iterator[ap.UploadArtifactRequest]:
            nonlocal sent
            yield ap.UploadArtifactRequest(header=header)
            try:
                with job.source.open() as f:
                    while chunk := f.read(CHUNK_BYTES):
                        sent += len(chunk)
                        job.progress.update(len(chunk))
                        yield ap.UploadArtifactRequest(chunk=chunk)
            except Exception as exc:  # a read error: reported as itself, not as CANCELLED
                read_error.append(exc)
                raise

        self._client._check_fork()  # a forked child talks over its own channel
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(self._client.channel)
        job.call = stub.UploadArtifact.future(requests(), wait_for_ready=False)
        try:
            reply = job.call.result()
        except grpc.RpcError:
            job.progress.update(-sent)  # a retry starts over
            if read_error:
                raise read_error[0] from None
            raise
        finally:
            job.call = None
        job.progress.update(size - sent)  # the service may answer before the last byte
        a = reply.artifact
        return FileInfo(a.path, a.size, a.sha256, a.content_type, reply.unchanged)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (up to timeout) until the uploads submitted so far have
        finished, stored or failed; True when they all have."""
        deadline = None if timeout is None else monotonic() + timeout
        with self._lock:
            jobs = list(self._active)
        for job in jobs:
            remaining = None if deadline is None else max(0.0, deadline - monotonic())
            with contextlib.suppress(BaseException):
                job.future.exception(remaining)
        return all(job.future.done() for job in jobs)

    def close(self, timeout: float | None = None) -> bool:
        """Wait for queued uploads (up to timeout), then cancel the rest.
        True when every upload finished. Safe to call twice."""
        deadline = None if timeout is None else monotonic() + timeout
        with self._lock:
            self._closed = True
            jobs = list(self._active)
        for job in jobs:
            remaining = None if deadline is None else max(0.0, deadline - monotonic())
            with contextlib.suppress(BaseException):
                job.future.exception(remaining)
        with self._lock:
            left = [j for j in self._active if not j.future.done()]
        if left:
            self._stop.set()
            for job in left:
                _cancel(job)
            names = ", ".join(repr(j.name) for j in left[:5])
            warnings.warn(
                f"steplog: {len(left)} file upload(s) did not finish before close and were "
                f"cancelled: {names}",
                stacklevel=2,
            )
        for _ in self._threads:
            self._queue.put(None)
        _lifecycle.unregister(self)
        return not left

    def close_at_exit(self, timeout: float) -> None:
        """steplog._lifecycle: what is left of the one exit deadline."""
        self.close(timeout)

    def after_fork_in_child(self) -> None:
        """The parent's uploads stay the parent's; the child starts empty."""
        self._reset()


# One uploader per client; clients live as long as the process (steplog.client).
_uploaders: dict[int, Uploader] = {}
_uploaders_lock = threading.Lock()


def current_uploader(client: Client) -> Uploader | None:
    """The client's uploader if it has one (without starting one)."""
    with _uploaders_lock:
        u = _uploaders.get(id(client))
        return u if u is not None and u._client is client else None


def uploader(client: Client) -> Uploader:
    with _uploaders_lock:
        u = _uploaders.get(id(client))
        if u is None or u._closed or u._client is not client:
            u = _uploaders[id(client)] = Uploader(client)
        return u


def upload_many(
    client: Client,
    run_id: str,
    names: Sequence[str],
    sources: Sequence[BinarySource],
    *,
    overwrite: bool,
    wait: bool,
    timeout: float | None,
    show_progress: bool | None,
    desc: str,
) -> list[Upload]:
    """Queue files; with wait, wait for all of them and raise the first
    failure (after every upload has ended)."""
    if len(names) != len(sources):
        raise InvalidArgumentError(f"{len(names)} names for {len(sources)} paths", field="names")
    for n in names:
        check_name(n)
    prepared = [source_of(s, snapshot=not wait) for s in sources]
    sizes = [s.size() or 0 for s in prepared]
    progress = Progress(sum(sizes), len(prepared), desc, show_progress if wait else False)
    up = uploader(client)
    uploads = [
        up.submit(run_id, n, s, overwrite=overwrite, timeout=timeout, progress=progress)
        for n, s in zip(names, prepared, strict=True)
    ]
    if not wait:
        return uploads
    try:
        errors = []
        for u in uploads:
            try:
                u.result()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
    except KeyboardInterrupt:
        for u in uploads:
            u.cancel()
        raise
    finally:
        progress.close()
    return uploads


# -- downloads ------------------------------------------------------------------------------


def list_files(client: Client, run_id: str, prefix: str = "") -> list[ap.Artifact]:
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(client.channel)
    reply = client.call(
        stub.ListArtifacts,
        ap.ListArtifactsRequest(workspace=client.workspace, run_id=run_id, prefix=prefix),
    )
    return list(reply.artifacts)


def download(
    client: Client,
    run_id: str,
    name: str,
    target: Path,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> FileInfo:
    """Download one file to `target` (replaced only once complete and verified)."""
    check_name(name)
    deadline = None if timeout is None else monotonic() + timeout
    backoff = Backoff(0.2, 10.0)
    mismatches = 0
    while True:
        try:
            return _download_once(client, run_id, name, target, progress)
        except grpc.RpcError as err:
            failure = TransportError.from_rpc_error(err)
            if not failure.retry_again(backoff.attempts + 1):  # the one retry table
                raise from_rpc_error(err) from None
            delay = backoff.next_delay(failure.retry_after)
            if deadline is not None and monotonic() + delay > deadline:
                raise from_rpc_error(err) from None
        except _Mismatch as exc:
            mismatches += 1
            if mismatches >= _DOWNLOAD_ATTEMPTS_ON_MISMATCH:
                raise ServiceError(str(exc), code=grpc.StatusCode.DATA_LOSS, field="name") from None
            delay = backoff.next_delay()
        time.sleep(delay)


class _Mismatch(Exception):
    pass


def _download_once(
    client: Client, run_id: str, name: str, target: Path, progress: Progress | None
) -> FileInfo:
    client._check_fork()
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(client.channel)
    responses = stub.DownloadArtifact(
        ap.DownloadArtifactRequest(workspace=client.workspace, run_id=run_id, path=name),
        wait_for_ready=False,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{secrets.token_hex(4)}.steplog-part")
    got = 0
    try:
        header = next(responses).artifact
        h = hashlib.sha256()
        with open(part, "wb") as out:
            for message in responses:
                chunk = message.chunk
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        if got != header.size or h.hexdigest() != header.sha256:
            raise _Mismatch(
                f"{name!r}: got {got} bytes hashing to {h.hexdigest()}; the service said "
                f"{header.size} bytes, {header.sha256}"
            )
        os.replace(part, target)
        got = 0
        return FileInfo(header.path, header.size, header.sha256, header.content_type)
    finally:
        part.unlink(missing_ok=True)
        if progress is not None and got:
            progress.update(-got)  # a retry starts over
        responses.cancel()


def inside(base: Path, relative: str) -> Path:
    """base/relative, refusing anything that would land outside base."""
    check_name(relative)
    root = base.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise InvalidArgumentError(f"file name {relative!r} leads outside {base}", field="name")
    return target
