"""The service's Prometheus metrics, on an injected registry (tests build
their own). Names: steplog_<subsystem>_<name>_<unit>, counters end in _total."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.points = Counter(
            "steplog_ingest_points_total",
            "Points received, by kind and outcome (accepted, duplicate, rejected).",
            ["kind", "outcome"],
            registry=r,
        )
        self.batches = Counter(
            "steplog_ingest_batches_total",
            "Batches received, by outcome (committed, duplicate, error).",
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
