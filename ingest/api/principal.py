"""Who is calling: the bearer token of a request, checked against the
token store through a small TTL cache (`TokenVerifier`), the `Principal` it
names, and `Denied` with the reason label when it names none (the rules are
in ingest/api/auth.py's docstring). The gRPC interceptor and the web UI use
the same checks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from ingest.core.errors import ApiError, StoreUnavailable
from ingest.store import tokens
from ingest.store.tokens import Role, TokenStore

log = logging.getLogger("steplog.audit")

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

_INVALID = "invalid token (unknown, or not the one issued)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a verified token's id, workspace and role."""

    token_id: str
    workspace: str
    role: Role
    name: str = ""


principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "steplog_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being handled; None when auth is off."""
    return principal_var.get()


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


def unauthenticated(reason: str, message: str, token_id: str = "", name: str = "") -> Denied:
    return Denied(grpc.StatusCode.UNAUTHENTICATED, reason, message, token_id, name)


def bearer(metadata: Iterable[Any] | None) -> str:
    """The token text of `authorization: Bearer <token>`; Denied when absent or odd."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise unauthenticated(
            MISSING, "missing token: send the metadata 'authorization: Bearer <token>'"
        )
    if len(values) > 1 or not isinstance(values[0], str):
        raise unauthenticated(MALFORMED, "malformed authorization: send exactly one value")
    scheme, _, text = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not text.strip():
        raise unauthenticated(MALFORMED, "malformed authorization: expected 'Bearer <token>'")
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
            raise unauthenticated(
                MALFORMED, "malformed token: expected stl_<token id>_<secret> as issued"
            )
        token_id, secret = parsed
        entry = await self._entry(token_id)
        row = entry.row
        if row is None:
            raise unauthenticated(UNKNOWN, _INVALID, token_id)
        if not tokens.matches(secret, entry.secret_hash, self.store.pepper):
            raise unauthenticated(WRONG, _INVALID, token_id)
        if row.revoked_at is not None:
            raise unauthenticated(REVOKED, f"token {token_id} is revoked", token_id, row.name)
        now = self.wall()
        if row.expires_at is not None and row.expires_at.timestamp() <= now:
            raise unauthenticated(
                EXPIRED,
                f"token {token_id} expired at {iso_time(row.expires_at)}",
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


def iso_time(value: datetime) -> str:
    return value.isoformat(timespec="seconds")
