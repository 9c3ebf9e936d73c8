"""The RPC metrics interceptor, driven the way grpc.aio drives handlers, with
a stand-in servicer context (the real server is covered in
tests/integration/test_prometheus.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from ingest.api.interceptors import MetricsInterceptor, split_method
from ingest.observe.metrics import Metrics

SERVICE = "steplog.v1.TestService"


@dataclass
class Details:
    method: str
    invocation_metadata: tuple[Any, ...] = ()


class Context:
    """What the interceptor reads from a grpc.aio servicer context."""

    def __init__(self, remaining: float | None = 30.0) -> None:
        self._code: grpc.StatusCode | None = None
        self.remaining = remaining

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise grpc.aio.AbortError()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process=False)


async def intercepted(metrics: Metrics, method: str, handler: Any) -> Any:
    async def continuation(details: Any) -> Any:
        return handler

    return await MetricsInterceptor(metrics).intercept_service(
        continuation, Details(f"/{SERVICE}/{method}")
    )


def handled(metrics: Metrics, method: str, code: str, kind: str = "unary") -> float | None:
    return metrics.registry.get_sample_value(
        "steplog_grpc_server_handled_total",
        {"grpc_type": kind, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
    )


def observed(metrics: Metrics, method: str, kind: str = "unary") -> float | None:
    return metrics.registry.get_sample_value(
        "steplog_grpc_server_handling_seconds_count",
        {"grpc_type": kind, "grpc_service": SERVICE, "grpc_method": method},
    )


def test_split_method() -> None:
    assert split_method("/steplog.v1.IngestService/Write") == ("steplog.v1.IngestService", "Write")


async def test_unary_ok_abort_and_crash(metrics: Metrics) -> None:
    async def behavior(request: str, context: Context) -> str:
        if request == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        if request == "bug":
            raise ValueError("a bug")
        if request == "invalid":
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        return request.upper()

    handler = await intercepted(metrics, "Get", grpc.unary_unary_rpc_method_handler(behavior))
    assert await handler.unary_unary("ok", Context()) == "OK"
    with pytest.raises(grpc.aio.AbortError):
        await handler.unary_unary("missing", Context())
    with pytest.raises(ValueError):
        await handler.unary_unary("bug", Context())
    await handler.unary_unary("invalid", Context())
    assert handled(metrics, "Get", "OK") == 1
    assert handled(metrics, "Get", "NOT_FOUND") == 1
    assert handled(metrics, "Get", "UNKNOWN") == 1
    assert handled(metrics, "Get", "INVALID_ARGUMENT") == 1
    assert observed(metrics, "Get") == 4
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Get"}
    assert metrics.registry.get_sample_value("steplog_grpc_server_started_total", labels) == 4


async def test_cancellation_and_deadline(metrics: Metrics) -> None:
    async def behavior(request: str, context: Context) -> str:
        raise asyncio.CancelledError

    handler = await intercepted(metrics, "Slow", grpc.unary_unary_rpc_method_handler(behavior))
    with pytest.raises(asyncio.CancelledError):
        await handler.unary_unary("x", Context(remaining=5.0))
    with pytest.raises(asyncio.CancelledError):
        await handler.unary_unary("x", Context(remaining=0.0))
    assert handled(metrics, "Slow", "CANCELLED") == 1
    assert handled(metrics, "Slow", "DEADLINE_EXCEEDED") == 1


async def test_bidi_stream_as_async_generator(metrics: Metrics) -> None:
    async def behavior(requests: AsyncIterator[int], context: Context) -> AsyncIterator[int]:
        async for r in requests:
            if r < 0:
                await context.abort(grpc.StatusCode.ABORTED, "sequence gap")
            yield r * 10

    async def requests(*values: int) -> AsyncIterator[int]:
        for v in values:
            yield v

    handler = await intercepted(metrics, "Ingest", grpc.stream_stream_rpc_method_handler(behavior))
    got = [r async for r in handler.stream_stream(requests(1, 2, 3), Context())]
    assert got == [10, 20, 30]
    stream = handler.stream_stream(requests(1, -1), Context())
    assert await stream.__anext__() == 10
    with pytest.raises(grpc.aio.AbortError):
        await stream.__anext__()
    # The client goes away mid-stream: grpc closes the generator.
    stream = handler.stream_stream(requests(1, 2), Context())
    assert await stream.__anext__() == 10
    await stream.aclose()
    assert handled(metrics, "Ingest", "OK", "bidi_stream") == 1
    assert handled(metrics, "Ingest", "ABORTED", "bidi_stream") == 1
    assert handled(metrics, "Ingest", "CANCELLED", "bidi_stream") == 1
    assert observed(metrics, "Ingest", "bidi_stream") == 3


async def test_server_stream_written_by_a_coroutine(metrics: Metrics) -> None:
    written: list[str] = []

    async def behavior(request: str, context: Context) -> None:
        written.append(request)  # stands in for `await context.write(...)`

    handler = await intercepted(metrics, "Watch", grpc.unary_stream_rpc_method_handler(behavior))
    assert asyncio.iscoroutinefunction(handler.unary_stream)
    await handler.unary_stream("a", Context())
    assert written == ["a"]
    assert handled(metrics, "Watch", "OK", "server_stream") == 1


async def test_client_stream(metrics: Metrics) -> None:
    async def behavior(requests: AsyncIterator[int], context: Context) -> int:
        return sum([r async for r in requests])

    async def requests() -> AsyncIterator[int]:
        for v in (1, 2, 3):
            yield v

    handler = await intercepted(metrics, "Upload", grpc.stream_unary_rpc_method_handler(behavior))
    assert await handler.stream_unary(requests(), Context()) == 6
    assert handled(metrics, "Upload", "OK", "client_stream") == 1


async def test_sync_handlers_stay_sync(metrics: Metrics) -> None:
    def unary(request: str, context: Context) -> str:
        return request

    def stream(request: str, context: Context) -> Iterator[str]:
        yield from request

    h1 = await intercepted(metrics, "SyncGet", grpc.unary_unary_rpc_method_handler(unary))
    h2 = await intercepted(metrics, "SyncList", grpc.unary_stream_rpc_method_handler(stream))
    assert not asyncio.iscoroutinefunction(h1.unary_unary)
    assert h1.unary_unary("x", Context()) == "x"
    assert list(h2.unary_stream("ab", Context())) == ["a", "b"]
    assert handled(metrics, "SyncGet", "OK") == 1
    assert handled(metrics, "SyncList", "OK", "server_stream") == 1


async def test_unknown_methods_do_not_mint_label_values(metrics: Metrics) -> None:
    async def continuation(details: Any) -> Any:
        return None

    interceptor = MetricsInterceptor(metrics)
    for i in range(3):
        assert await interceptor.intercept_service(continuation, Details(f"/evil.S/M{i}")) is None
    labels = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_code": "UNIMPLEMENTED"}
    labels["grpc_type"] = "unary"
    assert metrics.registry.get_sample_value("steplog_grpc_server_handled_total", labels) == 3
    names = {
        s.labels.get("grpc_method")
        for family in metrics.registry.collect()
        for s in family.samples
        if family.name.startswith("steplog_grpc")
    }
    assert names <= {"unknown", None}
