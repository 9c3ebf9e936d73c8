"""Local stacks that never collide: ports, start failures, PostgreSQL restarts.

Real processes throughout: `python -m ingest serve` and `python -m ingest dev`
as subprocesses, the real local stack. Tests that kill or restart PostgreSQL
use a stack of their own under tmp_path (never the shared test stack), and
delete it at the end.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from ingest import addresses
from ingest.devstack import PG_OUTSIDE_BASE, LocalStack, StackError, find_pg_bindir
from ingest.healthcheck import check, wait_healthy
from steplog.v1 import experiment_service_pb2, experiment_service_pb2_grpc
from tests.support import ROOT, ServiceProcess, free_port

# Settings from the caller's environment that would change what `dev` picks.
_PORT_VARS = ("STEPLOG_LISTEN", "STEPLOG_METRICS_PORT", "STEPLOG_REUSE_PORT")


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PORT_VARS}
    env.update(extra or {})
    return env


def serve(
    env: Mapping[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", "serve", *args],
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_reason(stderr: str, prefix: str = "steplog-ingest: ") -> str:
    """The single reason line a failed start prints, and nothing like a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [
        line
        for line in stderr.splitlines()
        if line.startswith(prefix) and not line.startswith(("steplog: stopp", "steplog: Ctrl-C"))
    ]
    assert len(lines) == 1, stderr
    return lines[0]


@contextlib.contextmanager
def held_port(port: int = 0) -> Iterator[int]:
    """A port someone else listens on (a plain socket, no SO_REUSEPORT).

    If `port` is already taken by another process, it stays taken: that is
    all the test needs.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
    try:
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            port = s.getsockname()[1]
        except OSError:
            assert port and not addresses.port_free(f"127.0.0.1:{port}")
        yield port
    finally:
        s.close()


class Dev:
    """`python -m ingest dev ...` with its output read line by line."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "dev", *args],
            env=_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.seen))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"dev ended before {pattern!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the exit; (code, everything it printed)."""
        code = self.proc.wait(timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return code, "\n".join(self.seen)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.finish()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def kill_postgres(stack: LocalStack, timeout: float = 30) -> None:
    """kill -9 the postmaster, and wait until it is gone (a signal is not instant)."""
    pid = stack.postgres.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while stack.postgres.pid() is not None:
        assert time.monotonic() < deadline, "the postmaster outlived SIGKILL"
        time.sleep(0.05)


@pytest.fixture
def own_stack_root(tmp_path: Path) -> Iterator[Path]:
    """A stack root of this test alone; stopped and deleted at the end."""
    root = tmp_path / "stack"
    yield root
    LocalStack(root).remove()


# --- serve ------------------------------------------------------------------


def test_a_second_service_on_the_same_port_fails_with_one_line(
    service: ServiceProcess, service_env: dict[str, str]
) -> None:
    # Before: gRPC's default SO_REUSEPORT let it join the port and take half the clients.
    env = {**service_env, "STEPLOG_LISTEN": service.address, "STEPLOG_METRICS_PORT": "0"}
    out = serve(env)
    assert out.returncode == 1
    reason = one_reason(out.stderr)
    assert f"cannot listen on {service.address}" in reason and "already in use" in reason
    assert check(service.address)[0]


def test_reuse_port_shares_only_among_processes_that_ask(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**service_env, "STEPLOG_REUSE_PORT": "true"}
    first = ServiceProcess(env, port=port, log_path=tmp_path / "a.log")
    with first, ServiceProcess(env, port=port, log_path=tmp_path / "b.log") as second:
        assert second.proc is not None and second.proc.poll() is None
        out = serve({**service_env, "STEPLOG_LISTEN": f"127.0.0.1:{port}"}, "--metrics-port", "0")
        assert out.returncode == 1
        assert "already in use" in one_reason(out.stderr)


def test_a_taken_metrics_port_fails_the_start_with_one_line(service_env: dict[str, str]) -> None:
    # Before: a traceback from the metrics server after gRPC was already bound.
    with held_port() as metrics:
        env = {**service_env, "STEPLOG_LISTEN": f"127.0.0.1:{free_port()}"}
        started = time.monotonic()
        out = serve(env, "--metrics-port", str(metrics))
        assert out.returncode == 1
        reason = one_reason(out.stderr)
        assert f"cannot serve metrics on 127.0.0.1:{metrics}" in reason
        assert "STEPLOG_METRICS_PORT" in reason
        assert time.monotonic() - started < 30


def test_an_unreachable_database_is_one_line(service_env: dict[str, str]) -> None:
    dead = f"postgresql://steplog:hunter2@127.0.0.1:{free_port()}/steplog"
    env = {
        **service_env,
        "STEPLOG_DATABASE_URL": dead,
        "STEPLOG_LISTEN": f"127.0.0.1:{free_port()}",
    }
    out = serve(env, "--metrics-port", "0")
    assert out.returncode == 1
    assert "database unavailable" in one_reason(out.stderr)
    assert "hunter2" not in out.stderr + out.stdout


def test_the_startup_line_hides_the_password(service_env: dict[str, str], tmp_path: Path) -> None:
    # A password in the query string reaches the server (trust auth ignores it).
    url = service_env["STEPLOG_DATABASE_URL"] + "?password=hunter2-in-query"
    env = {**service_env, "STEPLOG_DATABASE_URL": url}
    log = tmp_path / "service.log"
    with ServiceProcess(env, log_path=log):
        pass
    text = log.read_text()
    assert "starting: database_url=" in text and "password=***" in text
    assert "hunter2-in-query" not in text and service_env["STEPLOG_S3_SECRET_KEY"] not in text


# --- dev --------------------------------------------------------------------


def test_dev_refuses_a_taken_port_that_was_asked_for(stack: LocalStack) -> None:
    root = str(stack.root)  # the shared stack: adopted and left running (--keep-stack)
    with held_port() as port:
        dev = Dev("--root", root, "--keep-stack", "--listen", f"127.0.0.1:{port}")
        code, output = dev.finish()
        assert code == 1
        reason = one_reason(output, "steplog: ")
        assert f"127.0.0.1:{port} is already in use" in reason
        dev = Dev("--root", root, "--keep-stack", "--listen", f"127.0.0.1:{free_port()}",
                  "--metrics-port", str(port))  # fmt: skip
        code, output = dev.finish()
        assert code == 1
        assert f"metrics port {port} is already in use" in output
    assert all(stack.status().values())


def test_dev_stops_with_one_line_when_the_service_cannot_start(stack: LocalStack) -> None:
    # Before: a bare "the service exited with code 1" (or a wait on a foreign service).
    listen = f"0.0.0.0:{free_port()}"
    dev = Dev("--root", str(stack.root), "--keep-stack", "--listen", listen, "--metrics-port", "0")
    code, output = dev.finish()
    assert code == 1, output
    assert "Traceback" not in output
    reason = [line for line in output.splitlines() if "did not start" in line]
    assert len(reason) == 1 and f"refusing to listen on {listen}" in reason[0], output
    assert all(stack.status().values())


def _create_experiment(address: str, timeout: float = 60) -> None:
    """One metadata call that needs the database, retried while it reconnects."""
    deadline = time.monotonic() + timeout
    request = experiment_service_pb2.GetOrCreateExperimentRequest(workspace="default", name="dev")
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = experiment_service_pb2_grpc.ExperimentServiceStub(channel)
        while True:
            try:
                stub.GetOrCreateExperiment(request, timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_dev_picks_free_ports_and_revives_postgres_on_its_port(own_stack_root: Path) -> None:
    with held_port(50051), held_port(9464):
        dev = Dev("--root", str(own_stack_root), "--processes", "2")
        try:
            dev.wait_for(r"127\.0\.0\.1:50051 is in use; listening on port \d+ instead")
            dev.wait_for(r"metrics port 9464 is in use")
            serving = dev.wait_for(r"serving on (127\.0\.0\.1:(\d+)) \(2 process")
            address, port = serving.group(1), int(serving.group(2))
            assert port != 50051
            metrics = [int(dev.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
                       for _ in range(2)]  # fmt: skip
            assert len(set(metrics)) == 2 and not {9464, 9465} & set(metrics)
            for m in metrics:
                with urllib.request.urlopen(f"http://127.0.0.1:{m}/metrics", timeout=10) as r:
                    assert r.status == 200 and b"steplog_" in r.read()
            wait_healthy(address, 30)
            _create_experiment(address)

            # kill -9 PostgreSQL: dev starts it again on the port the services use.
            stack = LocalStack(own_stack_root)
            before = stack.info().database_url
            kill_postgres(stack)
            dev.wait_for(r"PostgreSQL had stopped; started it again on the same port")
            assert LocalStack(own_stack_root).info().database_url == before
            _create_experiment(address)
        finally:
            code, output = dev.stop()
    assert code == 0, output
    assert "steplog: stopped" in output


# --- devstack ---------------------------------------------------------------


def test_a_restarted_postgres_keeps_its_port(own_stack_root: Path) -> None:
    stack = LocalStack(own_stack_root)
    stack.port_wait_s = 1.0
    stack.start_postgres()
    port = stack.port("postgres")
    if os.geteuid() == 0:
        # PostgreSQL runs as another user, who cannot traverse pytest's 0700 tmp
        # dirs (nor /root): the cluster lives outside, reachable, linked from root/pg.
        assert stack.pg_dir.parent == PG_OUTSIDE_BASE and (own_stack_root / "pg").is_symlink()
    # A client is connected (its backend may outlive the postmaster for a moment).
    psql = subprocess.Popen(
        [str(find_pg_bindir() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-d", "steplog", "-c", "SELECT pg_sleep(30)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
        while stack.psql(sleeping) == "0":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        kill_postgres(stack)
        LocalStack(own_stack_root).start_postgres()
        assert LocalStack(own_stack_root).port("postgres") == port
    finally:
        psql.kill()
        psql.wait()

    # Someone else takes the port while it is down: a clear refusal, not a new port.
    stack = LocalStack(own_stack_root)
    stack.port_wait_s = 1.0
    stack.stop_postgres()
    taken = f"port {port} of this stack's postgres is taken"
    with held_port(port), pytest.raises(StackError, match=taken):
        stack.start_postgres()
    stack.start_postgres()
    assert stack.port("postgres") == port

    # After a deliberate stop() nothing points at the old port: a new one is fine.
    stack.stop()
    with held_port(port):
        stack.start_postgres()
        assert stack.port("postgres") != port
    outside = stack.pg_dir
    nested = own_stack_root / "test-stack" / "stack.json"  # another stack inside this root
    nested.parent.mkdir()
    nested.write_text("{}")
    stack.remove()
    assert not outside.exists() and not (own_stack_root / "stack.json").exists()
    assert not (own_stack_root / "pg").exists() and nested.exists()
