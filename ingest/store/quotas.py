"""Quotas per workspace: two rates and three hard limits.

Rates (`points_per_s`, `bytes_per_s`) are checked in the ingest servicer,
after a request is decoded and before anything of it is stored. Each
service process keeps a token bucket per workspace and quota, refilled at
the quota divided by `quota_replicas` (the number of service processes the
operator runs), holding at most one second of it. A request is admitted
when its bucket holds its cost, or is full (so a batch larger than a
second's worth still passes alone, and leaves the bucket in debt). When the
bucket would take up to MAX_WAIT_S to fill, the request waits (the stream is
not read meanwhile: the client slows down through flow control); when
longer, it is answered RESOURCE_EXHAUSTED with a google.rpc.RetryInfo
saying when the bucket will hold it, which the client honours before it
resends (nothing is lost).

Why per process and not a shared counter: the rate check runs on every
request, and a counter in PostgreSQL would add a round trip and one hot row
per workspace shared by every replica. A per-process bucket costs nothing;
the price is accuracy when a workspace's traffic is spread unevenly over
the replicas (one writer on one of four replicas gets a quarter of the
quota). `quota_replicas` = 1 (the default) gives every process the whole
quota.

Hard limits (`runs`, `series`, `stored_bytes`) are exact: a row per
workspace in `workspace_usage` counts what it holds and is updated, under a
row lock, in the transaction that creates the run or series or stores the
image or file row. Over a limit, creating a run is RESOURCE_EXHAUSTED (no
RetryInfo: waiting does not help), a new series in a batch is rejected
LIMIT_EXCEEDED, and so is an image point; a file upload is
RESOURCE_EXHAUSTED. Every message names the quota. `stored_bytes` is also
checked, approximately, before any byte goes to S3, so a workspace over its
quota cannot fill the bucket.

Limits come from the service's settings, overridden per workspace by rows
of `workspace_quotas` (`steplog-ingest quota set`); NULL there means "the
setting", 0 means unlimited. The rates read the overrides through a cache
(LIMITS_TTL_S); the hard limits read them in the transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ingest.core.errors import ApiError, StoreUnavailable

# The quotas, by the names used in settings, the table and the metric label.
POINTS_PER_S = "points_per_s"
BYTES_PER_S = "bytes_per_s"
RUNS = "runs"
SERIES = "series"
STORED_BYTES = "stored_bytes"
QUOTA_NAMES = (POINTS_PER_S, BYTES_PER_S, RUNS, SERIES, STORED_BYTES)

# A request waits this long at most for its rate bucket; longer, it is shed.
MAX_WAIT_S = 1.0
# A bucket holds this many seconds of its rate.
BURST_S = 1.0
# How long a workspace's overrides are trusted from memory (rates only).
LIMITS_TTL_S = 10.0
# Workspaces whose buckets are kept (least recently used go first).
MAX_BUCKETS = 10_000
# A wait shorter than this is not waited.
_SLACK_S = 0.001


@dataclass(frozen=True)
class Limits:
    """One workspace's quotas; 0 is unlimited."""

    points_per_s: int = 0
    bytes_per_s: int = 0
    runs: int = 0
    series: int = 0
    stored_bytes: int = 0

    def with_overrides(self, row: Mapping[str, Any] | None) -> Limits:
        if row is None:
            return self
        changes = {f.name: int(row[f.name]) for f in fields(self) if row.get(f.name) is not None}
        return replace(self, **changes)


def describe_quota(name: str) -> str:
    return {
        POINTS_PER_S: "points-per-second quota",
        BYTES_PER_S: "bytes-per-second quota",
        RUNS: "runs quota",
        SERIES: "series quota",
        STORED_BYTES: "stored-bytes quota",
    }[name]


class QuotaExceeded(ApiError):
    """A hard quota is spent: RESOURCE_EXHAUSTED without RetryInfo (waiting
    does not help; the operator raises the quota or the workspace frees room)."""

    def __init__(self, quota: str, message: str, field: str = "") -> None:
        super().__init__("RESOURCE_EXHAUSTED", message, field)
        self.quota = quota


class RateLimited(Exception):
    """Over a rate quota: RESOURCE_EXHAUSTED with RetryInfo(retry_after)."""

    def __init__(self, quota: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.quota = quota
        self.retry_after = retry_after


def hard_limit_message(quota: str, workspace: str, used: int, limit: int, what: str) -> str:
    return (
        f"workspace {workspace!r} is over its {describe_quota(quota)} ({quota} = {limit};"
        f" it holds {used}): {what}"
    )


class TokenBucket:
    """Tokens refilled at `rate` per second up to `capacity`; a take of n
    passes when the bucket holds min(n, capacity), and may leave it in debt."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def delay(self, n: float, now: float) -> float:
        """Seconds until a take of n would pass (0: now)."""
        self._refill(now)
        need = min(n, self.capacity)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens -= n

    def retune(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = min(self.tokens, capacity)


Loader = Callable[[str], Any]  # async (workspace) -> row of workspace_quotas or None


class Quotas:
    """The quota defaults and the rate buckets of this process."""

    def __init__(
        self,
        defaults: Limits,
        replicas: int = 1,
        loader: Loader | None = None,
        on_exceeded: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.defaults = defaults
        self.replicas = max(1, replicas)
        self._loader = loader
        self._on_exceeded = on_exceeded
        self._clock = clock
        self.max_wait_s = max_wait_s
        self._limits: dict[str, tuple[float, Limits]] = {}
        self._loading: dict[str, asyncio.Task[Limits]] = {}
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def exceeded(self, quota: str) -> None:
        if self._on_exceeded is not None:
            self._on_exceeded(quota)

    async def limits(self, workspace: str) -> Limits:
        """The workspace's limits (its overrides cached LIMITS_TTL_S). The
        requests that find the cache empty or old at the same moment share
        one load (200 streams of one workspace made 200 queries at once)."""
        if self._loader is None:
            return self.defaults
        cached = self._limits.get(workspace)
        if cached is not None and self._clock() - cached[0] < LIMITS_TTL_S:
            return cached[1]
        task = self._loading.get(workspace)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(workspace))
            self._loading[workspace] = task
        # Shielded: a caller that is cancelled does not cancel the others' load.
        return await asyncio.shield(task)

    async def _load(self, workspace: str) -> Limits:
        try:
            now = self._clock()
            cached = self._limits.get(workspace)
            assert self._loader is not None
            try:
                row = await self._loader(workspace)
            except StoreUnavailable:
                # The database is away: the last known limits (or the settings)
                # hold until it is back; the write itself fails on its own.
                return cached[1] if cached is not None else self.defaults
            limits = self.defaults.with_overrides(row)
            if len(self._limits) >= MAX_BUCKETS:
                self._limits.clear()
            self._limits[workspace] = (now, limits)
            return limits
        finally:
            self._loading.pop(workspace, None)

    def _bucket(self, workspace: str, quota: str, per_s: int, now: float) -> TokenBucket:
        rate = per_s / self.replicas
        capacity = max(rate * BURST_S, 1.0)
        key = (workspace, quota)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, capacity, now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            if bucket.rate != rate:
                bucket.retune(rate, capacity)
        return bucket

    async def admit(self, workspace: str, points: int, nbytes: int) -> None:
        """Take a request's points and bytes from the workspace's rate
        buckets: at once, after a wait of up to max_wait_s, or RateLimited."""
        limits = await self.limits(workspace)
        costs = [
            (POINTS_PER_S, limits.points_per_s, points),
            (BYTES_PER_S, limits.bytes_per_s, nbytes),
        ]
        active = [(q, per_s, n) for q, per_s, n in costs if per_s > 0 and n > 0]
        if not active:
            return
        waited = 0.0
        while True:
            now = self._clock()
            buckets = [(q, self._bucket(workspace, q, per_s, now), n) for q, per_s, n in active]
            delays = [(b.delay(n, now), q) for q, b, n in buckets]
            delay, quota = max(delays)
            if delay <= _SLACK_S:
                for _, b, n in buckets:
                    b.take(n, now)
                return
            if waited + delay > self.max_wait_s:
                self.exceeded(quota)
                per_s = limits.points_per_s if quota == POINTS_PER_S else limits.bytes_per_s
                raise RateLimited(
                    quota,
                    f"workspace {workspace!r} is over its {describe_quota(quota)}"
                    f" ({quota} = {per_s}); retry in {delay:.2f} s",
                    retry_after=delay,
                )
            await asyncio.sleep(delay)
            waited += delay


# -- SQL, on a connection the caller holds (any event loop) --------------------------------

_USAGE_COLUMNS = (
    "u.workspace, u.runs, u.series, u.stored_bytes,"
    " q.runs AS q_runs, q.series AS q_series, q.stored_bytes AS q_stored_bytes"
)


@dataclass
class Usage:
    """A workspace's usage row (locked by the caller's transaction) and its
    effective hard limits. `delta`: the workspace has no hard limit, so its
    row was not locked and the counts are what this transaction adds
    (written by add_usage as increments)."""

    workspace: str
    runs: int
    series: int
    stored_bytes: int
    limits: Limits
    delta: bool = False


def _unlimited(limits: Limits) -> bool:
    return not (limits.runs or limits.series or limits.stored_bytes)


async def lock_usage(conn: Any, workspaces: Iterable[str], defaults: Limits) -> dict[str, Usage]:
    """Lock the usage rows of these workspaces (created when missing), in
    workspace order: every transaction takes them in that order, after its
    series rows, and at most once.

    A workspace without any hard limit (runs, series, stored bytes) is not
    locked here: nothing this transaction decides depends on its counts, so
    it gets a `delta` Usage (counts from 0) and add_usage adds to its row at
    the end. Two commits of one workspace then do not take turns from the
    moment they create a series until they commit (the pipeline's workers
    did, for every commit that created series: issue 13, W2)."""
    names = sorted(set(workspaces))
    if not names:
        return {}
    out: dict[str, Usage] = {}
    quotas = await conn.fetch(
        "SELECT w AS workspace, q.runs AS q_runs, q.series AS q_series,"
        " q.stored_bytes AS q_stored_bytes FROM unnest($1::text[]) AS w"
        " LEFT JOIN workspace_quotas q ON q.workspace = w",
        names,
    )
    for r in quotas:
        limits = defaults.with_overrides(
            {"runs": r["q_runs"], "series": r["q_series"], "stored_bytes": r["q_stored_bytes"]}
        )
        if _unlimited(limits):
            out[r["workspace"]] = Usage(r["workspace"], 0, 0, 0, limits, delta=True)
    names = [n for n in names if n not in out]
    if not names:
        return out
    await conn.execute(
        "INSERT INTO workspace_usage (workspace) SELECT w FROM unnest($1::text[]) AS w"
        " ORDER BY w ON CONFLICT (workspace) DO NOTHING",
        names,
    )
    rows = await conn.fetch(
        f"SELECT {_USAGE_COLUMNS} FROM workspace_usage u"
        " LEFT JOIN workspace_quotas q USING (workspace)"
        " WHERE u.workspace = ANY($1::text[]) ORDER BY u.workspace FOR UPDATE OF u",
        names,
    )
    for r in rows:
        limits = defaults.with_overrides(
            {"runs": r["q_runs"], "series": r["q_series"], "stored_bytes": r["q_stored_bytes"]}
        )
        out[r["workspace"]] = Usage(
            r["workspace"], r["runs"], r["series"], r["stored_bytes"], limits
        )
    return out


async def add_usage(conn: Any, usage: Sequence[Usage]) -> None:
    """Write back locked usage rows (their counts changed in memory), and add
    the counts of `delta` ones to their rows (in workspace order)."""
    locked = [u for u in usage if not u.delta]
    added = sorted(
        (u for u in usage if u.delta and (u.runs or u.series or u.stored_bytes)),
        key=lambda u: u.workspace,
    )
    if locked:
        await conn.execute(
            "UPDATE workspace_usage u SET runs = v.runs, series = v.series,"
            " stored_bytes = v.stored_bytes"
            " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])"
            " AS v(workspace, runs, series, stored_bytes) WHERE u.workspace = v.workspace",
            [u.workspace for u in locked],
            [u.runs for u in locked],
            [u.series for u in locked],
            [u.stored_bytes for u in locked],
        )
    if added:
        await conn.execute(
            "INSERT INTO workspace_usage AS u (workspace, runs, series, stored_bytes)"
            " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])"
            " ON CONFLICT (workspace) DO UPDATE SET runs = u.runs + EXCLUDED.runs,"
            " series = u.series + EXCLUDED.series,"
            " stored_bytes = u.stored_bytes + EXCLUDED.stored_bytes",
            [u.workspace for u in added],
            [u.runs for u in added],
            [u.series for u in added],
            [u.stored_bytes for u in added],
        )


async def stored_bytes(conn: Any, workspace: str) -> int:
    """What the workspace holds now (no lock: the check before S3)."""
    value = await conn.fetchval(
        "SELECT stored_bytes FROM workspace_usage WHERE workspace = $1", workspace
    )
    return int(value or 0)


async def load_overrides(conn: Any, workspace: str) -> Any:
    return await conn.fetchrow(
        "SELECT points_per_s, bytes_per_s, runs, series, stored_bytes"
        " FROM workspace_quotas WHERE workspace = $1",
        workspace,
    )


async def set_overrides(conn: Any, workspace: str, values: Mapping[str, int | None]) -> None:
    """Upsert a workspace's overrides; a None value goes back to the default."""
    unknown = set(values) - set(QUOTA_NAMES)
    if unknown:
        raise ValueError(f"unknown quota {sorted(unknown)[0]!r}")
    cols = list(values)
    params = [values[c] for c in cols]
    assignments = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)
    placeholders = ", ".join(f"${i + 2}" for i in range(len(cols)))
    await conn.execute(
        f"INSERT INTO workspace_quotas (workspace{''.join(', ' + c for c in cols)})"
        f" VALUES ($1{', ' + placeholders if cols else ''})"
        " ON CONFLICT (workspace) DO UPDATE SET updated_at = now()"
        f"{', ' + assignments if cols else ''}",
        workspace,
        *params,
    )


async def show(conn: Any, workspace: str | None) -> list[Any]:
    """Overrides and usage, per workspace (every workspace that has either)."""
    return list(
        await conn.fetch(
            "SELECT w.workspace, q.points_per_s, q.bytes_per_s, q.runs, q.series,"
            " q.stored_bytes, u.runs AS used_runs, u.series AS used_series,"
            " u.stored_bytes AS used_stored_bytes"
            " FROM (SELECT workspace FROM workspace_quotas UNION"
            "       SELECT workspace FROM workspace_usage) w"
            " LEFT JOIN workspace_quotas q USING (workspace)"
            " LEFT JOIN workspace_usage u USING (workspace)"
            " WHERE $1::text IS NULL OR w.workspace = $1 ORDER BY w.workspace",
            workspace,
        )
    )


# -- `steplog-ingest quota set|show` ------------------------------------------------------


def _quota_value(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0 (0: unlimited), or 'default'")
    return value


def add_cli(sub: Any) -> None:
    """The `quota` subcommands, on the configured database."""
    import argparse

    quota = sub.add_parser(
        "quota",
        help="set and show per-workspace quotas (on the configured database)",
        description="Per-workspace overrides of the service's --quota-* settings. A value is"
        " a number (0: unlimited) or 'default' (the service's setting). Hard quotas (runs,"
        " series, stored bytes) apply at once; rates within "
        f"{LIMITS_TTL_S:.0f} s. Migrations are applied first.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url", default=None, help="PostgreSQL URL (env STEPLOG_DATABASE_URL)"
    )
    actions = quota.add_subparsers(dest="quota_command", required=True)
    setter = actions.add_parser("set", parents=[common], help="set a workspace's quotas")
    setter.add_argument("--workspace", required=True)
    for name in QUOTA_NAMES:
        setter.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            type=_quota_value,
            help=f"the {describe_quota(name)} (a number, 0: unlimited, or 'default')",
        )
    show_cmd = actions.add_parser(
        "show", parents=[common], help="show overrides and usage per workspace"
    )
    show_cmd.add_argument("--workspace", default=None, help="only this workspace")


def run_cli(ns: Any) -> int:
    import sys

    import asyncpg

    from ingest.config import setting
    from ingest.core.errors import StoreUnavailable
    from ingest.store import db

    url = setting("database_url", ns.database_url or None)

    async def run() -> int:
        async with (
            db.command_pool(url, "steplog-ingest quota") as pool,
            pool.acquire() as conn,
        ):
            if ns.quota_command == "set":
                from ingest.core import model

                workspace = model.workspace_name(ns.workspace)
                values = {n: getattr(ns, n) for n in QUOTA_NAMES if hasattr(ns, n)}
                await set_overrides(conn, workspace, values)
                rows = await show(conn, workspace)
            else:
                rows = await show(conn, ns.workspace)
        _print(rows)
        return 0

    try:
        return asyncio.run(run())
    except asyncpg.LockNotAvailableError:
        print(
            f"steplog-ingest quota: the database is busy: a lock stayed taken for"
            f" {db.CLI_LOCK_TIMEOUT_S:g} s (a service applying migrations?); try again",
            file=sys.stderr,
        )
        return 1
    except (StoreUnavailable, OSError, ApiError) as exc:
        print(f"steplog-ingest quota: {exc}", file=sys.stderr)
        return 1


def _print(rows: Sequence[Any]) -> None:
    header = ["workspace", *QUOTA_NAMES, "used_runs", "used_series", "used_stored_bytes"]
    print("\t".join(header))
    for r in rows:
        cells = [r["workspace"]]
        cells += ["default" if r[n] is None else str(r[n]) for n in QUOTA_NAMES]
        cells += [str(r[n] or 0) for n in ("used_runs", "used_series", "used_stored_bytes")]
        print("\t".join(cells))
