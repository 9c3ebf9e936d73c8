"""RequestGuard: every steplog request is parsed and checked before a
servicer sees it.

grpc.aio parses a request with the handler's `request_deserializer` (the
generated `FromString`). When that raises, as protobuf does for a malformed
message or invalid UTF-8 in a string field, grpc answers UNKNOWN with the
Python exception's text. The guard wraps the deserializer so a parse failure
becomes a `Malformed` value instead, and wraps the behaviour so that value is
answered with INVALID_ARGUMENT and a clear message; in a request stream the
first malformed message ends the stream with INVALID_ARGUMENT.

It also checks the strings of every request outside the ingest service
(`ingest.core.checks.check_strings`: NUL, control characters in identifiers,
lengths, repeated-field sizes), once, before any servicer code runs; a bad
field is INVALID_ARGUMENT with a BadRequest detail naming it. Ingest batches
are large and hot: their strings are checked as they are decoded
(ingest.core.decode), not walked here.

Only steplog.v1 methods are guarded; health and reflection pass through.
Each method's wrapped handler is built once and reused.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from ingest.api.common import abort_with, rewrap_handler
from ingest.core.checks import check_strings
from ingest.core.errors import ApiError, invalid

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

GUARDED_PREFIX = "/steplog.v1."
# Requests whose strings are checked by decode, not walked.
UNWALKED_PREFIX = "/steplog.v1.IngestService/"


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the wrapped deserializer returns for bytes that do not parse."""

    error: ApiError


def _deserializer(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            detail = str(exc).rpartition(": ")[2] or "cannot be parsed"
            return Malformed(
                invalid("", f"malformed request: not a valid {type_name} message ({detail})")
            )

    return deserialize


def _check(request: Any, walk: bool) -> None:
    if isinstance(request, Malformed):
        raise request.error
    if walk:
        check_strings(request)


async def _checked_stream(requests: AsyncIterator[Any], walk: bool) -> AsyncIterator[Any]:
    async for request in requests:
        _check(request, walk)
        yield request


def _unary_request(behavior: Callable[..., Any], walk: bool) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                _check(request, walk)
            except ApiError as exc:
                await abort_with(context, exc)
            async for response in behavior(request, context):
                yield response

        return agen

    async def unary(request: Any, context: Any) -> Any:
        try:
            _check(request, walk)
        except ApiError as exc:
            await abort_with(context, exc)
        return await behavior(request, context)

    return unary


def _stream_request(behavior: Callable[..., Any], walk: bool) -> Callable[..., Any]:
    """A request stream: the servicer iterates checked messages; a bad one
    raises ApiError inside the servicer, which answers it like its own."""
    if inspect.isasyncgenfunction(behavior):

        async def agen(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in behavior(_checked_stream(requests, walk), context):
                yield response

        return agen

    async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
        return await behavior(_checked_stream(requests, walk), context)

    return unary


def guard(handler: Handler, type_name: str, walk: bool) -> Handler:
    """The same handler with a forgiving deserializer and a checking behaviour."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    return rewrap_handler(
        handler,
        lambda behavior: _unary_request(behavior, walk),
        lambda behavior: _stream_request(behavior, walk),
        request_deserializer=_deserializer(deserializer, type_name),
    )


def _type_name(deserializer: Any, method: str) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return str(name) if name else f"request of {method}"


class RequestGuard(grpc.aio.ServerInterceptor):
    """Malformed requests -> INVALID_ARGUMENT; strings checked before servicers."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(GUARDED_PREFIX):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = guard(
            handler,
            _type_name(handler.request_deserializer, method),
            walk=not method.startswith(UNWALKED_PREFIX),
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped
