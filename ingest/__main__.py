"""`python -m ingest` / `steplog-ingest`: serve, bring up the local stack (dev),
or manage bearer tokens (token create / list / revoke)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ingest import addresses
from ingest import config as config_mod

if TYPE_CHECKING:
    from ingest.devstack import LocalStack
    from ingest.server import Service

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_PORT = 9464
START_TIMEOUT_S = 90.0


class _ReadyReport:
    """`serve --ready-fd N`: one line on fd N for the `dev` that started it.

    `ready PORT METRICS_PORT` once serving, or `failed REASON` (one line).
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def _write(self, line: str) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
            os.close(self.fd)
        self.fd = None

    def ready(self, service: Service) -> None:
        self._write(f"ready {service.port} {service.metrics_port}")

    def failed(self, reason: str) -> None:
        self._write(f"failed {reason}")


def _serve(ns: argparse.Namespace) -> int:
    report = _ReadyReport(ns.ready_fd)
    try:
        cfg = config_mod.from_sources(ns)
    except config_mod.ConfigError as exc:
        reason = f"configuration error: {exc}"
        if report.fd is None:
            print(f"steplog-ingest: {reason}", file=sys.stderr)
        report.failed(reason)
        return 2
    from ingest.server import StartError, serve

    try:
        asyncio.run(serve(cfg, report.ready))
    except StartError as exc:
        reason = str(exc.code)
        if report.fd is None:  # `dev` prints the reason itself
            print(f"steplog-ingest: {reason}", file=sys.stderr)
        report.failed(reason)
        return 1
    return 0


class _Refused(Exception):
    """`dev` cannot go on; the message is the one-line reason."""


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int
    line: str = ""

    def read_line(self, deadline: float) -> str:
        """The child's report line; '' when it exited without one."""
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused(
                    f"service process {self.index} did not start within {START_TIMEOUT_S:.0f} s"
                )
            readable, _, _ = select.select([self.ready_fd], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(self.ready_fd, 4096)
                if not chunk:
                    break  # exited (or closed the pipe) without a word
                buf += chunk
        os.close(self.ready_fd)
        self.ready_fd = -1
        self.line = buf.decode(errors="replace").strip()
        return self.line


def _addresses_of(listen: str) -> tuple[str, list[str]]:
    """(host, literal HOST:PORT addresses with port 0) a listen setting stands for."""
    host, _ = addresses.split_host_port(listen)
    try:
        ips = addresses.resolve(host)
    except addresses.AddressError as exc:
        raise _Refused(f"--listen {listen}: {exc}") from None
    return host, [addresses.join_host_port(ip, 0) for ip in ips]


def _free_everywhere(literals: list[str], port: int) -> bool:
    try:
        return all(
            addresses.port_free(addresses.join_host_port(addresses.split_host_port(a)[0], port))
            for a in literals
        )
    except addresses.AddressError as exc:
        raise _Refused(str(exc)) from None


def _pick_free(literals: list[str], taken: set[int]) -> int:
    from ingest.devstack import free_port

    for _ in range(200):
        port = free_port(taken)
        if _free_everywhere(literals, port):
            return port
    raise _Refused("found no free port")


@dataclass(frozen=True)
class _Ports:
    listen: str
    metrics_host: str
    metrics: list[int]


def _choose_ports(ns: argparse.Namespace, env: dict[str, str]) -> _Ports:
    """The gRPC listen address and each process's metrics port.

    A default that is taken is replaced by a free port (and said so); a port
    asked for explicitly (flag or environment) that is taken is refused.
    """
    explicit_listen = ns.listen or env.get("STEPLOG_LISTEN") or ""
    listen = explicit_listen or DEFAULT_LISTEN
    try:
        host, port = addresses.split_host_port(listen)
    except addresses.AddressError as exc:
        raise _Refused(f"--listen {listen}: {exc}") from None
    host, literals = _addresses_of(listen)
    taken: set[int] = set()
    if port == 0 or not _free_everywhere(literals, port):
        if port and explicit_listen:
            raise _Refused(
                f"{listen} is already in use by another process: choose another --listen "
                "(or leave it out, and dev picks a free port)"
            )
        new = _pick_free(literals, taken)
        if port:
            print(f"steplog: {listen} is in use; listening on port {new} instead")
        port = new
    taken.add(port)
    listen = addresses.join_host_port(host, port)

    raw = ns.metrics_port if ns.metrics_port is not None else env.get("STEPLOG_METRICS_PORT", "")
    explicit_metrics = raw != ""
    try:
        base = int(raw) if explicit_metrics else DEFAULT_METRICS_PORT
        if not 0 <= base <= 65535 - ns.processes:
            raise ValueError
    except ValueError:
        raise _Refused(f"--metrics-port {raw!r}: must be a port number (0 turns it off)") from None
    metrics_literals = literals[:1]  # the service serves /metrics on its first address
    metrics_host = addresses.split_host_port(literals[0])[0]
    if base == 0:
        return _Ports(listen, metrics_host, [0] * ns.processes)
    ports = [base + i for i in range(ns.processes)]
    busy = [p for p in ports if p in taken or not _free_everywhere(metrics_literals, p)]
    if busy and explicit_metrics:
        raise _Refused(
            f"metrics port {busy[0]} is already in use by another process: choose another "
            "--metrics-port (0 turns /metrics off), or leave it out and dev picks free ports"
        )
    if busy:
        ports = []
        for _ in range(ns.processes):
            ports.append(_pick_free(metrics_literals, taken))
            taken.add(ports[-1])
        shown = ", ".join(map(str, ports))
        print(f"steplog: metrics port {busy[0]} is in use; metrics on port(s) {shown} instead")
    return _Ports(listen, metrics_host, ports)


def _start_children(
    env: dict[str, str], listen: str, metrics_ports: list[int], processes: int
) -> list[_Child]:
    children: list[_Child] = []
    for i in range(processes):
        penv = dict(env)
        penv["STEPLOG_LISTEN"] = listen
        penv["STEPLOG_METRICS_PORT"] = str(metrics_ports[i])
        # SO_REUSEPORT only among this invocation's own processes.
        penv["STEPLOG_REUSE_PORT"] = "true" if processes > 1 else "false"
        r, w = os.pipe()
        try:
            cmd = [sys.executable, "-m", "ingest", "serve", "--ready-fd", str(w)]
            proc = subprocess.Popen(cmd, env=penv, pass_fds=(w,))
        finally:
            os.close(w)
        children.append(_Child(i + 1, proc, r))
    deadline = time.monotonic() + START_TIMEOUT_S
    for child in children:
        line = child.read_line(deadline)
        if not line.startswith("ready "):
            if line.startswith("failed "):
                reason = line.removeprefix("failed ")
            else:
                try:
                    code = child.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    code = None
                reason = f"it exited with code {code} (its log is above)"
            who = "the service" if processes == 1 else f"service process {child.index}"
            raise _Refused(f"{who} did not start: {reason}")
    return children


DEFAULT_UI_PORT = 8765


def _start_ui(env: dict[str, str], ports: _Ports, index: int) -> _Child:
    """The web UI (`ui`, its own process) beside the service; it prints its URL."""
    literals = [addresses.join_host_port(ports.metrics_host, 0)]
    taken = {addresses.split_host_port(ports.listen)[1], *ports.metrics}
    port = DEFAULT_UI_PORT
    if port in taken or not _free_everywhere(literals, port):
        port = _pick_free(literals, taken)
    r, w = os.pipe()
    try:
        listen = addresses.join_host_port(ports.metrics_host, port)
        cmd = [sys.executable, "-m", "ingest", "ui", "--listen", listen, "--ready-fd", str(w)]
        proc = subprocess.Popen(cmd, env=env, pass_fds=(w,))
    finally:
        os.close(w)
    child = _Child(index, proc, r)
    if not child.read_line(time.monotonic() + START_TIMEOUT_S).startswith("ready "):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise _Refused("the web UI did not start (its log is above)")
    return child


def _dev(ns: argparse.Namespace) -> int:
    """The embedded default: local PostgreSQL+TimescaleDB and SeaweedFS S3 as
    plain processes under --root, then the service (several processes sharing
    one port when --processes > 1), then optionally the example script."""
    from ingest.devstack import LocalStack, StackError
    from ingest.healthcheck import probe_address, wait_healthy

    if ns.processes < 1:
        print("steplog: --processes must be at least 1", file=sys.stderr)
        return 2
    root = Path(ns.root).resolve()
    stack = LocalStack(root)
    children: list[_Child] = []
    try:
        try:
            info = stack.start()
        except StackError as exc:
            raise _Refused(f"the local stack did not start: {exc}") from None
        env = dict(os.environ)
        env.update(info.env())
        ports = _choose_ports(ns, env)
        listen = ports.listen
        children = _start_children(env, listen, ports.metrics, ns.processes)
        url = probe_address(listen)
        try:
            wait_healthy(url, 30, children[0].proc)
        except (RuntimeError, TimeoutError) as exc:
            raise _Refused(str(exc)) from None
        # The web UI next, while the database is known to be up; the service
        # does not depend on it, so a UI that cannot start is a warning.
        try:
            children.append(_start_ui(env, ports, len(children) + 1))
        except _Refused as exc:
            print(f"steplog: {exc}; the service runs without it", file=sys.stderr)
        print(f"steplog: serving on {listen} ({ns.processes} process(es)); stack under {root}")
        for port in filter(None, ports.metrics):
            where = addresses.join_host_port(ports.metrics_host, port)
            print(f"steplog: metrics on http://{where}/metrics")
        print(f"steplog: export STEPLOG_URL={url}")
        if env.get("STEPLOG_AUTH", "none") == "none":
            print(
                "steplog: no authentication (loopback only); to turn it on: STEPLOG_AUTH=token, "
                "`steplog-ingest token create`, STEPLOG_TOKEN (README: Security)"
            )
        if ns.example:
            cenv = dict(env)
            cenv["STEPLOG_URL"] = url
            rc = subprocess.call([sys.executable, "-m", "steplog.example"], env=cenv)
            if rc != 0:
                print(f"steplog: the example failed with code {rc}", file=sys.stderr)
        if ns.exit_after_example:
            return 0
        print("steplog: Ctrl-C stops the service and the stack")
        return _watch(stack, children)
    except _Refused as exc:
        print(f"steplog: {exc}", file=sys.stderr)
        return 1
    finally:
        what = [w for w, on in (("the service", children), ("the stack", not ns.keep_stack)) if on]
        if what:
            print(f"steplog: stopping {' and '.join(what)}")
        for c in children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        if not ns.keep_stack:
            try:
                stack.stop()
            except StackError as exc:
                print(f"steplog: the local stack did not stop cleanly: {exc}", file=sys.stderr)
        if what:
            print("steplog: stopped")


def _watch(stack: LocalStack, children: list[_Child]) -> int:
    """Until Ctrl-C or SIGTERM: a component of the stack that died is started
    again on its own ports; a service process that exits ends `dev`."""
    from ingest.devstack import StackError

    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop:
        for c in children:
            if c.proc.poll() is not None:
                print(
                    f"steplog: service process {c.index} exited with code {c.proc.returncode}",
                    file=sys.stderr,
                )
                return 1
        try:
            for name in stack.revive():
                print(f"steplog: {name} had stopped; started it again on the same port(s)")
        except StackError as exc:
            print(f"steplog: the local stack cannot be kept up: {exc}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steplog-ingest", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("STEPLOG_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the ingest service")
    config_mod.add_arguments(serve)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    ui = sub.add_parser("ui", help="run the web UI (read-only HTTP API and page)")
    from ingest.ui.config import add_arguments as add_ui_arguments

    add_ui_arguments(ui)
    dev = sub.add_parser("dev", help="start the local stack and the service")
    dev.add_argument("--root", default=".steplog", help="folder for the stack's data")
    dev.add_argument(
        "--listen",
        default=None,
        help=f"gRPC address (default STEPLOG_LISTEN, else {DEFAULT_LISTEN} or a free port if "
        "that is taken; an address given here or in STEPLOG_LISTEN that is taken is refused)",
    )
    dev.add_argument(
        "--metrics-port",
        default=None,
        help=f"first /metrics port, process i gets port + i - 1 (default STEPLOG_METRICS_PORT, "
        f"else {DEFAULT_METRICS_PORT} or free ports if taken; 0 turns /metrics off)",
    )
    dev.add_argument("--processes", type=int, default=1, help="service processes (one per core)")
    dev.add_argument("--example", action="store_true", help="run the example script once healthy")
    dev.add_argument("--exit-after-example", action="store_true", help=argparse.SUPPRESS)
    dev.add_argument("--keep-stack", action="store_true", help="leave the stack running on exit")
    from ingest.store import blob_sweep, quotas, tokens

    tokens.add_cli(sub)
    quotas.add_cli(sub)
    blob_sweep.add_cli(sub)
    args = tokens.cli_args(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("--") and "dev" not in args and "serve" not in args):
        args = ["serve", *args]
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if ns.command == "dev":
        return _dev(ns)
    if ns.command == "ui":
        from ingest.ui.server import main as ui_main

        return ui_main(ns)
    if ns.command == "token":
        return tokens.run_cli(ns)
    if ns.command == "quota":
        return quotas.run_cli(ns)
    if ns.command == "sweep-blobs":
        return blob_sweep.run_cli(ns)
    return _serve(ns)


if __name__ == "__main__":
    sys.exit(main())
