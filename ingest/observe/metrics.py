"""The service's Prometheus metrics, on an injected registry (tests build
their own). Names: steplog_<subsystem>_<name>_<unit>, counters end in _total.

Several service processes on one host do not share a registry: each process
exposes its own /metrics port (`steplog-ingest dev --processes N` gives
process i the port metrics_port + i) and Prometheus scrapes every one and sums
across `instance`. prometheus-client's multiprocess mode is not used: it needs
a shared directory that must be wiped between runs, and it cannot carry the
custom progress collector (ingest/observe/progress.py) or gauges like queue depth in
a meaningful way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# RPCs range from a sub-millisecond health check to an ingest stream open for
# a whole training run; one set of buckets has to cover both.
_RPC_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    *(60, 300, 1800, 3600, 21600),
)

# Kinds of S3 failure: a small fixed set, so a label never grows with error text.
S3_ERROR_KINDS = ("timeout", "unavailable", "not_found", "client", "server", "other")
# Early-termination policies (ingest/core/early_termination.py PolicyKind).
POLICY_KINDS = ("bandit", "median_stopping", "truncation_selection")


class Metrics:
    """Every metric the service exports, created on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            # The default registry has these; an injected one must ask for them.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.build = Info("steplog_build", "The running steplog version.", registry=r)
        self.build.info({"version": _version()})

        # -- ingest --------------------------------------------------------------------
        self.points = Counter(
            "steplog_ingest_points_total",
            "Points received, by kind and outcome (accepted, duplicate, rejected).",
            ["kind", "outcome"],
            registry=r,
        )
        self.batches = Counter(
            "steplog_ingest_batches_total",
            "Batches received, by outcome (committed, duplicate, refused, cancelled, error).",
            ["outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "steplog_ingest_rejected_points_total",
            "Points rejected, by reason.",
            ["reason"],
            registry=r,
        )
        self.commit_seconds = Histogram(
            "steplog_ingest_commit_duration_seconds",
            "Time to commit one group of batches to the database.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_batches = Histogram(
            "steplog_ingest_commit_batches",
            "Batches per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.lag_seconds = Histogram(
            "steplog_ingest_lag_seconds",
            "End-to-end lag: client batch time to commit.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.queue_batches = Gauge(
            "steplog_ingest_queue_batches",
            "Batches waiting in the write pipeline.",
            registry=r,
        )
        self.queue_bytes = Gauge(
            "steplog_ingest_queue_bytes",
            "Bytes of batches in the write pipeline (received, not yet committed).",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "steplog_ingest_inflight_bytes",
            "Bytes of batches received and not yet acknowledged, across streams and calls.",
            registry=r,
        )
        self.shed = Counter(
            "steplog_ingest_shed_total",
            "Requests answered RESOURCE_EXHAUSTED because a memory bound stayed full, by bound.",
            ["bound"],
            registry=r,
        )
        self.pipeline_healthy = Gauge(
            "steplog_ingest_pipeline_healthy",
            "1 while every write pipeline worker has a database connection, else 0.",
            registry=r,
        )
        self.pipeline_restarts = Counter(
            "steplog_ingest_pipeline_restarts_total",
            "Write pipeline workers restarted after an unexpected failure.",
            registry=r,
        )
        self.active_streams = Gauge(
            "steplog_ingest_active_streams",
            "Open ingest streams.",
            registry=r,
        )
        self.active_writers = Gauge(
            "steplog_ingest_active_writers",
            "Distinct writers with an open stream.",
            registry=r,
        )

        # -- quotas and the blob sweep (ingest/store/quotas.py, ingest/store/blob_sweep.py) ---
        self.quota_exceeded = Counter(
            "steplog_quota_exceeded_total",
            "Requests or points refused because a workspace quota was spent, by quota "
            "(points_per_s, bytes_per_s: a request answered RESOURCE_EXHAUSTED with RetryInfo; "
            "runs, series, stored_bytes: a run, series, image batch or file refused).",
            ["quota"],
            registry=r,
        )
        for quota in ("points_per_s", "bytes_per_s", "runs", "series", "stored_bytes"):
            self.quota_exceeded.labels(quota)
        self.blob_sweeps = Counter(
            "steplog_blob_sweep_runs_total",
            "Sweeps of unreferenced blobs, by outcome (done; skipped: another process "
            "was sweeping; failed).",
            ["outcome"],
            registry=r,
        )
        self.blob_sweep_deleted = Counter(
            "steplog_blob_sweep_deleted_total",
            "Blobs deleted by the sweep (no row referenced them for the grace period).",
            registry=r,
        )
        self.blob_sweep_deleted_bytes = Counter(
            "steplog_blob_sweep_deleted_bytes_total",
            "Bytes of the blobs deleted by the sweep.",
            registry=r,
        )
        self.compaction_rounds = Counter(
            "steplog_compaction_rounds_total",
            "Rounds of the numeric scalars' compaction (rows and small blocks into "
            "full blocks), by outcome (done, failed).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("done", "failed"):
            self.compaction_rounds.labels(outcome)
        self.compaction_points = Counter(
            "steplog_compaction_points_total",
            "Numeric scalar points moved into full blocks by compaction, by what they "
            "were before (row, block).",
            ["source"],
            registry=r,
        )
        for source in ("row", "block"):
            self.compaction_points.labels(source)
        self.compaction_blocks = Counter(
            "steplog_compaction_blocks_written_total",
            "Blocks written by compaction.",
            registry=r,
        )
        self.compaction_skipped = Counter(
            "steplog_compaction_series_skipped_total",
            "Series compaction skipped for a round because a writer held them.",
            registry=r,
        )
        self.compaction_failed = Counter(
            "steplog_compaction_series_failed_total",
            "Series whose compaction transaction failed (left as they were; the round "
            "went on with the others).",
            registry=r,
        )
        self.read_cache_bytes = Gauge(
            "steplog_query_block_cache_bytes",
            "Bytes of decoded numeric scalar blocks the query service holds for later "
            "reads (at most STEPLOG_READ_CACHE_BYTES).",
            registry=r,
        )

        # -- stores --------------------------------------------------------------------
        self.db_seconds = Histogram(
            "steplog_db_operation_duration_seconds",
            "Database operation latency, by operation.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_errors = Counter(
            "steplog_db_errors_total",
            "Database errors, by operation and kind (unavailable, retry, other).",
            ["operation", "kind"],
            registry=r,
        )
        self.s3_seconds = Histogram(
            "steplog_s3_operation_duration_seconds",
            "S3 call latency, by operation (put_object, upload_part, get_object, ...); "
            "failed calls included.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.s3_errors = Counter(
            "steplog_s3_errors_total",
            "S3 call errors, by operation and kind "
            "(timeout, unavailable, not_found, client, server, other).",
            ["operation", "kind"],
            registry=r,
        )

        # -- gRPC (ingest/api/interceptors.py) ----------------------------------------------
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpc_started = Counter(
            "steplog_grpc_server_started_total",
            "RPCs started on the server.",
            rpc,
            registry=r,
        )
        self.rpc_handled = Counter(
            "steplog_grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*rpc, "grpc_code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "steplog_grpc_server_handling_seconds",
            "Time from the handler's start to its end; a stream's whole lifetime.",
            rpc,
            buckets=_RPC_BUCKETS,
            registry=r,
        )

        # -- authentication (ingest/api/auth.py) --------------------------------------------
        self.auth_denied = Counter(
            "steplog_auth_denied_total",
            "Requests refused by authentication or authorization, by reason (missing,"
            " malformed, unknown_token, wrong_secret, expired, revoked, role, workspace,"
            " unlisted_method) and method (only methods the server implements).",
            ["reason", "method"],
            registry=r,
        )
        self.tokens_created = Counter(
            "steplog_tokens_created_total",
            "Tokens created through the TokenService of this process, by role"
            " (the CLI's are in the tokens table and its output).",
            ["role"],
            registry=r,
        )
        self.tokens_revoked = Counter(
            "steplog_tokens_revoked_total",
            "Tokens revoked through the TokenService of this process.",
            registry=r,
        )

        # -- the progress exporter (ingest/observe/progress.py) ----------------------------------
        self.progress_refresh_seconds = Histogram(
            "steplog_progress_refresh_duration_seconds",
            "Time to read live run progress from the database.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.progress_refresh_errors = Counter(
            "steplog_progress_refresh_errors_total",
            "Progress reads that failed or outlived the scrape's wait (timeout), "
            "so a scrape served an older snapshot or none.",
            ["kind"],
            registry=r,
        )

        # -- early termination of sweeps (ingest/write/sweeps.py) ----------------------------
        self.sweep_evaluations = Counter(
            "steplog_early_termination_evaluations_total",
            "Child runs evaluated by their parent's early-termination policy (one per "
            "evaluation interval reached), by policy.",
            ["policy"],
            registry=r,
        )
        self.sweep_cancelled = Counter(
            "steplog_early_termination_cancelled_total",
            "Child runs moved to CancelRequested by their parent's early-termination policy, "
            "by policy.",
            ["policy"],
            registry=r,
        )
        self.sweep_skipped = Counter(
            "steplog_early_termination_skipped_total",
            "Evaluations not made because the children's curves of one parent alone exceed "
            "the cache bound (STEPLOG_SWEEP_CURVE_BYTES): that policy does not apply, by policy.",
            ["policy"],
            registry=r,
        )
        for policy in POLICY_KINDS:
            for counter in (self.sweep_evaluations, self.sweep_cancelled, self.sweep_skipped):
                counter.labels(policy)

    @contextmanager
    def s3_call(self, operation: str) -> Iterator[None]:
        """Time one S3 call and count its failure by kind. Around each call:
        `with metrics.s3_call("put_object"): await client.put_object(...)`."""
        started = perf_counter()
        try:
            yield
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.s3_errors.labels(operation, s3_error_kind(exc)).inc()
            raise
        finally:
            self.s3_seconds.labels(operation).observe(perf_counter() - started)


def s3_error_kind(exc: BaseException) -> str:
    """Map an aiobotocore/botocore exception to one of S3_ERROR_KINDS.

    By duck typing, so this module needs no botocore import: botocore's
    connection and timeout errors are not builtin OSErrors, but their class
    names say what they are; a ClientError carries the parsed S3 response."""
    names = [c.__name__ for c in type(exc).__mro__]
    if isinstance(exc, TimeoutError) or any("Timeout" in n for n in names):
        return "timeout"
    response: Any = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error") or {}
        code = str(error.get("Code", "")) if isinstance(error, Mapping) else ""
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode", 0) if isinstance(meta, Mapping) else 0
        if code in ("NoSuchKey", "NoSuchUpload", "NoSuchBucket", "NotFound", "404"):
            return "not_found"
        if (isinstance(status, int) and status >= 500) or code in (
            "InternalError",
            "ServiceUnavailable",
            "SlowDown",
            "503",
            "500",
        ):
            return "server"
        return "client"
    if isinstance(exc, OSError) or any("Connect" in n for n in names):
        return "unavailable"
    return "other"


def _version() -> str:
    try:
        return metadata.version("steplog")
    except metadata.PackageNotFoundError:
        return "unknown"
