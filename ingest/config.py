"""Service configuration: parsed once into a frozen dataclass.

Precedence: command-line flag, then environment variable, then default. A bad
value raises ConfigError naming the variable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from ingest.addresses import split_host_port

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/steplog"
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_bucket: str = "steplog"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    listen: str = "127.0.0.1:50051"
    metrics_port: int = 9464
    # SO_REUSEPORT on the gRPC port: only processes that all ask for it share
    # it. `dev --processes N` sets it for its own N processes; off, a port that
    # is taken stops the service with a clear reason.
    reuse_port: bool = False
    # Writers: one database connection each; a writer's batches always go to one.
    pipeline_workers: int = 2
    # Batches waiting for a commit, across workers; a full queue stops stream reads.
    # Room for several batches of each of a few hundred streams (their bytes
    # are bounded by queue_bytes), so a group commit merges a writer's
    # consecutive batches into one block per series (issue 13, W2: with 256,
    # 200 streams left about one batch each in a group).
    queue_batches: int = 4096
    # Bytes of batches waiting for a commit, across workers (counted as they
    # sit in memory, decoded); a full queue stops stream reads.
    queue_bytes: int = 256 * 1024 * 1024
    # Bytes received and not yet acknowledged (committed or not), per stream
    # and for the whole service; over a bound a stream is not read.
    stream_inflight_bytes: int = 64 * 1024 * 1024
    service_inflight_bytes: int = 512 * 1024 * 1024
    # How long a request waits for room under those bounds before it is shed
    # (RESOURCE_EXHAUSTED with RetryInfo).
    backpressure_timeout_s: float = 30.0
    # Threads that decode and validate large messages off the event loop.
    decode_threads: int = 2
    # Points gathered into one transaction at most (about 30 MB decoded).
    group_commit_points: int = 1_000_000
    max_message_bytes: int = 64 * 1024 * 1024
    # Connections are closed (gracefully) after this long, so clients spread
    # over replicas added later; they reconnect and resend what is unacknowledged.
    max_connection_age_s: int = 1800
    db_pool_size: int = 8
    heartbeat_timeout_s: float = 300.0
    shutdown_grace_s: float = 10.0
    # Limits on client input.
    max_series_per_run: int = 100_000
    max_text_value_chars: int = 4096
    max_labels: int = 16
    max_table_columns: int = 1000
    max_table_rows: int = 100_000
    max_evaluation_bytes: int = 16 * 1024 * 1024
    # Bins of one histogram point (16 bytes each).
    max_histogram_bins: int = 10_000
    # Images travel inline in ingest batches; files by the chunked ArtifactService.
    max_image_bytes: int = 16 * 1024 * 1024
    # Pixel bytes the images of one request may decode to, all together (the
    # headers say it before anything is decoded; decoding costs CPU in
    # proportion): the images past it are rejected LIMIT_EXCEEDED, the rest kept.
    max_image_decode_bytes: int = 1024 * 1024 * 1024
    max_artifact_bytes: int = 1024**4
    # Every query response at most this many bytes (a page holds at least one
    # point, so one larger point comes alone); the rest continues on the next page.
    max_response_bytes: int = 4 * 1024 * 1024
    # Decoded numeric scalar blocks the query service keeps for the next read
    # (ingest/store/columns.py BlockCache; 0: none).
    read_cache_bytes: int = 256 * 1024 * 1024
    # The blocks a commit or a compaction stores go into that cache too, once
    # committed (write-through): the first chart of a live run is read from it.
    read_cache_write_through: bool = True
    # Early termination: the children's curves cached per parent, all parents
    # together; a parent whose children's curves alone exceed it is not evaluated.
    sweep_curve_bytes: int = 64 * 1024 * 1024
    # S3: multipart part size (>= 5 MiB), and requests in flight for the service.
    s3_part_bytes: int = 16 * 1024 * 1024
    s3_concurrency: int = 64
    # Running without authentication is only allowed on loopback addresses,
    # unless this explicit opt-in says the network itself keeps strangers out
    # (a container or pod network behind a firewall or NetworkPolicy).
    auth: str = "none"
    allow_unauthenticated_non_loopback: bool = False
    # auth=token: the secret part of a token is stored as HMAC-SHA256(pepper,
    # secret) (empty: plain SHA-256). Changing it invalidates every token.
    token_pepper: str = ""
    # Seconds a verified token is trusted from memory: a revoke takes effect
    # within this long on every replica.
    auth_cache_ttl_s: float = 15.0
    # Live progress on /metrics: scalar series names to export (globs), and a
    # cap on exported series (and runs); 0 turns the progress export off.
    progress_series: tuple[str, ...] = ("loss*", "*loss", "accuracy*", "lr")
    progress_max_series: int = 1000
    # Off: the progress export carries no run or experiment names (the
    # run_id/experiment labels hold a short keyed hash instead).
    progress_run_names: bool = True
    # TLS on the gRPC port (PEM files; both or neither). With a client CA,
    # every client must present a certificate it signed (mutual TLS).
    # Certificates are re-read when the files change (new connections).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # A plaintext port serving only grpc.health.v1 (same host as listen),
    # for probes that cannot speak TLS (Kubernetes gRPC probes); 0 = none.
    health_port: int = 0
    # /metrics over HTTPS (PEM files; both or neither), and HTTP basic auth:
    # "user:HASH" (HASH sha256:<hex> or pbkdf2_sha256$<iterations>$<salt>$<hex>)
    # or the path of a file holding such lines.
    metrics_tls_cert: str = ""
    metrics_tls_key: str = ""
    metrics_basic_auth: str = ""
    # Exactly once: a writer's progress (its high-water mark and the outcomes
    # of its last batches) is kept this long after its last batch. Must be
    # longer than any client keeps batches to resend (its spool and the
    # `steplog sync` of it): a batch that arrives after its writer expired is
    # taken as new (stored again) or refused as a gap.
    writer_retention_s: float = 30 * 86400.0
    # Quotas per workspace (ingest/store/quotas.py), 0 = unlimited; overridden per
    # workspace by `steplog-ingest quota set`. The rates are per process:
    # each of `quota_replicas` processes allows quota / quota_replicas.
    quota_points_per_s: int = 0
    quota_bytes_per_s: int = 0
    quota_runs: int = 0
    quota_series: int = 0
    quota_stored_bytes: int = 0
    quota_replicas: int = 1
    # The sweep of unreferenced blobs (ingest/store/blob_sweep.py): every this many
    # seconds (0 = off), deleting blobs no row references and no writer
    # touched for the grace period (longer than any upload or batch takes).
    blob_sweep_interval_s: float = 0.0
    blob_sweep_grace_s: float = 86400.0
    # Compaction of numeric scalars (ingest/store/compact.py): every this many
    # seconds (0 = off), rows and small blocks become full blocks.
    compact_interval_s: float = 10.0


@dataclass(frozen=True)
class _Option:
    name: str
    env: str
    parse: Callable[[str], Any]
    help: str


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0..65535; 0 disables)")
    return value


def _listen(text: str) -> str:
    host, _ = split_host_port(text)  # AddressError is a ValueError
    if not host:
        raise ValueError("must be HOST:PORT (for every interface say 0.0.0.0 or [::])")
    return text


def _part_bytes(text: str) -> int:
    value = int(text)
    if value < 5 * 1024 * 1024:
        raise ValueError("must be at least 5 MiB (5242880), S3's smallest part")
    return value


def _at_least(text: str, low: int) -> int:
    value = int(text)
    if value < low:
        raise ValueError(f"must be at least {low}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number >= 0")
    return value


def _globs(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise ValueError("must be comma-separated name patterns, for example 'loss*,lr'")
    for p in patterns:
        if len(p) > 255 or any(ord(c) < 32 for c in p):
            raise ValueError(
                f"bad pattern {p[:40]!r}: at most 255 characters, no control characters"
            )
    return patterns


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false (also 1/0, yes/no, on/off)")


def _auth(text: str) -> str:
    if text not in ("none", "token"):
        raise ValueError("must be 'none' or 'token'")
    return text


_HELP = {
    "database_url": "PostgreSQL/TimescaleDB URL",
    "s3_endpoint": "S3-compatible endpoint URL",
    "s3_bucket": "bucket for images and files",
    "s3_access_key": "S3 access key",
    "s3_secret_key": "S3 secret key",
    "s3_region": "S3 region",
    "listen": "gRPC listen address HOST:PORT",
    "metrics_port": "Prometheus /metrics HTTP port (0 disables)",
    "reuse_port": "share the gRPC port with other processes that set it too (SO_REUSEPORT)",
    "pipeline_workers": "write pipeline workers (one DB connection each)",
    "queue_batches": "batches queued for commit before streams stop being read",
    "queue_bytes": "bytes of decoded batches queued for commit before streams stop being read",
    "stream_inflight_bytes": "bytes one stream may have received and not yet acknowledged",
    "service_inflight_bytes": (
        "bytes all streams and calls together may have received and not yet acknowledged"
    ),
    "backpressure_timeout_s": (
        "seconds a request waits for room under a memory bound before RESOURCE_EXHAUSTED"
    ),
    "decode_threads": "threads that decode and validate large messages off the event loop",
    "group_commit_points": "most points in one transaction",
    "max_message_bytes": "largest gRPC message accepted",
    "max_connection_age_s": "seconds before a client connection is recycled (spreads load)",
    "db_pool_size": "database connections for metadata and queries",
    "heartbeat_timeout_s": "seconds of silence before a Running run reads as NotResponding",
    "shutdown_grace_s": "seconds in-flight RPCs get on SIGTERM",
    "max_series_per_run": "most series in one run",
    "max_text_value_chars": "longest string metric value",
    "max_labels": "most labels on a series",
    "max_table_columns": "most columns of a table series (and in one request)",
    "max_table_rows": "most rows of one table series in one request",
    "max_evaluation_bytes": "largest evaluation document (JSON bytes)",
    "max_histogram_bins": "most bins of one histogram point (16 bytes each)",
    "max_image_bytes": "largest image point (bytes)",
    "max_image_decode_bytes": (
        "pixel bytes the images of one request may decode to, all together;"
        " the images past it are rejected LIMIT_EXCEEDED"
    ),
    "max_artifact_bytes": "largest file a run can upload (bytes)",
    "max_response_bytes": "largest query response (bytes, at least 65536); the rest is paged",
    "read_cache_bytes": (
        "bytes of decoded numeric scalar blocks the query service caches for later reads (0: none)"
    ),
    "read_cache_write_through": (
        "put the numeric scalar blocks each commit and compaction stores into that cache"
        " (the first read of a live run's chart is served from it)"
    ),
    "sweep_curve_bytes": (
        "bytes of child curves early termination caches, all parents together;"
        " a parent whose children's curves exceed it is not evaluated"
    ),
    "s3_part_bytes": "S3 multipart part size for file uploads (at least 5 MiB)",
    "s3_concurrency": "S3 requests the service keeps in flight at most",
    "auth": "authentication mode: none (loopback development only) or token (bearer tokens)",
    "token_pepper": "secret key the token hashes are keyed with (HMAC-SHA256; empty: SHA-256)",
    "auth_cache_ttl_s": (
        "seconds a verified token is cached in memory (a revoke takes effect within this)"
    ),
    "allow_unauthenticated_non_loopback": (
        "allow auth=none on a non-loopback address such as 0.0.0.0 (containers);"
        " only where the network itself restricts who can connect"
    ),
    "progress_series": "scalar series exported as live progress: comma-separated globs (* and ?)",
    "progress_max_series": "most series (and runs) in the progress export; 0 turns it off",
    "progress_run_names": (
        "export run and experiment names in the progress export (false: a short keyed hash)"
    ),
    "tls_cert": "TLS certificate chain for the gRPC port (PEM file; with --tls-key)",
    "tls_key": "TLS private key for the gRPC port (PEM file; with --tls-cert)",
    "tls_client_ca": "CA bundle (PEM) that client certificates must chain to: mutual TLS",
    "health_port": (
        "plaintext port serving only grpc.health.v1 for probes that cannot speak TLS (0: none)"
    ),
    "metrics_tls_cert": "TLS certificate for /metrics (PEM file; with --metrics-tls-key)",
    "metrics_tls_key": "TLS private key for /metrics (PEM file; with --metrics-tls-cert)",
    "metrics_basic_auth": (
        "HTTP basic auth for /metrics: user:HASH (sha256:<hex> or pbkdf2_sha256$...), or a file"
    ),
    "writer_retention_s": (
        "seconds a writer's progress is kept after its last batch (exactly once);"
        " longer than any client spools and replays"
    ),
    "quota_points_per_s": "points per second a workspace may send (0: unlimited)",
    "quota_bytes_per_s": "request bytes per second a workspace may send (0: unlimited)",
    "quota_runs": "most runs a workspace may hold (0: unlimited)",
    "quota_series": "most series a workspace may hold (0: unlimited)",
    "quota_stored_bytes": "most image and file bytes a workspace may hold (0: unlimited)",
    "quota_replicas": "service processes sharing the rate quotas (each allows quota / this)",
    "blob_sweep_interval_s": "seconds between sweeps of unreferenced blobs (0: no sweep)",
    "blob_sweep_grace_s": (
        "seconds a blob stays after its last use before the sweep may delete it;"
        " longer than any upload or batch takes"
    ),
    "compact_interval_s": (
        "seconds between compaction rounds of numeric scalars (rows and small blocks"
        " into full blocks; 0: never)"
    ),
}

_PARSERS: dict[str, Callable[[str], Any]] = {
    "listen": _listen,
    "metrics_port": _port,
    "auth": _auth,
    "allow_unauthenticated_non_loopback": _bool,
    "reuse_port": _bool,
    "progress_series": _globs,
    "progress_max_series": _non_negative_int,
    "progress_run_names": _bool,
    "health_port": _port,
    "s3_part_bytes": _part_bytes,
    "max_response_bytes": lambda text: _at_least(text, 65536),
    "read_cache_bytes": _non_negative_int,
    "read_cache_write_through": _bool,
    "quota_points_per_s": _non_negative_int,
    "quota_bytes_per_s": _non_negative_int,
    "quota_runs": _non_negative_int,
    "quota_series": _non_negative_int,
    "quota_stored_bytes": _non_negative_int,
    "blob_sweep_interval_s": lambda text: _non_negative_float(text),
    "compact_interval_s": lambda text: _non_negative_float(text),
}


def _options() -> list[_Option]:
    out = []
    for f in fields(Config):
        default = f.default
        parse: Callable[[str], Any]
        if f.name in _PARSERS:
            parse = _PARSERS[f.name]
        elif isinstance(default, int):
            parse = _positive_int
        elif isinstance(default, float):
            parse = _positive_float
        else:
            parse = str
        out.append(_Option(f.name, "STEPLOG_" + f.name.upper(), parse, _HELP[f.name]))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per setting; defaults stay None so the environment can fill in."""
    for opt in _options():
        parser.add_argument(
            "--" + opt.name.replace("_", "-"),
            dest=opt.name,
            default=None,
            help=f"{opt.help} (env {opt.env}, default {getattr(Config, opt.name)!r})",
        )


def setting(
    name: str,
    flag: Any = None,
    env: Mapping[str, str] | None = None,
    source: str | None = None,
) -> Any:
    """One setting by the service's rule (the flag, then its STEPLOG_*
    variable, then the default), parsed as `serve` parses it; ConfigError
    names the flag or variable of a bad value. For commands that read one or
    two settings (token, quota, healthcheck) the same way as the service."""
    env = os.environ if env is None else env
    for opt in _options():
        if opt.name == name:
            break
    else:
        raise KeyError(name)
    raw: str | None = None
    where = opt.env
    if flag is not None:
        raw, where = str(flag), source or "--" + opt.name.replace("_", "-")
    elif opt.env in env and env[opt.env] != "":
        raw = env[opt.env]
    if raw is None:
        return getattr(Config, name)
    try:
        return opt.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}={shown(opt.name, raw)!r}: {exc}") from None


def from_sources(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Flag, then environment, then default; keyword overrides win over all."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for opt in _options():
        flag = getattr(args, opt.name, None) if args is not None else None
        if flag is not None or (opt.env in env and env[opt.env] != ""):
            values[opt.name] = setting(opt.name, flag, env)
    values.update(overrides)
    return Config(**values)


# Settings never shown: by name, and the password parts of URL-valued settings.
_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "basic_auth")
_URL_FIELDS = ("database_url", "s3_endpoint")
# libpq connection parameters that hold a secret (in a URL's query or a key=value DSN)
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_KEYWORD_SECRET = re.compile(r"""(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)""", re.I)


def is_secret(name: str) -> bool:
    return any(word in name for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """A URL (or a libpq key=value DSN) with every password replaced by ***.

    The user name, hosts, database and other parameters stay, so the line
    still says where the service connects.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _KEYWORD_SECRET.sub(r"\1***", url)
    # The user info ends at the last '@': a password may hold '/', '?', '#' or
    # '@' unencoded (libpq would refuse it, but the line must not show it).
    userinfo, at, tail = rest.rpartition("@")
    head = ""
    if at:
        user, colon, _ = userinfo.partition(":")
        if any(c in user for c in "/?#="):
            return f"{scheme}://***"  # the '@' sits in a path or query value: show none of it
        head = f"{user}:***@" if colon else f"{user}@"
    try:
        parts = urlsplit(f"{scheme}://{tail}")
    except ValueError:
        return f"{scheme}://{head}***"  # unparseable: no more of it is shown
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs],
            safe="*",
            quote_via=quote,
        )
    query = f"?{query}" if query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{scheme}://{head}{parts.netloc}{parts.path}{query}{fragment}"


def shown(name: str, value: Any, secret: Sequence[str] = ()) -> str:
    """How a setting appears in a log line or an error message."""
    if (name in secret or is_secret(name)) and value:
        return "***"
    if name in _URL_FIELDS:
        return redact_url(str(value))
    return str(value)


def secrets_of(config: Config) -> list[str]:
    """The secret values in a configuration (passwords of URL settings, secret settings)."""
    found: list[str] = []
    for f in fields(config):
        value = str(getattr(config, f.name))
        if is_secret(f.name) and value:
            found.append(value)
        elif f.name in _URL_FIELDS and "://" in value:
            userinfo = value.partition("://")[2].rpartition("@")[0]
            found.append(userinfo.partition(":")[2])
            with contextlib.suppress(ValueError):
                query = urlsplit(value).query
                found += [v for k, v in parse_qsl(query) if k.lower() in _SECRET_PARAMS]
        elif f.name in _URL_FIELDS:
            found += [m.group(2).strip("'") for m in _KEYWORD_SECRET.finditer(value)]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, config: Config) -> str:
    """`text` (an error message, say) with every secret of `config` replaced by ***."""
    for secret in secrets_of(config):
        text = text.replace(secret, "***")
    return text


def describe(config: Config, secret: Sequence[str] = ("s3_secret_key",)) -> str:
    """One line for the startup log: every setting, no secret."""
    return " ".join(
        f"{f.name}={shown(f.name, getattr(config, f.name), secret)}" for f in fields(config)
    )
