"""Every `Ingest` stream of a process on one asyncio loop (grpc.aio).

The sync gRPC API needs two threads per open stream: gRPC's own thread that
pulls the request iterator, and a reader thread blocked on the next
acknowledgement (gRPC's blocking wait wakes it every 100 ms even when nothing
arrives). A process with 50 `Run.new_stream` writers had 100 such threads
competing for the GIL with the training loop. Here one daemon thread,
`steplog-io`, runs one event loop that carries every stream of the process:
sending is a deque append plus (at most once per wake-up) a
`call_soon_threadsafe`; acknowledgements are read by one coroutine per stream
and handed to the same callbacks the sync streams call.

Channels: one grpc.aio channel per `key` the transport gives (the client's
connection settings and which sync channel it shares), made on the loop's
thread, so writers that share a connection today share it here too.

Fork: grpc.aio does not survive fork() (its poller and the loop's thread stay
in the parent). A forked child's streams use the sync API instead
(`IoLoop.usable` is False there); the parent keeps its loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import grpc
import grpc.aio

from steplog import _lifecycle
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import ingest_service_pb2_grpc

# How long `IoLoop.loop` waits for the loop's thread to run (seconds).
START_TIMEOUT_S = 10.0

AioChannelFactory = Callable[[], grpc.aio.Channel]


class IoLoop:
    """The process's one event loop for streams, on its own daemon thread,
    started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[Hashable, grpc.aio.Channel] = {}
        self._pid = os.getpid()

    @property
    def usable(self) -> bool:
        """False in a forked child of a process that used grpc.aio."""
        return os.getpid() == self._pid

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="steplog-io", daemon=True)
                thread.start()
                if not ready.wait(START_TIMEOUT_S):
                    raise RuntimeError("steplog: the stream I/O thread did not start")
                self._loop = loop
            return self._loop

    def channel(self, key: Hashable, factory: AioChannelFactory) -> grpc.aio.Channel:
        """The channel for `key` (made by `factory` the first time); only on
        the loop's thread."""
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = factory()
        return channel

    def connect(self, key: Hashable, factory: AioChannelFactory, timeout: float) -> bool:
        """Open the channel for `key` now and wait, at most `timeout` seconds,
        until it is connected (any thread but the loop's). True when it is;
        on False the channel goes on connecting in the background and the
        first stream waits for it as usual."""
        loop = self.loop()

        async def ready() -> bool:
            try:
                await self.channel(key, factory).channel_ready()
            except Exception:  # a channel that cannot be made: the first stream reports it
                self.forget(key)
                return False
            return True

        future = asyncio.run_coroutine_threadsafe(ready(), loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            return False

    def forget(self, key: Hashable) -> None:
        """Drop the channel for `key` (a failed one is made again next time);
        only on the loop's thread."""
        self._channels.pop(key, None)

    def after_fork_in_child(self) -> None:
        # The loop's thread does not exist here and grpc.aio's state belongs
        # to the parent: `usable` is now False; never touch the old loop.
        self._lock = threading.Lock()


_io_loop = IoLoop()
_lifecycle.on_fork(_io_loop.after_fork_in_child)


def io_loop() -> IoLoop:
    return _io_loop


ResponseCallback = Callable[[pb.IngestResponse], None]
# The transport's TransportError, given without importing transport (a cycle).
DoneCallback = Callable[[Any], None]
ErrorFactory = Callable[[grpc.StatusCode, str, "Sequence[tuple[str, Any]] | None"], Any]


class AioStream:
    """One `Ingest` call on the process's loop. `send` and `close` are called
    from the writer's thread; everything else runs on the loop's."""

    def __init__(
        self,
        io: IoLoop,
        key: Hashable,
        factory: AioChannelFactory,
        metadata: Sequence[tuple[str, str]],
        on_response: ResponseCallback,
        on_done: DoneCallback,
        error: ErrorFactory,
    ) -> None:
        self._io = io
        self._key = key
        self._factory = factory
        self._metadata = tuple(metadata)
        self._on_response = on_response
        self._on_done = on_done
        self._error = error
        self._pending: deque[pb.IngestRequest] = deque()
        self._closed = False  # close() was called
        self._ended = False  # the call is over (closed, failed or ended by the service)
        self._kick_scheduled = False
        self._call: Any = None
        self._wake: asyncio.Event | None = None
        self._done = False
        self._loop = io.loop()
        self._loop.call_soon_threadsafe(self._start)

    # -- the writer's thread ------------------------------------------------

    def send(self, request: pb.IngestRequest) -> None:
        if self._closed:
            raise self._error(grpc.StatusCode.CANCELLED, "stream closed", None)
        self._pending.append(request)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon_threadsafe(self._kick)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._cancel)

    # -- the loop's thread --------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            self._finish(self._error(grpc.StatusCode.CANCELLED, "stream closed", None))
            return
        try:
            channel = self._io.channel(self._key, self._factory)
            stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
            self._call = stub.Ingest(metadata=self._metadata)
        except Exception as exc:  # a closed channel, bad options: report, do not hang
            self._io.forget(self._key)
            code = grpc.StatusCode.UNAVAILABLE
            self._finish(self._error(code, f"cannot open a stream: {exc!r}", None))
            return
        self._wake = asyncio.Event()
        self._loop.create_task(self._write_loop(self._call, self._wake))
        self._loop.create_task(self._read_loop(self._call))

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._wake is not None:
            self._wake.set()

    def _cancel(self) -> None:
        self._ended = True
        if self._call is not None:
            self._call.cancel()
        if self._wake is not None:
            self._wake.set()

    async def _write_loop(self, call: Any, wake: asyncio.Event) -> None:
        pending = self._pending
        try:
            while not self._ended:
                while pending:
                    await call.write(pending.popleft())
                wake.clear()
                if not pending and not self._ended:
                    await wake.wait()
        except (asyncio.CancelledError, asyncio.InvalidStateError, grpc.RpcError):
            return  # the stream ended: its reader reports how
        except Exception as exc:  # a request that does not serialize, a bug
            error = self._error(grpc.StatusCode.UNKNOWN, f"stream writer failed: {exc!r}", None)
            self._finish(error)
            call.cancel()

    async def _read_loop(self, call: Any) -> None:
        error: Any = None
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                self._on_response(response)
            code = await call.code()
            if code != grpc.StatusCode.OK:
                trailers = tuple(await call.trailing_metadata() or ())
                error = self._error(code, await call.details(), trailers)
        except asyncio.CancelledError:
            error = self._error(grpc.StatusCode.CANCELLED, "stream closed", None)
        except grpc.aio.AioRpcError as err:
            trailers = tuple(err.trailing_metadata() or ())
            error = self._error(err.code(), err.details() or "", trailers)
        except Exception as exc:  # a bug in a callback or in grpc: report, do not hang
            error = self._error(grpc.StatusCode.UNKNOWN, f"stream reader failed: {exc!r}", None)
        self._ended = True
        self._pending.clear()
        if self._wake is not None:
            self._wake.set()
        self._finish(error)

    def _finish(self, error: Any) -> None:
        if self._done:
            return
        self._done = True
        self._on_done(error)
