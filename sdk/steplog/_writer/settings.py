"""How the background writer buffers, batches and retries: `WriterSettings`,
read from arguments, then STEPLOG_<FIELD> variables (steplog._settings), then
defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from steplog import _settings

OnFull = Literal["wait", "spool", "drop_oldest"]
StreamIO = Literal["loop", "threads"]


def default_spool_dir() -> Path:
    """Where spools go when no directory is given: $XDG_CACHE_HOME/steplog/spool."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "steplog" / "spool"


@dataclass(frozen=True)
class WriterSettings:
    """How the background writer buffers, batches and retries.

    `flush_interval`: seconds a point may wait before its batch is sent.
    `max_linger`: while an earlier batch of the stream is unacknowledged
    (the service is behind), seconds a batch that is due only by time (not
    full) may wait for that acknowledgement: it is cut when the ack arrives,
    or when its oldest point is `max(flush_interval, max_linger)` old, so a
    busy service gets fewer, larger batches; an idle stream (nothing in
    flight) still sends every flush_interval, and flush/close never wait
    for it. 0 turns it off (steplog._writer.lane, `Lane._lingers`).
    `spool_dir` (default_spool_dir() when None): the spool of on_full="spool"
    and offline, and where refused batches and what close() could not
    deliver go.
    `exit_timeout`: the close() timeout used at interpreter exit.
    `stream_io`: how the process's `Ingest` streams are carried: "loop" (one
    asyncio thread, `steplog-io`, for every stream of the process,
    steplog._writer.aio_streams) or "threads" (the sync gRPC API: two threads
    a stream). A forked child always uses "threads"."""

    # The memory bound: bytes of buffered and unacknowledged data in memory
    # (a numeric point 16-24 bytes, a text value its length + 56, a table,
    # image or evaluation its encoded size + 200).
    max_buffered_bytes: int = 256 * 1024 * 1024
    on_full: OnFull = "wait"
    spool_dir: Path | None = None
    offline: bool = False
    max_batch_points: int = 50_000
    # Above the service's default image limit (16 MiB), below its message limit (64 MiB).
    max_batch_bytes: int = 20 * 1024 * 1024
    flush_interval: float = 0.2
    max_linger: float = 6.0
    # The longest a log call waits for room (on_full wait or spool) before the
    # buffered data is spilled to the spool and the call returns.
    max_block_s: float = 0.5
    strict: bool = False
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    exit_timeout: float = 30.0
    stream_io: StreamIO = "loop"

    def __post_init__(self) -> None:
        if self.max_batch_points < 1:
            raise ValueError("max_batch_points must be at least 1")
        if self.max_buffered_bytes < 1024:
            raise ValueError("max_buffered_bytes must be at least 1024")
        if self.max_batch_bytes < 4 * 1024:
            raise ValueError("max_batch_bytes must be at least 4096")
        if self.stream_io not in get_args(StreamIO):
            raise ValueError(
                f"stream_io must be one of {get_args(StreamIO)}, not {self.stream_io!r}"
            )
        if self.on_full not in get_args(OnFull):
            raise ValueError(f"on_full must be one of {get_args(OnFull)}, not {self.on_full!r}")
        for name in (
            "flush_interval",
            "max_linger",
            "max_block_s",
            "backoff_initial",
            "backoff_max",
            "exit_timeout",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if self.spool_dir is not None and not isinstance(self.spool_dir, Path):
            object.__setattr__(self, "spool_dir", Path(self.spool_dir))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WriterSettings:
        """Arguments first, then STEPLOG_<FIELD> variables (STEPLOG_ON_FULL,
        STEPLOG_SPOOL_DIR, ...), then defaults. A bad value names its variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
                continue
            var = f"STEPLOG_{f.name.upper()}"
            raw = env.get(var)
            if raw is None:
                continue
            values[f.name] = _parse_setting(f.name, var, raw)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown writer settings: {sorted(unknown)}")
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"steplog writer settings: {exc}") from None

    def resolved_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else default_spool_dir()


def _parse_setting(name: str, var: str, raw: str) -> Any:
    """One STEPLOG_<FIELD> value, by the field's type (steplog._settings)."""
    default = WriterSettings.__dataclass_fields__[name].default
    if name == "spool_dir":
        return Path(raw.strip()).expanduser() if raw.strip() else None
    if name == "on_full":
        if raw.strip() not in get_args(OnFull):
            raise _settings.SettingError(var, raw, f"expected one of {', '.join(get_args(OnFull))}")
        return raw.strip()
    if name == "stream_io":
        if raw.strip() not in get_args(StreamIO):
            raise _settings.SettingError(
                var, raw, f"expected one of {', '.join(get_args(StreamIO))}"
            )
        return raw.strip()
    if isinstance(default, bool):
        return _settings.parse_flag(var, raw)
    if isinstance(default, int):
        return _settings.parse_int(var, raw)
    return _settings.parse_float(var, raw)
