"""gRPC server interceptors. MetricsInterceptor counts and times every RPC
(unary and streaming) by service, method and status code.

grpc.aio picks how it drives a handler from the handler's own type (coroutine,
async generator, or plain function), so each wrapper keeps the type of the
behaviour it wraps. Only methods the server implements get their own labels:
clients choose method names, and an unknown one must not mint a new series.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
from prometheus_client.metrics import Counter, Histogram

from ingest.observe.metrics import Metrics

if TYPE_CHECKING:  # the stubs make it generic; the runtime class is not subscriptable
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

UNARY = "unary"
CLIENT_STREAM = "client_stream"
SERVER_STREAM = "server_stream"
BIDI_STREAM = "bidi_stream"

_CODES_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class _Labelled:
    """Metric children for one method, looked up once instead of per call."""

    started: Counter
    seconds: Histogram
    handled: Counter
    labels: tuple[str, str, str]
    by_code: dict[grpc.StatusCode, Counter] = field(default_factory=dict)

    def done(self, code: grpc.StatusCode, started_at: float) -> None:
        self.seconds.observe(perf_counter() - started_at)
        child = self.by_code.get(code)
        if child is None:
            child = self.by_code[code] = self.handled.labels(*self.labels, code.name)
        child.inc()


def split_method(full: str) -> tuple[str, str]:
    """'/steplog.v1.IngestService/Write' -> ('steplog.v1.IngestService', 'Write')."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def rpc_type(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return BIDI_STREAM
    if handler.request_streaming:
        return CLIENT_STREAM
    if handler.response_streaming:
        return SERVER_STREAM
    return UNARY


def status_code(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    """The code the client will see: what the handler set or aborted with;
    else OK, or for an exception the code grpc turns it into."""
    try:
        code = context.code()
    except Exception:  # a context in an odd state still gets counted
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int) and code in _CODES_BY_VALUE:
        return _CODES_BY_VALUE[code]
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # grpc cancels the handler when the client cancels or its deadline passes.
        try:
            remaining = context.time_remaining()
        except Exception:
            remaining = None
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """steplog_grpc_server_{started,handled}_total and _handling_seconds."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._methods: dict[str, _Labelled] = {}

    def _labelled(self, method: str, kind: str) -> _Labelled:
        found = self._methods.get(method)
        if found is None:
            service, name = split_method(method)
            labels = (kind, service, name)
            m = self.metrics
            found = _Labelled(
                m.rpc_started.labels(*labels), m.rpc_seconds.labels(*labels), m.rpc_handled, labels
            )
            self._methods[method] = found
        return found

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED; count it without the client's method name.
            self.metrics.rpc_handled.labels(UNARY, "unknown", "unknown", "UNIMPLEMENTED").inc()
            return None
        return instrument(handler, self._labelled(handler_call_details.method, rpc_type(handler)))


def instrument(handler: Handler, lab: _Labelled) -> Handler:
    """The same handler with each behaviour timed and its status counted."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, lab),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, lab),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, lab),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is None:
        return handler
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(handler.stream_stream, lab),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _wrap_unary(behavior: Callable[..., Any], lab: _Labelled) -> Callable[..., Any]:
    """A behaviour with one response: a coroutine function, or a plain
    function that grpc runs in its thread pool."""
    if inspect.iscoroutinefunction(behavior):

        async def unary(request: Any, context: Any) -> Any:
            lab.started.inc()
            started = perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                lab.done(status_code(context, exc), started)
                raise
            lab.done(status_code(context, None), started)
            return response

        return unary

    def sync_unary(request: Any, context: Any) -> Any:
        lab.started.inc()
        started = perf_counter()
        try:
            response = behavior(request, context)
        except BaseException as exc:
            lab.done(status_code(context, exc), started)
            raise
        lab.done(status_code(context, None), started)
        return response

    return sync_unary


def _wrap_stream(behavior: Callable[..., Any], lab: _Labelled) -> Callable[..., Any]:
    """A behaviour with streamed responses: an async generator, a coroutine
    that writes with context.write(), or a plain generator function."""
    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            lab.started.inc()
            started = perf_counter()
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                lab.done(status_code(context, exc), started)
                raise
            lab.done(status_code(context, None), started)

        return agen

    if inspect.iscoroutinefunction(behavior):
        return _wrap_unary(behavior, lab)

    def gen(request: Any, context: Any) -> Iterator[Any]:
        lab.started.inc()
        started = perf_counter()
        try:
            yield from behavior(request, context)
        except BaseException as exc:
            lab.done(status_code(context, exc), started)
            raise
        lab.done(status_code(context, None), started)

    return gen
