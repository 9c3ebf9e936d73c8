"""LocalStack: both components of one stack root, started, stopped and removed together."""

from __future__ import annotations

import atexit
import re
import shutil
from pathlib import Path

from ingest.devstack.postgres import DATABASE, Postgres
from ingest.devstack.seaweed import SeaweedS3
from ingest.devstack.state import PG_OUTSIDE_BASE, S3_REGION, StackError, StackInfo, StackState

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class LocalStack:
    """A private PostgreSQL+TimescaleDB cluster and a SeaweedFS S3 server under `root`.

    Ports given as None are chosen free once and kept in root/stack.json, so a
    later start() on the same root adopts the running stack or restarts it on
    the same ports (services still pointing at them reconnect). Only after a
    stop() may a port that someone else took meanwhile be replaced.
    """

    def __init__(
        self,
        root: Path,
        pg_port: int | None = None,
        s3_port: int | None = None,
        bucket: str = "steplog",
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}")
        self.root = Path(root).expanduser().resolve()
        self.bucket = bucket
        explicit = {k: v for k, v in (("postgres", pg_port), ("s3.port", s3_port)) if v}
        self.state = StackState(self.root, bucket, explicit)
        self.postgres = Postgres(self.state)
        self.s3 = SeaweedS3(self.state)

    # -- where things are ---------------------------------------------------------------
    @property
    def port_wait_s(self) -> float:
        """How long a start waits for a recorded port to become free before it fails."""
        return self.state.port_wait_s

    @port_wait_s.setter
    def port_wait_s(self, value: float) -> None:
        self.state.port_wait_s = value

    def port(self, name: str) -> int:
        """A recorded port: "postgres", "s3.port", or another of seaweed.WEED_PORTS."""
        return self.state.port(name)

    @property
    def pg_dir(self) -> Path:
        return self.state.pg_dir

    @property
    def pg_data(self) -> Path:
        return self.postgres.data_dir

    @property
    def pg_log(self) -> Path:
        return self.postgres.log

    @property
    def s3_dir(self) -> Path:
        return self.state.s3_dir

    @property
    def sock_dir(self) -> Path:
        return self.state.sock_dir

    def database_url(self, name: str = DATABASE) -> str:
        return self.postgres.database_url(name)

    def info(self) -> StackInfo:
        """Connection details from the saved state, whether or not the stack runs."""
        st = self.state.data
        if not {"postgres", "s3.port"} <= self.state.ports.keys():
            raise StackError(f"no stack has been started under {self.root}")
        return StackInfo(
            database_url=self.database_url(),
            s3_endpoint=self.s3.endpoint,
            s3_bucket=self.bucket,
            s3_access_key=st["access_key"],
            s3_secret_key=st["secret_key"],
            s3_region=S3_REGION,
        )

    # -- the whole stack -----------------------------------------------------------------
    def start(self, detach: bool = True, timeout: float = 90.0) -> StackInfo:
        """Start both components, or adopt them if they already run and answer.

        With detach=False they are stopped when this interpreter exits.
        """
        with self.state.lock():
            self.postgres.start(timeout)
            self.s3.start(timeout)
            if self.state.data.pop("stopped", None) is not None:
                self.state.save()
        if not detach:
            atexit.register(self.stop)
        return self.info()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop both components. A stack stopped this way may get new ports at its
        next start if its old ones were taken meanwhile (nothing points at them)."""
        if not self.root.exists():
            return
        with self.state.lock():
            self.s3.stop(timeout)
            self.postgres.stop(timeout)
            if self.state.ports:
                self.state.data["stopped"] = True
                self.state.save()

    def revive(self, timeout: float = 90.0) -> list[str]:
        """Start again, on their own ports, the components that died; their names.

        For a supervisor (`dev`): a stack stopped on purpose is not revived
        (StackError says so).
        """
        with self.state.lock():
            if self.state.data.get("stopped"):
                raise StackError(f"the stack under {self.root} was stopped")
            revived = []
            if self.postgres.pid() is None:
                self.postgres.start(timeout)
                revived.append("PostgreSQL")
            if self.s3.pid() is None:
                self.s3.start(timeout)
                revived.append("SeaweedFS")
            return revived

    def remove(self, timeout: float = 30.0) -> None:
        """Stop the stack and delete its data, including a cluster kept outside root."""
        if not self.root.exists():
            return
        with self.state.lock():
            self.stop(timeout)
            outside = self.state.data.get("pg_dir")
            if outside and Path(outside).parent == PG_OUTSIDE_BASE:
                shutil.rmtree(outside, ignore_errors=True)
            # only this stack's own entries: a root may hold other stacks (test-stack, bench)
            for name in ("pg", "s3", "run", "stack.json", "stack.json.tmp"):
                child = self.root / name
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def status(self) -> dict[str, bool]:
        return {
            "postgres": self.postgres.pid() is not None and self.postgres.ready(),
            "s3": self.s3.pid() is not None and self.s3.bucket_request("HEAD") == 200,
        }

    # -- one component (tests, fault injection) ------------------------------------------
    def start_postgres(self, timeout: float = 90.0) -> None:
        self.postgres.start(timeout)

    def stop_postgres(self, timeout: float = 30.0) -> None:
        self.postgres.stop(timeout)

    def restart_postgres(self, timeout: float = 90.0) -> None:
        """Stop and start again on the same port and data (fault-injection tests)."""
        with self.state.lock():
            self.postgres.stop()
            self.postgres.start(timeout)

    def start_s3(self, timeout: float = 90.0) -> None:
        self.s3.start(timeout)

    def stop_s3(self, timeout: float = 30.0) -> None:
        self.s3.stop(timeout)

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self.postgres.psql(sql, database)

    def create_database(self, name: str) -> str:
        return self.postgres.create_database(name)

    def drop_database(self, name: str) -> None:
        self.postgres.drop_database(name)

    def reset_database(self) -> str:
        """Drop and recreate database `steplog` with TimescaleDB; returns its URL."""
        return self.postgres.create_database(DATABASE)
