"""A stack root's recorded state (root/stack.json): ports, credentials, where
the cluster lives; the lock that serialises starts and stops; the layout of
the folders both components share.

Ports are chosen free once and kept, so a later start on the same root
restarts the stack on the same ports (services still pointing at them
reconnect). Only after a deliberate stop may a port that someone else took
meanwhile be replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.devstack.processes import free_port, wait_bindable, write_private

# Where a cluster lives when its owner cannot reach the stack root (postgres.Postgres.relocate).
PG_OUTSIDE_BASE = Path("/var/lib/steplog")
S3_REGION = "us-east-1"


class StackError(RuntimeError):
    """A component of the local stack could not be started, reached or stopped."""


@dataclass(frozen=True)
class StackInfo:
    """How clients reach a running stack."""

    database_url: str
    s3_endpoint: str
    s3_bucket: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str

    def env(self) -> dict[str, str]:
        """The environment variables the service and the tests read."""
        return {
            "STEPLOG_DATABASE_URL": self.database_url,
            "STEPLOG_S3_ENDPOINT": self.s3_endpoint,
            "STEPLOG_S3_BUCKET": self.s3_bucket,
            "STEPLOG_S3_ACCESS_KEY": self.s3_access_key,
            "STEPLOG_S3_SECRET_KEY": self.s3_secret_key,
            "STEPLOG_S3_REGION": self.s3_region,
        }


def outside_dir(root: Path) -> Path:
    """The one place outside PG_OUTSIDE_BASE that belongs to the stack under `root`."""
    return PG_OUTSIDE_BASE / f"pg-{hashlib.sha256(bytes(root)).hexdigest()[:16]}"


class StackState:
    """root/stack.json in memory, reloaded under the lock; shared by the components."""

    # How long a start waits for a recorded port to become free before it fails.
    port_wait_s = 15.0

    def __init__(self, root: Path, bucket: str, explicit: Mapping[str, int]) -> None:
        self.root = root
        self.bucket = bucket
        self.explicit = dict(explicit)  # ports asked for by name
        self._lock_fd = -1
        self._lock_depth = 0
        self.data = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.root / "stack.json").read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault("ports", {})
        if data.get("pg_dir") and Path(data["pg_dir"]) != outside_dir(self.root):
            data.pop("pg_dir")  # recorded by a stack root this one was copied from
        data.setdefault("access_key", "steplog" + secrets.token_hex(6))
        data.setdefault("secret_key", secrets.token_urlsafe(30))
        data["bucket"] = self.bucket
        return data

    def save(self) -> None:
        write_private(self.root / "stack.json", json.dumps(self.data, indent=2))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise start/stop across processes (pytest-xdist workers) sharing one root.

        Re-entrant; the outermost holder reloads the state from disk."""
        if self._lock_depth == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self.data = self._load()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)

    # -- ports ------------------------------------------------------------------------
    @property
    def ports(self) -> dict[str, int]:
        ports: dict[str, int] = self.data["ports"]
        return ports

    def port(self, name: str) -> int:
        return int(self.ports[name])

    def assign_ports(self, names: tuple[str, ...], running: bool) -> None:
        """Fill in missing ports; keep recorded ones (re-picked only after a stop)."""
        ports = self.ports
        for name in names:
            # weed mini's maintenance worker dials admin.port + 10000, ignoring -admin.port.grpc
            if name == "admin.port.grpc":
                ports[name] = ports["admin.port"] + 10000
                continue
            offset = 10000 if name == "admin.port" else 0
            want = self.explicit.get(name)
            if running and want and ports.get(name) != want:
                raise StackError(
                    f"{name} already runs on {ports.get(name)}, not {want}: stop first"
                )
            if want:
                ports[name] = want
            elif name not in ports or ports[name] + offset > 65535:
                ports[name] = free_port(self._taken(name), offset)
            elif not running and not wait_bindable(
                {ports[name], ports[name] + offset}, self.port_wait_s
            ):
                if self.data.get("stopped"):
                    # stopped on purpose: nothing still points at the old port
                    ports[name] = free_port(self._taken(name), offset)
                else:
                    raise StackError(
                        f"port {ports[name]} of this stack's {name} is taken by another "
                        f"process; the stack keeps its ports (in {self.root / 'stack.json'}) "
                        "so that running services still find it after a restart: stop that "
                        f"process, or stop this stack (python -m ingest.devstack stop --root "
                        f"{self.root}) so that its next start picks free ports"
                    )
        self.save()

    def _taken(self, name: str) -> set[int]:
        return {int(v) for k, v in self.ports.items() if k != name}

    # -- the folders --------------------------------------------------------------------
    @property
    def pg_dir(self) -> Path:
        """root/pg, or the place outside root PostgreSQL's user can reach."""
        recorded = self.data.get("pg_dir")
        return Path(recorded) if recorded else self.root / "pg"

    @property
    def s3_dir(self) -> Path:
        return self.root / "s3"

    @property
    def sock_dir(self) -> Path:
        """Unix sockets live under root unless the path exceeds sun_path (108); then in /tmp.

        With the cluster kept outside root, beside it (PostgreSQL writes its socket there).
        """
        if self.data.get("pg_dir"):
            return self.pg_dir / "run"
        if len(str(self.root / "run/.s.PGSQL.65535.lock")) < 107:
            return self.root / "run"
        return Path("/tmp") / f"steplog-{hashlib.sha256(bytes(self.root)).hexdigest()[:12]}"
