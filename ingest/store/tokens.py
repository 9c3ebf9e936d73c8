"""Bearer tokens: their text, their hash, and the table that keeps them.

A token's text is `stl_<token_id>_<secret>`: the token id (12 URL-safe
characters, never a leading '-' in a new one, so it can be passed to the
`token revoke` command as it is) is the lookup key, stored in clear and safe
to log; the secret
(32 random bytes, base64url, 43 characters) is stored only as
HMAC-SHA256(pepper, secret), or SHA-256 when no pepper is set, and compared
in constant time. The text is returned once, at creation, and never again.

Only this module (and the migration 005_tokens.sql) touch the `tokens` table;
ingest/api/auth.py checks requests against it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from ingest.core import model
from ingest.core.checks import CONTROL
from ingest.core.errors import invalid, not_found
from ingest.store.db import CLI_LOCK_TIMEOUT_S

PREFIX = "stl_"
SECRET_BYTES = 32
_TOKEN = re.compile(r"stl_([A-Za-z0-9_-]{12})_([A-Za-z0-9_-]{43})")
_TOKEN_ID = re.compile(r"[A-Za-z0-9_-]{12}")
MAX_NAME_CHARS = 128
_DURATION = re.compile(r"(\d+)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Creating a token that lives longer than this is refused (it is a typo).
MAX_EXPIRES_IN_S = 100 * 365 * 86400


class Role(enum.Enum):
    """What a token may do; each role can do everything the one before it can."""

    READER = "reader"
    WRITER = "writer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.READER: 0, Role.WRITER: 1, Role.ADMIN: 2}


def role(value: str, field: str = "role") -> Role:
    try:
        return Role(value)
    except ValueError:
        raise invalid(field, f"role must be reader, writer or admin, not {value[:40]!r}") from None


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as stored: everything but the secret's hash."""

    token_id: str
    name: str
    workspace: str
    role: Role
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


def _row(r: Any) -> TokenRow:
    return TokenRow(
        token_id=r["token_id"],
        name=r["name"],
        workspace=r["workspace"],
        role=Role(r["role"]),
        created_at=r["created_at"],
        created_by=r["created_by"],
        expires_at=r["expires_at"],
        last_used_at=r["last_used_at"],
        revoked_at=r["revoked_at"],
    )


def parse(text: str) -> tuple[str, str] | None:
    """(token_id, secret) of a well-formed token text, else None."""
    m = _TOKEN.fullmatch(text)
    return (m.group(1), m.group(2)) if m else None


def hash_secret(secret: str, pepper: str = "") -> bytes:
    if pepper:
        return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).digest()
    return hashlib.sha256(secret.encode()).digest()


def matches(secret: str, stored: bytes, pepper: str = "") -> bool:
    """Constant time in the secret: hmac.compare_digest of the two hashes."""
    return hmac.compare_digest(hash_secret(secret, pepper), stored)


def new_token() -> tuple[str, str, str]:
    """(token_id, secret, text) of a fresh random token.

    The id never starts with '-': a command line would take it for an option
    (`steplog-ingest token revoke -Q2x...` failed, for one id in 64)."""
    while True:
        token_id = secrets.token_urlsafe(9)  # 9 bytes -> 12 characters
        if not token_id.startswith("-"):
            break
    secret = secrets.token_urlsafe(SECRET_BYTES)  # 32 bytes -> 43 characters
    return token_id, secret, f"{PREFIX}{token_id}_{secret}"


def token_name(value: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise invalid("name", f"name is {len(value)} characters; the limit is {MAX_NAME_CHARS}")
    if CONTROL.search(value):
        raise invalid("name", "name contains a control character")
    return value


def token_id(value: str, field: str = "token_id") -> str:
    if not _TOKEN_ID.fullmatch(value):
        raise invalid(field, "a token id is 12 characters of A-Z, a-z, 0-9, '_' and '-'")
    return value


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' or plain seconds -> seconds (> 0)."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a duration: a positive number with s, m, h, d or w (e.g. 30d)"
        )
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def lifetime_s(seconds: float | None) -> float | None:
    if seconds is None or seconds == 0:
        return None
    if seconds < 0:
        raise invalid("expires_in", "expires_in must be positive (or unset: never expires)")
    if seconds > MAX_EXPIRES_IN_S:
        raise invalid("expires_in", "expires_in is over 100 years; leave it unset instead")
    return seconds


class TokenStore:
    """The `tokens` table. Workspace-scoped calls never see other workspaces'
    tokens: a token id of another workspace is NOT_FOUND like a missing one."""

    def __init__(self, pool: asyncpg.Pool, pepper: str = "") -> None:
        self.pool = pool
        self.pepper = pepper

    async def create(
        self,
        workspace: str,
        role_: Role,
        name: str = "",
        expires_in_s: float | None = None,
        created_by: str = "",
    ) -> tuple[TokenRow, str]:
        """A new token: its row and its text (the only time the text exists)."""
        workspace = model.workspace_name(workspace)
        name = token_name(name)
        lifetime = lifetime_s(expires_in_s)
        for _ in range(5):  # a clash of 72 random bits: practically never
            tid, secret, text = new_token()
            r = await self.pool.fetchrow(
                "INSERT INTO tokens (token_id, name, workspace, role, secret_hash, created_by,"
                " expires_at) VALUES ($1, $2, $3, $4, $5, $6,"
                " CASE WHEN $7::float8 IS NULL THEN NULL"
                "      ELSE now() + make_interval(secs => $7::float8) END)"
                " ON CONFLICT (token_id) DO NOTHING RETURNING *",
                tid,
                name,
                workspace,
                role_.value,
                hash_secret(secret, self.pepper),
                created_by,
                lifetime,
            )
            if r is not None:
                return _row(r), text
        raise RuntimeError("could not pick a free token id")

    async def list(self, workspace: str | None, include_revoked: bool = True) -> list[TokenRow]:
        """Tokens of a workspace (None: every workspace), oldest first."""
        rows = await self.pool.fetch(
            "SELECT * FROM tokens WHERE ($1::text IS NULL OR workspace = $1)"
            " AND ($2 OR revoked_at IS NULL) ORDER BY created_at, token_id",
            workspace,
            include_revoked,
        )
        return [_row(r) for r in rows]

    async def revoke(self, token_id_: str, workspace: str | None) -> tuple[TokenRow, bool]:
        """(the token, whether this call revoked it). NOT_FOUND when it does not
        exist in the workspace (None: in any workspace)."""
        token_id(token_id_)
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "UPDATE tokens SET revoked_at = now() WHERE token_id = $1"
                " AND ($2::text IS NULL OR workspace = $2) AND revoked_at IS NULL RETURNING *",
                token_id_,
                workspace,
            )
            if r is not None:
                return _row(r), True
            r = await conn.fetchrow(
                "SELECT * FROM tokens WHERE token_id = $1 AND ($2::text IS NULL OR workspace = $2)",
                token_id_,
                workspace,
            )
        if r is None:
            where = f" in workspace {workspace!r}" if workspace else ""
            raise not_found("token_id", f"token {token_id_!r} does not exist{where}")
        return _row(r), False

    async def lookup(self, token_id_: str) -> tuple[TokenRow, bytes] | None:
        """The row and stored hash of a token id, or None. A database that
        cannot be reached is StoreUnavailable (the caller gets UNAVAILABLE)."""
        from ingest.store.db import acquire

        async with acquire(self.pool) as conn:
            r = await conn.fetchrow("SELECT * FROM tokens WHERE token_id = $1", token_id_)
        return None if r is None else (_row(r), bytes(r["secret_hash"]))

    async def touch(self, token_id_: str, every_s: float = 60.0) -> None:
        """Record a use, at most once per `every_s` (across replicas too)."""
        await self.pool.execute(
            "UPDATE tokens SET last_used_at = now() WHERE token_id = $1 AND"
            " (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2::float8))",
            token_id_,
            every_s,
        )


@asynccontextmanager
async def _store(pool_or_url: asyncpg.Pool | str, pepper: str) -> AsyncIterator[TokenStore]:
    if isinstance(pool_or_url, str):
        from ingest.store import db

        async with db.command_pool(pool_or_url, "steplog-ingest token") as pool:
            yield TokenStore(pool, pepper)
    else:
        yield TokenStore(pool_or_url, pepper)


async def create_token(
    pool_or_url: asyncpg.Pool | str,
    workspace: str,
    role_: Role | str,
    name: str = "",
    expires_in: float | timedelta | None = None,
    pepper: str = "",
    created_by: str = "api",
) -> str:
    """Create a token and return its text (for tests and tools).

    `pool_or_url` is a pool, or a database URL (migrations are applied first).
    """
    r = role_ if isinstance(role_, Role) else role(role_)
    seconds = expires_in.total_seconds() if isinstance(expires_in, timedelta) else expires_in
    async with _store(pool_or_url, pepper) as store:
        _, text = await store.create(workspace, r, name, seconds, created_by)
    return text


# -- `steplog-ingest token create | list | revoke` -------------------------------------


def add_cli(sub: Any) -> None:
    """The `token` subcommands, on the configured database."""
    import argparse

    token = sub.add_parser(
        "token",
        help="create, list and revoke bearer tokens (on the configured database)",
        description="Manage the bearer tokens the service checks with --auth token. "
        "Pending migrations are applied first; a lock is waited for"
        f" {CLI_LOCK_TIMEOUT_S:g} s at most.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url", default=None, help="PostgreSQL URL (env STEPLOG_DATABASE_URL)"
    )
    common.add_argument(
        "--token-pepper",
        default=None,
        help="the service's --token-pepper (env STEPLOG_TOKEN_PEPPER); must match the service",
    )
    actions = token.add_subparsers(dest="token_command", required=True)
    create = actions.add_parser(
        "create", parents=[common], help="create a token and print it (once)"
    )
    create.add_argument("--workspace", required=True, help="the only workspace it can touch")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", default="", help="a label: who or what uses it")
    create.add_argument(
        "--expires-in", default=None, help="lifetime, e.g. 30d, 12h, 90m (default: never expires)"
    )
    listing = actions.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    listing.add_argument("--workspace", default=None, help="only this workspace")
    listing.add_argument("--active", action="store_true", help="leave out revoked tokens")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a token by its id")
    revoke.add_argument(
        "token_id",
        help="the id shown by `token list` (stl_<id>_...); one that starts with '-' is"
        " taken as it is too",
    )


# Options of `token revoke` that take a value (an id-like value after one is its value).
_REVOKE_VALUED = ("--database-url", "--token-pepper")


def cli_args(args: list[str]) -> list[str]:
    """The command line with a `token revoke` id that starts with '-' moved
    behind '--', so argparse does not take it for an option (ids made before
    new ones stopped starting with '-'). Anything else is left as it is."""
    start = next(
        (k + 2 for k in range(len(args) - 1) if args[k : k + 2] == ["token", "revoke"]), None
    )
    if start is None or "--" in args[start:]:
        return args
    for k in range(start, len(args)):
        arg, prev = args[k], args[k - 1]
        if not (arg.startswith("-") and _TOKEN_ID.fullmatch(arg)):
            continue
        if any(o.startswith(arg) for o in (*_REVOKE_VALUED, "--help")):
            continue  # an abbreviated option, as argparse allows
        if len(prev) > 2 and "=" not in prev and any(o.startswith(prev) for o in _REVOKE_VALUED):
            continue  # the value of --database-url / --token-pepper
        return [*args[:k], *args[k + 1 :], "--", arg]
    return args


def run_cli(ns: Any) -> int:
    import asyncio
    import logging
    import sys

    from ingest.config import redact_url, setting
    from ingest.core.errors import ApiError, StoreUnavailable

    url = setting("database_url", ns.database_url or None)
    pepper = setting("token_pepper", ns.token_pepper)
    audit = logging.getLogger("steplog.audit")
    try:
        expires = None
        if ns.token_command == "create" and ns.expires_in:
            expires = parse_duration(ns.expires_in)
    except ValueError as exc:
        print(f"steplog-ingest token: --expires-in {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with _store(url, pepper) as store:
            if ns.token_command == "create":
                row, text = await store.create(
                    ns.workspace, Role(ns.role), ns.name, expires, created_by="cli"
                )
                audit.info(
                    "token created: token_id=%s name=%r workspace=%s role=%s expires=%s by=cli",
                    row.token_id,
                    row.name,
                    row.workspace,
                    row.role.value,
                    row.expires_at.isoformat(timespec="seconds") if row.expires_at else "never",
                )
                print(text)
                print(
                    f"token {row.token_id} ({row.role.value} of workspace {row.workspace}) "
                    "created: keep it secret, it is not shown again",
                    file=sys.stderr,
                )
            elif ns.token_command == "list":
                rows = await store.list(ns.workspace, include_revoked=not ns.active)
                print(_table(rows))
            else:
                row, revoked = await store.revoke(ns.token_id, None)
                if revoked:
                    audit.info(
                        "token revoked: token_id=%s name=%r workspace=%s by=cli",
                        row.token_id,
                        row.name,
                        row.workspace,
                    )
                    print(
                        f"token {row.token_id} revoked (services stop accepting it within "
                        "their token cache time, --auth-cache-ttl-s)"
                    )
                else:
                    print(f"token {row.token_id} was already revoked")
        return 0

    try:
        return asyncio.run(run())
    except ApiError as exc:
        print(
            f"steplog-ingest token: {exc.field + ': ' if exc.field else ''}{exc.message}",
            file=sys.stderr,
        )
        return 1
    except asyncpg.LockNotAvailableError:
        print(
            f"steplog-ingest token: the database {redact_url(url)} is busy: a lock stayed"
            f" taken for {CLI_LOCK_TIMEOUT_S:g} s (a service applying migrations?); try again",
            file=sys.stderr,
        )
        return 1
    except (StoreUnavailable, OSError, asyncpg.PostgresError) as exc:
        print(
            f"steplog-ingest token: cannot use the database {redact_url(url)}: "
            f"{type(exc).__name__}",
            file=sys.stderr,
        )
        return 1


def _table(rows: list[TokenRow]) -> str:
    def when(value: datetime | None) -> str:
        return value.isoformat(timespec="seconds") if value else "-"

    head = ("ID", "NAME", "WORKSPACE", "ROLE", "CREATED", "EXPIRES", "LAST USED", "REVOKED")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r.token_id,
                r.name or "-",
                r.workspace,
                r.role.value,
                when(r.created_at),
                when(r.expires_at) if r.expires_at else "never",
                when(r.last_used_at),
                when(r.revoked_at),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
