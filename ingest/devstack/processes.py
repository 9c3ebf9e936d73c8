"""Processes and ports of the local stack: liveness, termination, free ports, logs.

Linux-first (it reads /proc to tell a live process from a zombie or a reused
pid), with a plain kill(0) fallback elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Collection
from pathlib import Path


def pid_alive(pid: int, marker: str = "") -> bool:
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


def terminate(pid: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Ask a process (and its process group) to stop; SIGKILL after `timeout`."""
    for send in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            for send in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    send(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def bindable(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_bindable(ports: Collection[int], timeout: float) -> bool:
    """Whether all `ports` can be bound, waiting up to `timeout`: a killed
    PostgreSQL's backends hold its sockets until they notice."""
    deadline = time.monotonic() + timeout
    while not all(map(bindable, ports)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
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
            p not in taken and bindable(p) for p in {port, port + offset}
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


def tail(*paths: Path, lines: int = 25) -> str:
    """The last lines of some log files, for an error message."""
    out = []
    for p in paths:
        with contextlib.suppress(OSError):
            text = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(out) or "(no log output)"


def env_without(*prefixes: str) -> dict[str, str]:
    """The environment minus variables that would redirect a child (PGHOST, AWS_*, ...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (it may hold credentials)."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    tmp.replace(path)
