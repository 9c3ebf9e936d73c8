"""The stack's PostgreSQL with TimescaleDB: one private cluster under the stack
root (or outside it when run as root: see Postgres.relocate), started with
pg_ctl on the stack's recorded port, its tools run as the cluster's owner.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ingest.devstack.processes import env_without, pid_alive, tail, terminate
from ingest.devstack.state import PG_OUTSIDE_BASE, StackError, StackState, outside_dir

DATABASE = "steplog"
PG_SUPERUSER = "postgres"
PG_CONF = """\
# written by ingest.devstack at every start
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sock_dir}'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
timescaledb.max_background_workers = 4
max_worker_processes = 16
max_connections = 200
shared_buffers = 256MB
# durability is a feature: an acknowledged point is on disk
fsync = on
synchronous_commit = on
full_page_writes = on
wal_compression = on
wal_buffers = 16MB
min_wal_size = 256MB
max_wal_size = 2GB
checkpoint_timeout = 15min
checkpoint_completion_target = 0.9
log_line_prefix = '%m [%p] %q%u@%d '
log_min_duration_statement = 5s
"""
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@functools.cache
def find_pg_bindir() -> Path:
    """Server binaries: $STEPLOG_PG_BINDIR, `pg_config --bindir`, newest /usr/lib/postgresql."""
    found = [os.environ.get("STEPLOG_PG_BINDIR", "")]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        found.append(run.stdout.strip())
    versions = [str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")]
    found += sorted(versions, key=lambda p: [int(x) for x in re.findall(r"\d+", p)], reverse=True)
    for bindir in map(Path, filter(None, found)):
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise StackError(
        "no PostgreSQL server found: install postgresql-15 and TimescaleDB "
        "(deploy/local/install-timescaledb.sh) or set STEPLOG_PG_BINDIR"
    )


class Postgres:
    """The cluster of one stack root."""

    def __init__(self, state: StackState) -> None:
        self.state = state

    @property
    def data_dir(self) -> Path:
        return self.state.pg_dir / "data"

    @property
    def log(self) -> Path:
        return self.state.pg_dir / "log" / "postgresql.log"

    def database_url(self, name: str = DATABASE) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.state.port('postgres')}/{name}"

    # -- running ------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if that process is alive."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            if pid_alive(pid, str(self.data_dir)):
                return pid
        return None

    def ready(self) -> bool:
        if "postgres" not in self.state.ports:
            return False
        cmd = [str(find_pg_bindir() / "pg_isready"), "-q", "-t", "3", *self._conn("postgres")]
        return subprocess.run(cmd, env=env_without("PG")).returncode == 0

    def start(self, timeout: float = 90.0) -> None:
        """Start (or adopt) the cluster; database `steplog` gets the TimescaleDB extension."""
        with self.state.lock():
            running = self.pid() is not None
            self.state.assign_ports(("postgres",), running)
            if not running:
                self._prepare()
                # the process is gone (maybe an unreaped zombie, which postgres takes as alive)
                lock = self.state.sock_dir / f".s.PGSQL.{self.state.port('postgres')}.lock"
                for stale in (self.data_dir / "postmaster.pid", lock):
                    stale.unlink(missing_ok=True)
                res = self._pg_ctl("start", timeout, "-l", str(self.log))
                if res.returncode:
                    output = f"{res.stdout}{res.stderr}".strip()
                    raise StackError(f"PostgreSQL did not start: {output}\n{tail(self.log)}")
            deadline = time.monotonic() + timeout
            while not self.ready():
                if time.monotonic() > deadline:
                    raise StackError("PostgreSQL does not answer:\n" + tail(self.log))
                time.sleep(0.2)
            self._ensure_database(DATABASE)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit; SIGKILL only if that hangs."""
        with self.state.lock():
            pid = self.pid()
            if pid is not None:
                self._pg_ctl("stop", timeout, "-m", "fast")
                terminate(pid, signal.SIGINT, timeout=5)

    # -- SQL ------------------------------------------------------------------------------
    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql over the Unix socket; the rows come back unaligned."""
        cmd = [str(find_pg_bindir() / "psql"), "-XqAt", "-v", "ON_ERROR_STOP=1", "-c", sql]
        res = subprocess.run(
            [*cmd, *self._conn(database)], capture_output=True, text=True, timeout=300,
            env=env_without("PG"),
        )  # fmt: skip
        if res.returncode:
            raise StackError(f"psql failed ({sql!r}): {res.stderr.strip()}")
        return res.stdout.strip()

    def _ensure_database(self, name: str) -> None:
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'"):
            self.psql(f'CREATE DATABASE "{name}"')
        self.psql("CREATE EXTENSION IF NOT EXISTS timescaledb", database=name)

    def create_database(self, name: str) -> str:
        """A fresh database (dropped first if it exists) with TimescaleDB; returns its URL."""
        self.drop_database(name)
        self._ensure_database(name)
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- the cluster's owner and folders ----------------------------------------------------
    def _owner(self) -> pwd.struct_passwd | None:
        """PostgreSQL refuses to run as root; then $STEPLOG_PG_USER or `postgres` owns it."""
        if os.geteuid() != 0:
            return None
        for name in filter(None, (os.environ.get("STEPLOG_PG_USER"), "postgres", "nobody")):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise StackError("running as root and no unprivileged user exists to run PostgreSQL")

    def _as_owner(self) -> list[str]:
        """A command prefix that drops root privileges to the cluster owner.

        setpriv rather than subprocess's user=/group=: those force a plain
        fork() of this process, and fork() of a process with gRPC threads
        (a test or the service) can crash in gRPC's fork handlers; without
        them subprocess uses vfork/posix_spawn, which is safe."""
        owner = self._owner()
        if owner is None:
            return []
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [setpriv, f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL server tool (initdb, pg_ctl) as the cluster owner."""
        pg_dir = self.state.pg_dir
        env = env_without("PG") | {"LC_ALL": "C", "HOME": str(pg_dir)}
        cmd = [*self._as_owner(), str(find_pg_bindir() / args[0]), *args[1:]]
        return subprocess.run(
            cmd, cwd=pg_dir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout, start_new_session=True,
        )  # fmt: skip

    def _pg_ctl(self, action: str, timeout: float, *extra: str) -> subprocess.CompletedProcess[str]:
        args = ["-D", str(self.data_dir), "-w", "-t", str(int(timeout)), *extra, action]
        return self._run("pg_ctl", *args, timeout=timeout + 10)

    def _conn(self, database: str) -> list[str]:
        sock, port = str(self.state.sock_dir), str(self.state.port("postgres"))
        return ["-h", sock, "-p", port, "-U", PG_SUPERUSER, "-d", database]

    def _owner_reaches(self, path: Path, test: str = "-x") -> bool:
        return subprocess.run([*self._as_owner(), "test", test, str(path)]).returncode == 0

    def relocate(self, owner: pwd.struct_passwd) -> None:
        """Keep the cluster where its owner can reach it when root cannot be.

        Run as root from a clone under /root (mode 700), PostgreSQL's user
        cannot traverse the path. Rather than open up a home directory, the
        cluster then lives in PG_OUTSIDE_BASE/pg-<hash of root> (root-owned
        base, mode 711: nobody can list it), recorded in stack.json, with a
        symlink root/pg pointing at it; `remove` deletes it.
        """
        state = self.state
        if state.data.get("pg_dir") or self._owner_reaches(state.root):
            return
        link = state.root / "pg"
        if link.is_dir() and not link.is_symlink():
            if (link / "data" / "PG_VERSION").exists():
                raise StackError(
                    f"PostgreSQL runs as {owner.pw_name!r} (it refuses root) and cannot reach "
                    f"the cluster in {link}: move the stack root where that user can reach it"
                )
            shutil.rmtree(link)  # a half-made directory from a start that failed
        base = PG_OUTSIDE_BASE
        base.mkdir(parents=True, exist_ok=True, mode=0o711)
        st = base.lstat()
        if base.is_symlink() or st.st_uid != 0 or st.st_mode & 0o022:
            raise StackError(f"{base} must be a directory owned by root, writable only by root")
        os.chmod(base, 0o711)
        target = outside_dir(state.root)
        target.mkdir(mode=0o700, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        state.data["pg_dir"] = str(target)
        state.save()

    def _give_to(self, owner: pwd.struct_passwd) -> None:
        """Hand the cluster's directories to its owner, who must also be able to reach them."""
        for top in (self.state.pg_dir, self.state.sock_dir):
            if top.stat().st_uid != owner.pw_uid:
                for path in [top, *top.rglob("*")]:
                    os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        if not self._owner_reaches(self.state.pg_dir, "-w"):
            raise StackError(
                f"PostgreSQL runs as {owner.pw_name!r} (it refuses root) and cannot reach "
                f"{self.state.pg_dir}: move the stack root where that user can reach it"
            )

    def _prepare(self) -> None:
        """Directories, initdb once, and the settings file (rewritten at every start)."""
        owner = self._owner()
        if owner is not None:
            self.relocate(owner)
        for d in (self.log.parent, self.state.sock_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if owner is not None:
            self._give_to(owner)
        if not (self.data_dir / "PG_VERSION").exists():  # initdb once; a half-made dir goes
            shutil.rmtree(self.data_dir, ignore_errors=True)
            flags = ["-A", "trust", "-E", "UTF8", "--locale=C", "-k", "--no-instructions"]
            res = self._run("initdb", "-D", str(self.data_dir), "-U", PG_SUPERUSER, *flags)
            if res.returncode:
                raise StackError(f"initdb failed:\n{res.stdout}{res.stderr}")
            with (self.data_dir / "postgresql.conf").open("a") as f:
                f.write("\ninclude_if_exists = 'steplog.conf'\n")
        # rewritten at every start, so a re-picked port or socket directory applies
        conf = self.data_dir / "steplog.conf"
        port = self.state.port("postgres")
        conf.write_text(PG_CONF.format(port=port, sock_dir=self.state.sock_dir))
        if owner:
            os.chown(conf, owner.pw_uid, owner.pw_gid)
