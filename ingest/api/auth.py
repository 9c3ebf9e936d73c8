"""Authentication and authorization: bearer tokens checked before any handler.

With `--auth token` every RPC carries `authorization: Bearer stl_<id>_<secret>`
in its metadata. `AuthInterceptor` runs before the request guard and every
servicer:

1. Health checking (grpc.health.v1) is open: probes carry no token.
2. Every other method needs a valid token: missing, malformed, unknown,
   wrong, expired or revoked is UNAUTHENTICATED. Server reflection needs a
   token of any role (it only describes the public API, but an
   unauthenticated scanner learns nothing).
3. The method needs a role (`METHOD_ROLES`): a token with a lesser role is
   PERMISSION_DENIED. A steplog method missing from the table is refused,
   so a new RPC cannot be open by accident (tests/unit/test_auth.py checks
   the table covers every RPC).
4. The workspace comes from the token: every request message (each message of
   a stream too) whose `workspace` field is empty is given the token's, and
   one naming another workspace is PERMISSION_DENIED before the servicer sees
   it, so nothing is written. The ingest service is registered raw (bytes):
   its top-level fields are scanned without parsing the batch, and an empty
   workspace is filled by appending the field (protobuf: the last one wins).
   A stream re-checks the token (from the cache) with every message, so a
   revoke or an expiry ends open streams too.

Verified tokens are cached in memory (bounded, `auth_cache_ttl_s`, 15 s by
default): a revoke takes effect within that time on every replica (an entry's
age counts from the start of the lookup that read it). The
last-used time is written at most once a minute per token, off the request's
path.

Denied requests are logged (method, peer, reason, the token id and name at
most, never the token) at a bounded rate, and counted in
steplog_auth_denied_total{reason,method}. Handlers read the caller with
`current_principal()` (None when auth is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ingest.api.common import abort_with, rewrap_handler
from ingest.core.errors import ApiError, StoreUnavailable
from ingest.observe.metrics import Metrics
from ingest.store import tokens
from ingest.store.tokens import Role, TokenStore

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

log = logging.getLogger("steplog.audit")

__all__ = ["METHOD_ROLES", "AuthInterceptor", "Principal", "Role", "current_principal"]

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Any valid token (any role, any workspace) may call these.
TOKEN_ONLY_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
STEPLOG_PREFIX = "/steplog.v1."

_R, _W, _A = Role.READER, Role.WRITER, Role.ADMIN
# The role each steplog RPC needs (readers read; writers also create and write;
# admins also manage tokens). A method missing here is refused to everyone.
METHOD_ROLES: dict[str, Role] = {
    f"/steplog.v1.{service}/{method}": needed
    for service, methods in {
        "ExperimentService": {
            "GetOrCreateExperiment": _W,
            "GetExperiment": _R,
            "ListExperiments": _R,
            "UpdateExperimentTags": _W,
            "ArchiveExperiment": _W,
            "ReactivateExperiment": _W,
            "DeleteExperiment": _A,  # irreversible: not for a training job's token
        },
        "RunService": {
            "CreateRun": _W,
            "GetRun": _R,
            "ListRuns": _R,
            "UpdateRunTags": _W,
            "AddRunProperties": _W,
            "UpdateRunStatus": _W,
            "Heartbeat": _W,
            "RewindRun": _W,
            "SetEarlyTerminationPolicy": _W,
            "GetEarlyTerminationPolicy": _R,
        },
        "IngestService": {"Ingest": _W, "Write": _W},
        "QueryService": {"GetMetrics": _R, "ReadSeries": _R, "ListSeries": _R},
        "ArtifactService": {"UploadArtifact": _W, "DownloadArtifact": _R, "ListArtifacts": _R},
        "TokenService": {"CreateToken": _A, "ListTokens": _A, "RevokeToken": _A},
    }.items()
    for method, needed in methods.items()
}

# Reasons a request is denied: the `reason` label of steplog_auth_denied_total.
MISSING = "missing"  # no authorization metadata
MALFORMED = "malformed"  # not "Bearer stl_<id>_<secret>"
UNKNOWN = "unknown_token"  # no such token id
WRONG = "wrong_secret"  # the id exists, the secret does not match
EXPIRED = "expired"
REVOKED = "revoked"
ROLE = "role"  # the token's role may not call the method
WORKSPACE = "workspace"  # the request names another workspace
NO_ROLE = "unlisted_method"  # a method with no entry in METHOD_ROLES
REASONS = (MISSING, MALFORMED, UNKNOWN, WRONG, EXPIRED, REVOKED, ROLE, WORKSPACE, NO_ROLE)

_INVALID = "invalid token (unknown, or not the one issued)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a verified token's id, workspace and role."""

    token_id: str
    workspace: str
    role: Role
    name: str = ""


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "steplog_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being handled; None when auth is off."""
    return _current.get()


class Denied(Exception):
    """A request refused by policy: the status, the reason label, a message
    for the client (never the token), and the token id when one was found."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        token_id: str = "",
        name: str = "",
        field: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.token_id = token_id
        self.name = name
        self.field = field

    def api_error(self) -> ApiError:
        return ApiError(self.code.name, self.message, self.field)


def _unauthenticated(reason: str, message: str, token_id: str = "", name: str = "") -> Denied:
    return Denied(grpc.StatusCode.UNAUTHENTICATED, reason, message, token_id, name)


def bearer(metadata: Iterable[Any] | None) -> str:
    """The token text of `authorization: Bearer <token>`; Denied when absent or odd."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise _unauthenticated(
            MISSING, "missing token: send the metadata 'authorization: Bearer <token>'"
        )
    if len(values) > 1 or not isinstance(values[0], str):
        raise _unauthenticated(MALFORMED, "malformed authorization: send exactly one value")
    scheme, _, text = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not text.strip():
        raise _unauthenticated(MALFORMED, "malformed authorization: expected 'Bearer <token>'")
    return text.strip()


@dataclass(slots=True)
class _Entry:
    """What the cache knows of a token id (row None: no such token)."""

    row: tokens.TokenRow | None
    secret_hash: bytes
    fetched: float  # monotonic: when the lookup that read it started
    touched: float  # wall time of the last recorded use (0: never)


class TokenVerifier:
    """Checks token texts against the store, through a small TTL cache.

    Concurrent first uses of one token share one lookup. Unknown ids are
    cached too (so a stream of one bad token is one query per TTL).
    """

    TOUCH_EVERY_S = 60.0

    def __init__(
        self,
        store: TokenStore,
        ttl_s: float = 15.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.wall = wall
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, asyncio.Future[_Entry]] = {}
        self._touches: set[asyncio.Task[None]] = set()

    async def _entry(self, token_id: str) -> _Entry:
        now = self.clock()
        entry = self._cache.get(token_id)
        if entry is not None and now - entry.fetched < self.ttl_s:
            self._cache.move_to_end(token_id)
            return entry
        loading = self._loading.get(token_id)
        if loading is not None:
            return await asyncio.shield(loading)
        fut: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._loading[token_id] = fut
        # The entry is as old as the lookup's start, not its end: a revoke that
        # commits while a slow lookup is in flight still takes effect within
        # the TTL of its commit.
        started = self.clock()
        try:
            found = await self.store.lookup(token_id)
        except BaseException as exc:
            # The loading call was cancelled (its client left) or failed: the
            # calls waiting on it get a retryable error, not the cancellation.
            failure = exc if isinstance(exc, Exception) else StoreUnavailable("lookup interrupted")
            fut.set_exception(failure)
            fut.exception()  # retrieved: waiters re-raise it, nobody else
            raise
        finally:
            self._loading.pop(token_id, None)
        if found is None:
            fresh = _Entry(None, b"", started, 0.0)
        else:
            row, secret_hash = found
            touched = row.last_used_at.timestamp() if row.last_used_at else 0.0
            if entry is not None:
                touched = max(touched, entry.touched)
            fresh = _Entry(row, secret_hash, started, touched)
        self._cache[token_id] = fresh
        self._cache.move_to_end(token_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        fut.set_result(fresh)
        return fresh

    def forget(self, token_id: str) -> None:
        """Drop a token from this process's cache (after this process revoked it)."""
        self._cache.pop(token_id, None)

    async def verify(self, text: str) -> Principal:
        parsed = tokens.parse(text)
        if parsed is None:
            raise _unauthenticated(
                MALFORMED, "malformed token: expected stl_<token id>_<secret> as issued"
            )
        token_id, secret = parsed
        entry = await self._entry(token_id)
        row = entry.row
        if row is None:
            raise _unauthenticated(UNKNOWN, _INVALID, token_id)
        if not tokens.matches(secret, entry.secret_hash, self.store.pepper):
            raise _unauthenticated(WRONG, _INVALID, token_id)
        if row.revoked_at is not None:
            raise _unauthenticated(REVOKED, f"token {token_id} is revoked", token_id, row.name)
        now = self.wall()
        if row.expires_at is not None and row.expires_at.timestamp() <= now:
            raise _unauthenticated(
                EXPIRED,
                f"token {token_id} expired at {_iso(row.expires_at)}",
                token_id,
                row.name,
            )
        if now - entry.touched >= self.TOUCH_EVERY_S:
            entry.touched = now
            task = asyncio.get_running_loop().create_task(self._touch(token_id))
            self._touches.add(task)
            task.add_done_callback(self._touches.discard)
        return Principal(token_id, row.workspace, row.role, row.name)

    async def _touch(self, token_id: str) -> None:
        try:
            await self.store.touch(token_id, self.TOUCH_EVERY_S)
        except Exception as exc:  # a lost last-used time is not worth a failed request
            log.debug("could not record the use of token %s: %s", token_id, type(exc).__name__)

    async def close(self) -> None:
        for task in list(self._touches):
            task.cancel()
        for task in list(self._touches):
            with contextlib.suppress(BaseException):
                await task


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


class Audit:
    """Audit lines and counters. Denied-request lines are rate limited (a
    client hammering with a bad token must not flood the log); what is left
    out is counted and said in the next line."""

    def __init__(self, metrics: Metrics, burst: int = 50, per_s: float = 5.0) -> None:
        self.metrics = metrics
        self.burst = float(burst)
        self.per_s = per_s
        self._allowance = float(burst)
        self._last = time.monotonic()
        self._suppressed = 0

    def _may_log(self) -> bool:
        now = time.monotonic()
        self._allowance = min(self.burst, self._allowance + (now - self._last) * self.per_s)
        self._last = now
        if self._allowance >= 1:
            self._allowance -= 1
            return True
        self._suppressed += 1
        return False

    def denied(self, method: str, denied: Denied, peer: str) -> None:
        self.metrics.auth_denied.labels(denied.reason, method.lstrip("/")).inc()
        if not self._may_log():
            return
        skipped, self._suppressed = self._suppressed, 0
        log.warning(
            "auth denied: method=%s peer=%s code=%s reason=%s token_id=%s name=%r: %s%s",
            method,
            peer,
            denied.code.name,
            denied.reason,
            denied.token_id or "-",
            denied.name,
            denied.message,
            f" ({skipped} more denied requests not logged)" if skipped else "",
        )

    def created(self, row: tokens.TokenRow, by: str, peer: str = "") -> None:
        self.metrics.tokens_created.labels(row.role.value).inc()
        log.info(
            "token created: token_id=%s name=%r workspace=%s role=%s expires=%s by=%s peer=%s",
            row.token_id,
            row.name,
            row.workspace,
            row.role.value,
            _iso(row.expires_at) if row.expires_at else "never",
            by,
            peer or "-",
        )

    def revoked(self, row: tokens.TokenRow, by: str, peer: str = "") -> None:
        self.metrics.tokens_revoked.inc()
        log.info(
            "token revoked: token_id=%s name=%r workspace=%s by=%s peer=%s",
            row.token_id,
            row.name,
            row.workspace,
            by,
            peer or "-",
        )


# -- the workspace of a request -------------------------------------------------------


def _plan(descriptor: Any) -> tuple[str, ...] | None:
    """How to reach a request's workspace: () for a top-level `workspace`
    field, (name,) for one inside a singular message field (an upload's
    header), None when the message has none."""
    fields = descriptor.fields_by_name
    ws = fields.get("workspace")
    if ws is not None and ws.type == FieldDescriptor.TYPE_STRING:
        return ()
    for f in descriptor.fields:
        if f.type != FieldDescriptor.TYPE_MESSAGE or f.message_type is None or f.is_repeated:
            continue
        inner = f.message_type.fields_by_name.get("workspace")
        if inner is not None and inner.type == FieldDescriptor.TYPE_STRING:
            return (f.name,)
    return None


_PLANS: dict[str, tuple[str, ...] | None] = {}


def workspace_plan(descriptor: Any) -> tuple[str, ...] | None:
    try:
        return _PLANS[descriptor.full_name]
    except KeyError:
        plan = _PLANS[descriptor.full_name] = _plan(descriptor)
        return plan


def _other_workspace(named: str, principal: Principal) -> Denied:
    return Denied(
        grpc.StatusCode.PERMISSION_DENIED,
        WORKSPACE,
        f"workspace {named[:70]!r} is not this token's workspace ({principal.workspace!r});"
        " leave workspace empty or name the token's own",
        principal.token_id,
        principal.name,
        field="workspace",
    )


def scope_message(message: Message, principal: Principal) -> None:
    """Fill an empty workspace with the token's; Denied for another one."""
    plan = workspace_plan(message.DESCRIPTOR)
    if plan is None:
        return
    target = message
    for name in plan:
        if not target.HasField(name):
            return  # an upload's chunk: its header was checked
        target = getattr(target, name)
    named = target.workspace  # type: ignore[attr-defined]
    if not named:
        target.workspace = principal.workspace  # type: ignore[attr-defined]
    elif named != principal.workspace:
        raise _other_workspace(named, principal)


# Top-level fields of a raw request scanned at most (a real one has two).
MAX_RAW_FIELDS = 64


class MalformedRequest(ApiError):
    def __init__(self, what: str) -> None:
        super().__init__("INVALID_ARGUMENT", f"malformed request: {what}", "")


def _varint(data: bytes | memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise MalformedRequest("a truncated or overlong varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def raw_workspace(data: bytes) -> bytes | None:
    """The last value of field 1 (`workspace`, a string) among a serialized
    message's top-level fields, or None; the batch inside is skipped, not parsed."""
    view = memoryview(data)
    i, n, found, count = 0, len(data), None, 0
    while i < n:
        count += 1
        if count > MAX_RAW_FIELDS:
            raise MalformedRequest(f"more than {MAX_RAW_FIELDS} top-level fields")
        key, i = _varint(view, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedRequest("field number 0")
        if wire == 0:
            _, i = _varint(view, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(view, i)
            if number == 1:
                found = bytes(view[i : i + length])
            i += length
        else:
            raise MalformedRequest(f"wire type {wire} at the top level")
        if i > n:
            raise MalformedRequest("a field runs past the end of the message")
    return found


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def scope_raw(data: bytes, principal: Principal) -> bytes:
    """The raw-request form of scope_message: the same bytes when the
    workspace is the token's, the bytes plus a workspace field when it is empty."""
    found = raw_workspace(data)
    mine = principal.workspace.encode()
    if found == mine:
        return data
    if found:
        raise _other_workspace(found.decode(errors="replace"), principal)
    return data + b"\x0a" + _encode_varint(len(mine)) + mine


def scope(request: Any, principal: Principal) -> Any:
    if isinstance(request, bytes):
        return scope_raw(request, principal)
    if isinstance(request, Message):
        scope_message(request, principal)
    return request  # e.g. the request guard's Malformed: the guard answers it


# -- the interceptor ------------------------------------------------------------------


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Token, role and workspace checks before any handler runs (module docstring)."""

    def __init__(self, verifier: TokenVerifier, audit: Audit) -> None:
        self.verifier = verifier
        self.audit = audit

    @staticmethod
    def required_role(method: str) -> Role | None:
        if method.startswith(TOKEN_ONLY_PREFIXES):
            return Role.READER
        return METHOD_ROLES.get(method)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        try:
            text = bearer(handler_call_details.invocation_metadata)
            principal = await self.verifier.verify(text)
            needed = self.required_role(method)
            if needed is None:
                log.error("no role is defined for %s: refused (add it to METHOD_ROLES)", method)
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    NO_ROLE,
                    f"{method} is not open to any role",
                    principal.token_id,
                    principal.name,
                )
            if not principal.role.allows(needed):
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    ROLE,
                    f"{method.lstrip('/')} needs the {needed.value} role; token"
                    f" {principal.token_id} is a {principal.role.value}",
                    principal.token_id,
                    principal.name,
                )
        except Denied as denied:
            return _rewrap(handler, _refuse(self.audit, method, denied))
        except StoreUnavailable as exc:
            return _rewrap(handler, _unavailable(exc))
        except Exception as exc:  # a bug or an odd database state: refuse, say little
            log.error("token check failed for %s: %s", method, type(exc).__name__, exc_info=True)
            return _rewrap(handler, _unavailable(StoreUnavailable(type(exc).__name__)))
        recheck = text if method.startswith(STEPLOG_PREFIX) else None
        return _rewrap(handler, _Scoped(self, method, principal, recheck))


class _Scoped:
    """Behaviour wrappers for one allowed call: the principal in the context,
    every request message scoped to the token's workspace."""

    def __init__(
        self, auth: AuthInterceptor, method: str, principal: Principal, recheck: str | None
    ) -> None:
        self.auth = auth
        self.method = method
        self.principal = principal
        self.recheck = recheck
        self.scoped = method.startswith(STEPLOG_PREFIX)

    def _scope(self, request: Any, context: Any) -> Any:
        if not self.scoped:
            return request
        try:
            return scope(request, self.principal)
        except Denied as denied:
            self.auth.audit.denied(self.method, denied, _peer(context))
            raise denied.api_error() from None

    async def _messages(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if self.recheck is not None:
                try:
                    await self.auth.verifier.verify(self.recheck)
                except Denied as denied:
                    self.auth.audit.denied(self.method, denied, _peer(context))
                    raise denied.api_error() from None
            yield self._scope(request, context)

    def unary_request(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
                _current.set(self.principal)
                try:
                    request = self._scope(request, context)
                except ApiError as exc:
                    await abort_with(context, exc)
                async for response in behavior(request, context):
                    yield response

            return agen

        async def unary(request: Any, context: Any) -> Any:
            _current.set(self.principal)
            try:
                request = self._scope(request, context)
            except ApiError as exc:
                await abort_with(context, exc)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return unary

    def stream_request(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def agen(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                _current.set(self.principal)
                async for response in behavior(self._messages(requests, context), context):
                    yield response

            return agen

        async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
            _current.set(self.principal)
            result = behavior(self._messages(requests, context), context)
            return await result if inspect.isawaitable(result) else result

        return unary


class _Refusal:
    """Behaviours that answer a denied call without reading its requests."""

    def __init__(self, answer: Callable[[Any], Awaitable[None]]) -> None:
        self.answer = answer

    def unary_request(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
                await self.answer(context)
                if False:  # pragma: no cover - makes this an async generator
                    yield None

            return agen

        async def unary(request: Any, context: Any) -> Any:
            await self.answer(context)

        return unary

    stream_request = unary_request


def _refuse(audit: Audit, method: str, denied: Denied) -> _Refusal:
    async def answer(context: Any) -> None:
        audit.denied(method, denied, _peer(context))
        await abort_with(context, denied.api_error())

    return _Refusal(answer)


def _unavailable(exc: StoreUnavailable) -> _Refusal:
    async def answer(context: Any) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "cannot check the token now (database unavailable)"
        )

    return _Refusal(answer)


def _rewrap(handler: Handler, wrap: _Scoped | _Refusal) -> Handler:
    return rewrap_handler(handler, wrap.unary_request, wrap.stream_request)


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "unknown"
