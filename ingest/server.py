"""Builds and runs the gRPC server: the only module that does.

The composition root: every store, the pipeline and the servicers are made
and wired here (the kinds' writers, checks and readers included), so the
layers below know each other only through their Protocols. Over 500 lines:
the start is one ordered sequence of what opens before what.

Start: connect the pool, apply migrations, start the pipeline, serve with
health checking and reflection. Stop (SIGTERM): health NOT_SERVING, stop
accepting with a grace period, drain the pipeline, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ingest import addresses
from ingest import tls as tls_config
from ingest.addresses import GetAddrInfo
from ingest.api import ingest as ingest_servicer
from ingest.api.artifacts import ArtifactServicer
from ingest.api.auth import Audit, AuthInterceptor, TokenVerifier
from ingest.api.guard import RequestGuard
from ingest.api.interceptors import MetricsInterceptor
from ingest.api.metadata import ExperimentServicer
from ingest.api.query import QueryServicer
from ingest.api.sweeps import SweepRunServicer
from ingest.api.tokens import TokenServicer
from ingest.config import Config, describe, scrub
from ingest.core.errors import StoreUnavailable
from ingest.core.kinds import KIND_EVALUATION, KIND_HISTOGRAM, KIND_IMAGE, KIND_TABLE
from ingest.core.validate import Limits
from ingest.observe import metrics_http, progress
from ingest.observe.metrics import Metrics
from ingest.store import artifacts as artifacts_store
from ingest.store import blob_sweep, db, image_blobs, migrate
from ingest.store import histograms as histogram_store
from ingest.store import quotas as quota_mod
from ingest.store import tables as tables_store
from ingest.store.blobs import BlobSettings, BlobStore
from ingest.store.columns import publisher
from ingest.store.compact import Compactor
from ingest.store.metadata import MetadataStore
from ingest.store.points import PointStore
from ingest.store.queries import KindReader, QueryStore
from ingest.store.sessions import CommitSessions
from ingest.store.sweeps import SweepStore
from ingest.store.tokens import TokenStore
from ingest.store.writers import WriterSweeper
from ingest.write.pipeline import Pipeline
from ingest.write.sweeps import EarlyTermination
from steplog.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    experiment_service_pb2,
    experiment_service_pb2_grpc,
    ingest_service_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    experiment_service_pb2.DESCRIPTOR.services_by_name["ExperimentService"].full_name,
    run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name,
    token_service_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
)


OPT_IN = "STEPLOG_ALLOW_UNAUTHENTICATED_NON_LOOPBACK"


class StartError(SystemExit):
    """The service cannot start; the message is the one-line reason.

    A SystemExit, so `python -m ingest serve` ends with that line and code 1
    rather than a traceback.
    """


def bind_addresses(cfg: Config, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> tuple[str, ...]:
    """The gRPC addresses to bind, after the loopback rule.

    Without authentication every address the listen setting names (a name is
    resolved) must be a loopback address, and exactly those resolved literals
    are bound; the explicit opt-in binds the setting as written.
    """
    if cfg.auth != "none":
        return (cfg.listen,)
    try:
        return addresses.loopback_binds(cfg.listen, getaddrinfo)
    except addresses.AddressError as exc:
        if not cfg.allow_unauthenticated_non_loopback:
            raise StartError(
                f"refusing to listen on {cfg.listen} without authentication: {exc}; "
                "running without authentication is only allowed on a loopback address "
                f"(set {OPT_IN}=true only where the network itself restricts who can "
                "connect, as in a container network)"
            ) from None
    log.warning(
        "listening on %s WITHOUT AUTHENTICATION (%s=true): whoever can reach this "
        "address can read and write every workspace",
        cfg.listen,
        OPT_IN,
    )
    return (cfg.listen,)


def _check_free(binds: tuple[str, ...], reuse_port: bool) -> None:
    """Fail with one clear line when a fixed port is taken (gRPC's own bind error is vague)."""
    for address in binds:
        port = addresses.split_host_port(address)[1]
        try:
            free = port == 0 or addresses.port_free(address, reuse_port)
        except (addresses.AddressError, ValueError):
            continue  # a name (opt-in) or an unusual address: gRPC's bind decides
        if not free:
            hint = "" if reuse_port else " (--reuse-port shares it only with processes that set it)"
            raise StartError(
                f"cannot listen on {address}: the port is already in use by another process; "
                f"choose another --listen / STEPLOG_LISTEN{hint}"
            )


@dataclass
class Service:
    """One service process: gRPC server, database pool, write pipeline."""

    config: Config
    server: grpc.aio.Server | None = None
    pool: asyncpg.Pool | None = None
    health: health.aio.HealthServicer | None = None
    port: int = 0
    metrics_port: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    pipeline: Pipeline | None = None
    points: PointStore | None = None
    blobs: BlobStore | None = None
    queries: QueryServicer | None = None
    quotas: quota_mod.Quotas | None = None
    _metrics_server: metrics_http.MetricsServer | None = None
    _health_server: grpc.aio.Server | None = None
    tls: bool = False
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _closers: list[Any] = field(default_factory=list)

    async def start(self) -> int:
        cfg = self.config
        binds = bind_addresses(cfg)
        _check_free(binds, cfg.reuse_port)
        try:
            credentials = tls_config.server_credentials(cfg)
        except ValueError as exc:
            raise StartError(f"cannot start: {exc}") from None
        self.tls = credentials is not None
        log.info("starting: %s", describe(cfg))
        # /metrics first: a taken port fails the start before anything else opens.
        metrics_host = addresses.split_host_port(binds[0])[0] or "127.0.0.1"
        if cfg.metrics_port:
            self._start_metrics(metrics_host)
        try:
            self.pool = await db.connect_pool(cfg.database_url, cfg.db_pool_size)
        except StoreUnavailable as exc:
            raise StartError(f"cannot start: {scrub(str(exc), cfg)}") from None
        applied = await migrate.migrate(self.pool)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        # Quotas per workspace (ingest/store/quotas.py): the rates here, the hard
        # limits in the stores' transactions.
        quota_defaults, self.quotas = self._quotas(self.pool)
        on_quota = self.metrics.quota_exceeded.labels
        metadata = MetadataStore(
            self.pool,
            cfg.heartbeat_timeout_s,
            quota_defaults,
            lambda quota: on_quota(quota).inc(),
        )
        # Idle writers' progress expires after the retention (exactly once).
        sweeper = WriterSweeper(self.pool, cfg.writer_retention_s)
        sweeper.start()
        self._closers.append(sweeper.close)
        self.blobs = BlobStore(BlobSettings.from_config(cfg), self.metrics)
        await self.blobs.start()
        self._closers.append(self.blobs.close)
        # Unreferenced blobs deleted every blob_sweep_interval_s (one replica at a time).
        blob_sweeper = blob_sweep.BlobSweeper(
            self.pool,
            self.blobs,
            self.metrics,
            cfg.blob_sweep_interval_s,
            cfg.blob_sweep_grace_s,
        )
        blob_sweeper.start()
        self._closers.append(blob_sweeper.close)
        # Decoded numeric scalar blocks for reads; commits and compactions put
        # the blocks they store into it (write-through, on this loop).
        query_store = QueryStore(self.pool, cfg.read_cache_bytes)
        self.metrics.read_cache_bytes.set_function(lambda: query_store.cache.used)
        publish = (
            publisher(query_store.cache, asyncio.get_running_loop())
            if cfg.read_cache_write_through and cfg.read_cache_bytes > 0
            else None
        )
        # Numeric scalars: rows and small blocks into full blocks (migration 011).
        compactor = Compactor(self.pool, cfg.compact_interval_s, self.metrics, publish)
        compactor.start()
        self._closers.append(compactor.close)
        limits = Limits(
            max_labels=cfg.max_labels,
            max_text_value_chars=cfg.max_text_value_chars,
            max_table_columns=cfg.max_table_columns,
            max_table_rows=cfg.max_table_rows,
            max_evaluation_bytes=cfg.max_evaluation_bytes,
            max_histogram_bins=cfg.max_histogram_bins,
            max_image_bytes=cfg.max_image_bytes,
            max_image_decode_bytes=cfg.max_image_decode_bytes,
        )
        # The kinds other than scalars: a writer in the group commit (and a
        # check for tables' column types), a reader for queries.
        tables = tables_store.TableStore(self.pool, limits)
        histograms = histogram_store.HistogramStore(self.pool)
        images = artifacts_store.ImageStore(self.pool, self.blobs, cfg.max_message_bytes - 2**20)
        self.points = PointStore(
            cfg.max_series_per_run,
            quota_defaults,
            lambda quota: on_quota(quota).inc(),
            writers={
                KIND_TABLE: tables.write_tables,
                KIND_EVALUATION: tables.write_evaluations,
                KIND_IMAGE: images.write_images,
                KIND_HISTOGRAM: histograms.write_histograms,
            },
            checks={KIND_TABLE: tables.check_tables},
            publish=publish,
        )
        readers: dict[int, KindReader] = {
            KIND_TABLE: tables.read_tables,
            KIND_EVALUATION: tables.read_evaluations,
            KIND_IMAGE: images.read_images,
            KIND_HISTOGRAM: histograms.read_histograms,
        }
        self.queries = QueryServicer(
            query_store, readers, max_response_bytes=cfg.max_response_bytes
        )
        artifacts = artifacts_store.ArtifactStore(
            self.pool, quota_defaults, lambda quota: on_quota(quota).inc()
        )
        # Checks the runs, quota and touches a batch's image blobs, then stores
        # them, before queueing it (ingest/store/image_blobs.py).
        gate = image_blobs.BlobGate(self.pool, self.quotas)
        self.pipeline = Pipeline(
            CommitSessions(cfg.database_url, self.points),
            self.metrics,
            workers=cfg.pipeline_workers,
            queue_batches=cfg.queue_batches,
            group_points=cfg.group_commit_points,
            queue_bytes=cfg.queue_bytes,
            admission=image_blobs.BlobFirst(self.blobs, gate),
        )

        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            # gRPC turns SO_REUSEPORT on by default: a second service on the same
            # port would silently get half the connections. Only processes that
            # all ask for it (one `dev --processes N`) share a port.
            ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_connection_age_ms", cfg.max_connection_age_s * 1000),
            ("grpc.max_connection_age_grace_ms", int(cfg.shutdown_grace_s * 1000)),
        ]
        # Outer to inner: metrics (denied calls counted too); auth=token: the
        # token, role and workspace (ingest/api/auth.py) before anything reads a
        # request; RequestGuard: malformed requests and bad strings -> INVALID_ARGUMENT.
        token_store = TokenStore(self.pool, cfg.token_pepper)
        verifier = TokenVerifier(token_store, ttl_s=cfg.auth_cache_ttl_s)
        self._closers.append(verifier.close)
        audit = Audit(self.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if cfg.auth == "token":
            interceptors.append(AuthInterceptor(verifier, audit))
        interceptors.append(RequestGuard())
        server = grpc.aio.server(options=options, interceptors=interceptors)
        token_service_pb2_grpc.add_TokenServiceServicer_to_server(
            TokenServicer(token_store, verifier, audit), server
        )
        experiment_service_pb2_grpc.add_ExperimentServiceServicer_to_server(
            ExperimentServicer(metadata), server
        )
        # Early termination of sweeps: evaluated after each commit of a
        # child's points (ingest/write/sweeps.py).
        sweep_store = SweepStore(self.pool)
        evaluator = EarlyTermination(
            sweep_store, max_curve_bytes=cfg.sweep_curve_bytes, metrics=self.metrics
        )
        await evaluator.start()
        self._closers.append(evaluator.close)
        self.pipeline.on_committed = evaluator.committed
        run_service_pb2_grpc.add_RunServiceServicer_to_server(
            SweepRunServicer(metadata, sweep_store, evaluator), server
        )
        # Registered raw: large requests are parsed off the event loop.
        ingest_servicer.add_to_server(
            ingest_servicer.IngestServicer(
                self.pipeline,
                limits,
                self.metrics,
                stream_bytes=cfg.stream_inflight_bytes,
                inflight_bytes=cfg.service_inflight_bytes,
                wait_s=cfg.backpressure_timeout_s,
                decode_threads=cfg.decode_threads,
                quotas=self.quotas,
            ),
            server,
        )
        query_service_pb2_grpc.add_QueryServiceServicer_to_server(self.queries, server)
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(
            ArtifactServicer(artifacts, self.blobs, cfg.max_artifact_bytes, gate=gate), server
        )

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server
        )
        self.port = self._bind(server, binds, credentials)
        if cfg.health_port:
            await self._start_health_port(binds)
        await self.pipeline.start()
        await server.start()
        self.server = server
        if cfg.metrics_port:
            progress.install(
                self.metrics.registry,
                self.pool,
                asyncio.get_running_loop(),
                patterns=cfg.progress_series,
                max_series=cfg.progress_max_series,
                heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                metrics=self.metrics,
                run_names=cfg.progress_run_names,
                name_key=str(getattr(cfg, "token_pepper", "")).encode(),
            )
            shown = addresses.join_host_port(metrics_host, self.metrics_port)
            scheme = "https" if cfg.metrics_tls_cert else "http"
            guarded = " (basic auth)" if cfg.metrics_basic_auth else ""
            log.info("metrics on %s://%s/metrics%s", scheme, shown, guarded)
        # A pipeline worker that cannot reach the database turns health NOT_SERVING.
        self.pipeline.on_health = self._pipeline_health
        await self._pipeline_health(self.pipeline.healthy, self.pipeline.problem)
        security = "plaintext"
        if credentials is not None:
            security = "TLS, client certificates required" if cfg.tls_client_ca else "TLS"
        log.info("serving on %s (port %d, %s, auth=%s)", cfg.listen, self.port, security, cfg.auth)
        return self.port

    def _quotas(self, pool: asyncpg.Pool) -> tuple[quota_mod.Limits, quota_mod.Quotas]:
        """The quota settings, and the rate buckets reading overrides from pool."""
        cfg = self.config
        defaults = quota_mod.Limits(
            points_per_s=cfg.quota_points_per_s,
            bytes_per_s=cfg.quota_bytes_per_s,
            runs=cfg.quota_runs,
            series=cfg.quota_series,
            stored_bytes=cfg.quota_stored_bytes,
        )

        async def overrides(workspace: str) -> Any:
            async with db.acquire(pool) as conn:
                return await quota_mod.load_overrides(conn, workspace)

        counter = self.metrics.quota_exceeded
        return defaults, quota_mod.Quotas(
            defaults,
            replicas=cfg.quota_replicas,
            loader=overrides,
            on_exceeded=lambda quota: counter.labels(quota).inc(),
        )

    def _start_metrics(self, host: str) -> None:
        cfg = self.config
        port = cfg.metrics_port
        try:
            self._metrics_server = metrics_http.start(
                self.metrics.registry,
                host,
                port,
                certfile=cfg.metrics_tls_cert,
                keyfile=cfg.metrics_tls_key,
                basic_auth=cfg.metrics_basic_auth,
            )
        except ValueError as exc:
            raise StartError(f"cannot serve metrics: {exc}") from None
        except OSError as exc:
            where = addresses.join_host_port(host, port)
            raise StartError(
                f"cannot serve metrics on {where}: {exc.strerror or exc}; choose another "
                "--metrics-port / STEPLOG_METRICS_PORT (0 turns /metrics off)"
            ) from None
        self.metrics_port = self._metrics_server.port

    async def _start_health_port(self, binds: tuple[str, ...]) -> None:
        """grpc.health.v1 alone, in plaintext, on --health-port (same hosts as
        the gRPC port): for probes that cannot speak TLS. It answers what the
        main health servicer says; nothing else is served there."""
        assert self.health is not None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for address in binds:
            host = addresses.split_host_port(address)[0]
            target = addresses.join_host_port(host, self.config.health_port)
            try:
                got = server.add_insecure_port(target)
            except RuntimeError:
                got = 0
            if got == 0:
                raise StartError(
                    f"cannot serve health checks on {target}: the port is in use or not "
                    "available; choose another --health-port / STEPLOG_HEALTH_PORT"
                )
        await server.start()
        self._health_server = server

    def _bind(
        self,
        server: grpc.aio.Server,
        binds: tuple[str, ...],
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        """Bind every address on one port (port 0: the port the first bind got),
        with TLS when there are credentials."""
        port = 0
        for address in binds:
            host, wanted = addresses.split_host_port(address)
            target = addresses.join_host_port(host, port or wanted) if host else address
            try:
                if credentials is None:
                    got = server.add_insecure_port(target)
                else:
                    got = server.add_secure_port(target, credentials)
            except RuntimeError:
                got = 0
            if got == 0:
                raise StartError(
                    f"cannot listen on {target}: the address is in use or not available here"
                )
            port = port or got
        return port

    async def _pipeline_health(self, healthy: bool, problem: str) -> None:
        if self.health is None:
            return
        status = health_pb2.HealthCheckResponse.SERVING
        if not healthy:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.shutdown_grace_s if grace is None else grace
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.pipeline is not None:
            await self.pipeline.close(grace)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for closer in reversed(self._closers):
            await closer()
        if self.pool is not None:
            await self.pool.close()
        if self.server is not None:  # a start that failed has said why already
            log.info("stopped")


async def serve(config: Config, ready: Callable[[Service], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully.

    A start that fails raises StartError (one line); `ready` is called once serving.
    """
    service = Service(config)
    try:
        await service.start()
    except BaseException as exc:
        # Close what the failed start opened (pool, S3 session, /metrics), briefly.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(service.stop(0), 5)
        if isinstance(exc, SystemExit | KeyboardInterrupt | asyncio.CancelledError):
            raise
        reason = scrub(f"{type(exc).__name__}: {exc}", config)
        # where it failed, for a bug report; the frames only (the message may hold a secret)
        log.debug("start failed at:\n%s", "".join(traceback.format_tb(exc.__traceback__)))
        raise StartError(f"cannot start: {reason}") from exc
    if ready is not None:
        ready(service)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; shutting down")
    await service.stop()
