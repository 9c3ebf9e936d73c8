"""`steplog-ingest ui` settings: its own --listen (STEPLOG_UI_LISTEN), and the
settings it shares with `serve` (database, auth, S3, bounds): the same flags
and STEPLOG_* variables, parsed by ingest.config (flag, then environment,
then default)."""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ingest import addresses
from ingest import config as config_mod

DEFAULT_LISTEN = "127.0.0.1:8765"
# The settings `ui` shares with `serve` (same flags, same STEPLOG_* variables).
SHARED = (
    "database_url",
    "db_pool_size",
    "auth",
    "token_pepper",
    "auth_cache_ttl_s",
    "allow_unauthenticated_non_loopback",
    "heartbeat_timeout_s",
    "max_response_bytes",
    "s3_endpoint",
    "s3_bucket",
    "s3_access_key",
    "s3_secret_key",
    "s3_region",
)


@dataclass(frozen=True)
class UiConfig:
    listen: str
    service: config_mod.Config
    link_key: bytes
    # Memory for the chart block cache (ingest/store/views.py BlockCache); 0 turns it off.
    cache_bytes: int = 256 * 1024 * 1024
    # Where the block cache keeps its files (as many bytes again), so a restarted
    # UI process answers from them; None: memory only.
    cache_dir: Path | None = None


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/steplog/ui, else ~/.cache/steplog/ui."""
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "steplog" / "ui"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=None,
        help=f"HTTP address HOST:PORT (env STEPLOG_UI_LISTEN, default {DEFAULT_LISTEN})",
    )
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    for name in SHARED:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"as for serve (env STEPLOG_{name.upper()})",
        )


def from_sources(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> UiConfig:
    env = os.environ if env is None else env
    shared = argparse.Namespace(**{k: getattr(ns, k, None) for k in SHARED})
    service = config_mod.from_sources(shared, env)
    listen = ns.listen or env.get("STEPLOG_UI_LISTEN") or DEFAULT_LISTEN
    try:
        host, _ = addresses.split_host_port(listen)
    except addresses.AddressError as exc:
        raise config_mod.ConfigError(f"--listen {listen!r}: {exc}") from None
    if not host:
        raise config_mod.ConfigError(f"--listen {listen!r}: must be HOST:PORT")
    key = env.get("STEPLOG_UI_LINK_KEY", "")
    raw = env.get("STEPLOG_UI_CACHE_BYTES", "")
    try:
        cache = int(raw) if raw else UiConfig.cache_bytes
        if cache < 0:
            raise ValueError
    except ValueError:
        raise config_mod.ConfigError(
            f"STEPLOG_UI_CACHE_BYTES={raw!r}: must be a number of bytes >= 0"
        ) from None
    raw_dir = env.get("STEPLOG_UI_CACHE_DIR")
    if raw_dir is None:
        cache_dir: Path | None = default_cache_dir(env)
    elif raw_dir.strip().lower() in ("", "off", "none"):
        cache_dir = None
    else:
        cache_dir = Path(raw_dir).expanduser()
    return UiConfig(
        listen, service, key.encode() if key else secrets.token_bytes(32), cache, cache_dir
    )
