"""The asyncio stream transport's pure parts: the RetryInfo hint from a
call's trailers, and the STEPLOG_STREAM_IO setting."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from steplog._settings import SettingError
from steplog._writer.settings import WriterSettings
from steplog._writer.transport import retry_after_trailers


def _trailers(delay: duration_pb2.Duration) -> tuple[tuple[str, object], ...]:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=8, message="busy", details=[detail])
    return (("other", "x"), ("grpc-status-details-bin", status.SerializeToString()))


def test_retry_after_from_trailers() -> None:
    assert (
        retry_after_trailers(_trailers(duration_pb2.Duration(seconds=2, nanos=500_000_000))) == 2.5
    )


def test_no_hint_without_retry_info() -> None:
    assert retry_after_trailers(None) is None
    assert retry_after_trailers((("grpc-status-details-bin", b"\xff\xff garbage"),)) is None
    plain = status_pb2.Status(code=14, message="down").SerializeToString()
    assert retry_after_trailers((("grpc-status-details-bin", plain),)) is None


def test_stream_io_setting() -> None:
    assert WriterSettings.from_env({}).stream_io == "loop"
    assert WriterSettings.from_env({"STEPLOG_STREAM_IO": "threads"}).stream_io == "threads"
    assert WriterSettings.from_env({"STEPLOG_STREAM_IO": " loop "}).stream_io == "loop"
    with pytest.raises(SettingError, match="STEPLOG_STREAM_IO"):
        WriterSettings.from_env({"STEPLOG_STREAM_IO": "fibers"})
    with pytest.raises(ValueError, match="stream_io"):
        WriterSettings(stream_io="fibers")  # type: ignore[arg-type]


def test_connect_opens_the_channel_and_is_bounded() -> None:
    """IoLoop.connect (a run's creation calls it through
    Client.connect_streams): True once a real server answers the handshake;
    against a port nobody listens on, False when the timeout is spent; False
    (not an exception) when the channel cannot be made."""
    import socket
    from concurrent import futures
    from time import monotonic

    import grpc
    import grpc.aio

    from steplog._writer.aio_streams import IoLoop

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    io = IoLoop()
    try:
        assert io.connect("up", lambda: grpc.aio.insecure_channel(f"127.0.0.1:{port}"), 10.0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]  # bound, not listening: connections are refused
            began = monotonic()
            target = f"127.0.0.1:{closed}"
            assert not io.connect("down", lambda: grpc.aio.insecure_channel(target), 0.3)
            assert monotonic() - began < 5.0

        def broken() -> grpc.aio.Channel:
            raise ValueError("bad channel options")

        # A channel that cannot be made is no error for the run being created.
        assert not io.connect("broken", broken, 5.0)
    finally:
        server.stop(None)
