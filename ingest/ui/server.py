"""The web UI's HTTP server: a read-only JSON API over ingest/store/views.py
and the static page (ingest/ui/static), with aiohttp.

Why aiohttp: it is asyncio like the rest of the service, pairs with asyncpg
and aiobotocore (already a dependency of the latter), streams responses (file
downloads straight from S3), and needs no framework beyond it.

Authentication is the gRPC service's: with `auth=token` every /api/ request
carries `Authorization: Bearer stl_<id>_<secret>` (the page keeps a token it
was given in sessionStorage), checked by the same TokenVerifier against the
same tokens table; any role may read, and the token's workspace is the only
one it sees (a `workspace` parameter naming another is 403). With
`auth=none` the server listens on loopback addresses only (the same rule and
opt-in as `serve`) and a `workspace` parameter picks the workspace.

Images and files are fetched by the browser itself (<img src>, a download
link), which sends no header: an authorized /api/ read hands out links to
/blob signed with HMAC-SHA256 by a key of this process (or
STEPLOG_UI_LINK_KEY, shared by replicas), valid for LINK_TTL_S.

Over 500 lines: one aiohttp application whose handlers (one per /api/ route)
share the authentication, the parameter checks and the error mapping above;
the reads themselves are in the store (views.py, view_blocks.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from aiohttp import web

from ingest import addresses
from ingest import config as config_mod
from ingest.store.db import READ_SETTINGS
from ingest.store.views import SeriesRef, ViewError, ViewStore, number
from ingest.ui.config import UiConfig, from_sources

log = logging.getLogger("steplog.ui")

_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_HandlerFn = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC = Path(__file__).resolve().parent / "static"
LINK_TTL_S = 600.0


class Refused(Exception):
    """A request without the right credentials: 401 or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


def _error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="steplog"'} if status == 401 else None
    return web.json_response({"error": message}, status=status, dumps=_dumps, headers=headers)


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ViewError(400, f"{name}: must be an integer; got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ViewError(400, f"{name}: must be {low}..{high}; got {value}")
    return value


def _float(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name, "")
    if raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ViewError(400, f"{name}: must be a number; got {raw[:40]!r}") from None


def _required(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise ViewError(400, f"{name}: required")
    if len(value) > 4096:
        raise ViewError(400, f"{name}: at most 4096 characters")
    return value


def _labels(request: web.Request) -> dict[str, str]:
    raw = request.query.get("labels", "")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise ViewError(400, "labels: must be a JSON object of strings") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ViewError(400, "labels: must be a JSON object of strings")
    return value


def _list(request: web.Request, name: str, most: int) -> list[str]:
    items = [x for x in request.query.get(name, "").split(",") if x]
    if len(items) > most:
        raise ViewError(400, f"{name}: at most {most} values")
    return items


def chart_json(got: dict[str, Any]) -> dict[str, Any]:
    """A chart answer as JSON: per series `steps`, `times` and `values`
    lists (NaN and the infinities as the strings JavaScript's Number() reads)."""
    series = []
    for s in got["series"]:
        values = s["values"]
        listed: list[Any] = values.tolist()
        for i in np.flatnonzero(~np.isfinite(values)).tolist():
            listed[i] = number(listed[i])
        series.append(
            {**s, "steps": s["steps"].tolist(), "times": s["times"].tolist(), "values": listed}
        )
    return {**got, "series": series}


def chart_binary(got: dict[str, Any]) -> bytes:
    """A chart answer as one binary body for the page: a little-endian
    uint32 N, N bytes of JSON (the answer without the points; per series `n`,
    its number of points), zeros up to a multiple of 8 bytes, then per series
    `n` float64 steps and `n` float64 values (NaN and infinities as they
    are), and `n` float64 times (epoch seconds) only when `x` is "time". All
    little-endian: the page reads them as Float64Arrays without copying."""
    timed = got["x"] == "time"
    head = {**got, "series": [], "times": timed}
    arrays: list[bytes] = []
    for s in got["series"]:
        meta = {k: v for k, v in s.items() if k not in ("steps", "times", "values")}
        meta["n"] = int(s["steps"].size)
        head["series"].append(meta)
        arrays.append(s["steps"].astype("<f8").tobytes())
        arrays.append(s["values"].astype("<f8").tobytes())
        if timed:
            arrays.append(s["times"].astype("<f8").tobytes())
    text = _dumps(head).encode()
    pad = -(4 + len(text)) % 8
    return b"".join([struct.pack("<I", len(text) + pad), text, b" " * pad, *arrays])


class UiServer:
    """The HTTP server of one `ui` process."""

    def __init__(self, cfg: UiConfig) -> None:
        self.cfg = cfg
        self.pool: asyncpg.Pool | None = None
        self.views: ViewStore | None = None
        self.verifier: Any = None
        self.blobs: Any = None
        self.runner: web.AppRunner | None = None
        self.urls: list[str] = []

    # -- lifecycle ----------------------------------------------------------------

    def _binds(self) -> list[str]:
        cfg = self.cfg.service
        if cfg.auth != "none":
            return [self.cfg.listen]
        try:
            return list(addresses.loopback_binds(self.cfg.listen))
        except addresses.AddressError as exc:
            if not cfg.allow_unauthenticated_non_loopback:
                raise SystemExit(
                    f"steplog-ingest ui: refusing to listen on {self.cfg.listen} without "
                    f"authentication: {exc}; without it only a loopback address is allowed "
                    "(STEPLOG_AUTH=token, or STEPLOG_ALLOW_UNAUTHENTICATED_NON_LOOPBACK=true "
                    "only where the network itself restricts who can connect)"
                ) from None
        log.warning("web UI on %s WITHOUT AUTHENTICATION (explicit opt-in)", self.cfg.listen)
        return [self.cfg.listen]

    async def start(self) -> list[str]:
        from ingest.observe.metrics import Metrics
        from ingest.store.blobs import BlobSettings, BlobStore

        cfg = self.cfg.service
        binds = self._binds()
        try:
            # Custom plans and no JIT, as the service reads (ingest.store.db.READ_SETTINGS).
            self.pool = await asyncpg.create_pool(
                cfg.database_url,
                # Two open from the start: a page's first chart and its runs' details go together.
                min_size=min(2, cfg.db_pool_size),
                max_size=cfg.db_pool_size,
                command_timeout=60,
                server_settings=dict(READ_SETTINGS),
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise SystemExit(
                f"steplog-ingest ui: database unavailable: {config_mod.scrub(str(exc), cfg)}"
            ) from None
        assert self.pool is not None
        found = await self.pool.fetchval("SELECT to_regclass('public.runs') IS NOT NULL")
        if not found:
            raise SystemExit(
                "steplog-ingest ui: the database has no steplog schema yet; start "
                "`steplog-ingest serve` against it once (it applies the migrations)"
            )
        # The cache files name the database this process reads (never a password).
        where = await self.pool.fetchval(
            "SELECT current_database() || '@' || coalesce(host(inet_server_addr()), 'local')"
            " || ':' || coalesce(inet_server_port(), 0)"
        )
        self.views = ViewStore(
            self.pool,
            cfg.heartbeat_timeout_s,
            cfg.max_response_bytes,
            self.cfg.cache_bytes,
            self.cfg.cache_dir,
            str(where),
        )
        if cfg.auth == "token":
            from ingest.api.auth import TokenVerifier
            from ingest.store.tokens import TokenStore

            self.verifier = TokenVerifier(
                TokenStore(self.pool, cfg.token_pepper), cfg.auth_cache_ttl_s
            )
        self.blobs = BlobStore(BlobSettings.from_config(cfg), Metrics(process=False))
        await self.blobs.start()
        app = self.app()
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        for bind in binds:
            host, port = addresses.split_host_port(bind)
            site = web.TCPSite(self.runner, host.strip("[]"), port)
            await site.start()
        self.urls = []
        for addr in self.runner.addresses:
            host, port = addr[0], addr[1]
            shown = f"[{host}]" if ":" in host else host
            self.urls.append(f"http://{shown}:{port}/")
        return self.urls

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.verifier is not None:
            await self.verifier.close()
        if self.blobs is not None:
            await self.blobs.close()
        if self.pool is not None:
            await self.pool.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/healthz", self.healthz)
        r.add_static("/static/", STATIC, append_version=False)
        r.add_get("/blob", self.blob)
        api: dict[str, _HandlerFn] = {
            "whoami": self.whoami,
            "experiments": self.experiments,
            "runs": self.runs,
            "run": self.run,
            "runs-meta": self.runs_meta,
            "series": self.series,
            "chart": self.chart,
            "table": self.table,
            "evaluation": self.evaluation,
            "images": self.images,
            "histograms": self.histograms,
            "files": self.files,
        }
        for name, fn in api.items():
            r.add_get(f"/api/{name}", fn)
        return app

    # -- middleware: auth, errors, headers ------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _HandlerFn) -> web.StreamResponse:
        try:
            if request.path.startswith("/api/"):
                request["workspace"], request["principal"] = await self._authorize(request)
            response: web.StreamResponse = await handler(request)
        except Refused as exc:
            return _error(exc.status, exc.message)
        except ViewError as exc:
            return _error(exc.status, exc.message)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            log.warning("read failed: %s", type(exc).__name__)
            return _error(503, "the database or object store is unavailable; try again")
        except asyncpg.DataError as exc:
            return _error(400, f"bad parameter: {exc}")
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline';"
            " frame-ancestors 'none'",
        )
        return response

    async def _authorize(self, request: web.Request) -> tuple[str, Any]:
        from ingest.core import model

        asked = request.query.get("workspace", "")
        if self.verifier is None:
            try:
                return model.workspace_name(asked), None
            except Exception as exc:
                raise ViewError(400, f"workspace: {exc}") from None
        from ingest.api.auth import Denied, Role, bearer

        try:
            text = bearer([(k, v) for k, v in request.headers.items()])
            principal = await self.verifier.verify(text)
        except Denied as exc:
            raise Refused(401, exc.message) from None
        if not principal.role.allows(Role.READER):
            raise Refused(403, "this token may not read")
        if asked and asked != principal.workspace:
            raise Refused(
                403, f"this token belongs to workspace {principal.workspace!r}, not {asked!r}"
            )
        return principal.workspace, principal

    # -- pages ---------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    # -- the API -------------------------------------------------------------------

    @property
    def _views(self) -> ViewStore:
        assert self.views is not None
        return self.views

    async def whoami(self, request: web.Request) -> web.StreamResponse:
        p = request["principal"]
        return _json(
            {
                "auth": self.cfg.service.auth,
                "workspace": request["workspace"],
                "role": p.role.value if p is not None else None,
                "token_id": p.token_id if p is not None else None,
            }
        )

    async def experiments(self, request: web.Request) -> web.StreamResponse:
        recent = _int(request, "recent", 5, 0, 50)
        return _json(await self._views.experiments(request["workspace"], recent))

    async def runs(self, request: web.Request) -> web.StreamResponse:
        experiment = _required(request, "experiment")
        metrics = _list(request, "metrics", 50)
        limit = _int(request, "limit", 2000, 1, 2000)
        return _json(await self._views.runs(request["workspace"], experiment, metrics, limit))

    async def run(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._views.run(request["workspace"], _required(request, "id")))

    async def runs_meta(self, request: web.Request) -> web.StreamResponse:
        ids = _list(request, "ids", 256)
        return _json({"runs": await self._views.runs_by_id(request["workspace"], ids)})

    async def series(self, request: web.Request) -> web.StreamResponse:
        run_id = _required(request, "run")
        return _json({"series": await self._views.series(request["workspace"], run_id)})

    async def chart(self, request: web.Request) -> web.StreamResponse:
        metric = _required(request, "metric")
        runs = _list(request, "runs", 256)
        width = _int(request, "width", 800, 1, 4096)
        x = request.query.get("x", "step")
        fmt = request.query.get("format", "json")
        if fmt not in ("json", "binary"):
            raise ViewError(400, "format: must be 'json' or 'binary'")
        started = time.perf_counter()
        got = await self._views.chart(
            request["workspace"],
            [SeriesRef(r, metric) for r in runs],
            width,
            x,
            _float(request, "start"),
            _float(request, "end"),
        )
        got["query_ms"] = round((time.perf_counter() - started) * 1000, 2)
        if fmt == "binary":
            response = web.Response(body=chart_binary(got), content_type="application/octet-stream")
        else:
            response = _json(chart_json(got))
        response.headers["Server-Timing"] = f"db;dur={got['query_ms']}"
        return response

    async def table(self, request: web.Request) -> web.StreamResponse:
        return _json(
            await self._views.table(
                request["workspace"],
                _required(request, "run"),
                _required(request, "name"),
                _labels(request),
                _int(request, "limit", 1000, 1, 100_000),
            )
        )

    async def evaluation(self, request: web.Request) -> web.StreamResponse:
        return _json(
            await self._views.evaluations(
                request["workspace"],
                _required(request, "run"),
                _required(request, "name"),
                _labels(request),
            )
        )

    async def histograms(self, request: web.Request) -> web.StreamResponse:
        return _json(
            await self._views.histograms(
                request["workspace"],
                _required(request, "run"),
                _required(request, "name"),
                _labels(request),
                _int(request, "limit", 1000, 1, 10_000),
            )
        )

    async def images(self, request: web.Request) -> web.StreamResponse:
        got = await self._views.images(
            request["workspace"],
            _required(request, "run"),
            _required(request, "name"),
            _labels(request),
        )
        for im in got["images"]:
            im["url"] = self._link(im["sha256"], im["content_type"], "", inline=True)
        return _json(got)

    async def files(self, request: web.Request) -> web.StreamResponse:
        workspace, run_id = request["workspace"], _required(request, "run")
        await self._views.run(workspace, run_id)  # 404 for a run of another workspace
        files = await self._views.files(workspace, run_id)
        for f in files:
            row = await self._views.file(workspace, run_id, f["path"])
            f["url"] = self._link(row["sha256"], row["content_type"], f["path"], inline=False)
        return _json({"files": files})

    # -- signed links to blobs ---------------------------------------------------------

    def _sign(self, body: str) -> str:
        return hmac.new(self.cfg.link_key, body.encode(), hashlib.sha256).hexdigest()

    def _link(self, sha256: str, content_type: str, filename: str, inline: bool) -> str:
        claim = {
            "h": sha256,
            "c": content_type,
            "f": filename.rsplit("/", 1)[-1],
            "i": inline,
            "e": int(time.time() + LINK_TTL_S),
        }
        body = base64.urlsafe_b64encode(_dumps(claim).encode()).decode().rstrip("=")
        return f"/blob?d={body}&s={self._sign(body)}"

    async def blob(self, request: web.Request) -> web.StreamResponse:
        from ingest.store.blobs import BlobNotFound

        body, sig = request.query.get("d", ""), request.query.get("s", "")
        if len(body) > 2048 or not hmac.compare_digest(self._sign(body), sig):
            raise Refused(403, "not a link this server signed")
        claim = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if claim["e"] < time.time():
            raise Refused(403, "this link expired: reload the page")
        inline = bool(claim["i"]) and claim["c"] in _IMAGE_TYPES
        ctype = claim["c"] if inline else "application/octet-stream"
        name = str(claim["f"]).replace('"', "") or "download"
        response = web.StreamResponse(
            headers={
                "Content-Type": ctype,
                "Content-Disposition": "inline" if inline else f'attachment; filename="{name}"',
                "Cache-Control": "private, max-age=600",
                "Content-Security-Policy": "sandbox; default-src 'none'",
            }
        )
        try:
            chunks = self.blobs.open(claim["h"])
            first = await anext(chunks, b"")
        except BlobNotFound:
            raise ViewError(404, "the blob is missing from the object store") from None
        await response.prepare(request)
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


async def run_ui(cfg: UiConfig, ready: Callable[[list[str]], None]) -> None:
    server = UiServer(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        urls = await server.start()
        ready(urls)
        await stop.wait()
    finally:
        await server.close()


def main(ns: argparse.Namespace) -> int:
    """`steplog-ingest ui`: prints `steplog: web UI on URL` once listening."""
    try:
        cfg = from_sources(ns)
    except config_mod.ConfigError as exc:
        print(f"steplog-ingest ui: configuration error: {exc}", flush=True)
        return 2

    def ready(urls: list[str]) -> None:
        print(f"steplog: web UI on {urls[0]}", flush=True)
        if ns.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ns.ready_fd, f"ready {urls[0]}\n".encode())
                os.close(ns.ready_fd)

    asyncio.run(run_ui(cfg, ready))
    return 0


__all__ = ["UiServer", "main", "run_ui"]
