"""Authentication and authorization: bearer tokens checked before any handler.

This module holds the rules, the roles, the audit and the interceptor; the
token check is ingest/api/principal.py, the workspace rule ingest/api/scope.py.

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

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from ingest.api.common import abort_with, rewrap_handler
from ingest.api.principal import (
    EXPIRED,
    MALFORMED,
    MISSING,
    NO_ROLE,
    REVOKED,
    ROLE,
    UNKNOWN,
    WORKSPACE,
    WRONG,
    Denied,
    Principal,
    TokenVerifier,
    bearer,
    current_principal,
    iso_time,
    principal_var,
)
from ingest.api.scope import (
    MAX_RAW_FIELDS,
    MalformedRequest,
    raw_workspace,
    scope,
    scope_message,
    scope_raw,
    workspace_plan,
)
from ingest.core.errors import ApiError, StoreUnavailable
from ingest.observe.metrics import Metrics
from ingest.store import tokens
from ingest.store.tokens import Role

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

log = logging.getLogger("steplog.audit")

# The names of this module and of principal.py / scope.py that others use.
__all__ = [
    "EXPIRED",
    "MALFORMED",
    "MAX_RAW_FIELDS",
    "METHOD_ROLES",
    "MISSING",
    "NO_ROLE",
    "REVOKED",
    "ROLE",
    "UNKNOWN",
    "WORKSPACE",
    "WRONG",
    "Audit",
    "AuthInterceptor",
    "Denied",
    "MalformedRequest",
    "Principal",
    "Role",
    "TokenVerifier",
    "bearer",
    "current_principal",
    "raw_workspace",
    "scope",
    "scope_message",
    "scope_raw",
    "workspace_plan",
]

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
        "QueryService": {
            "GetMetrics": _R,
            "ReadSeries": _R,
            "ListSeries": _R,
            "ReadCharts": _R,
        },
        "ArtifactService": {"UploadArtifact": _W, "DownloadArtifact": _R, "ListArtifacts": _R},
        "TokenService": {"CreateToken": _A, "ListTokens": _A, "RevokeToken": _A},
    }.items()
    for method, needed in methods.items()
}


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
            iso_time(row.expires_at) if row.expires_at else "never",
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
                principal_var.set(self.principal)
                try:
                    request = self._scope(request, context)
                except ApiError as exc:
                    await abort_with(context, exc)
                async for response in behavior(request, context):
                    yield response

            return agen

        async def unary(request: Any, context: Any) -> Any:
            principal_var.set(self.principal)
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
                principal_var.set(self.principal)
                async for response in behavior(self._messages(requests, context), context):
                    yield response

            return agen

        async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
            principal_var.set(self.principal)
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
