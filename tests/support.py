"""Test support: the service as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from ingest.healthcheck import wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain(stream: IO[bytes]) -> None:
    while stream.read(65536):
        pass


class ServiceProcess:
    """`python -m ingest serve` with the given environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        metrics_port: int = 0,
        log_path: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        # A port picked here may be taken by another process before the
        # service binds it; start() then retries on a new one.
        self._auto_port = port is None
        self.port = port or free_port()
        self.metrics_port = metrics_port
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update(env)
        self.env["STEPLOG_LISTEN"] = self.address
        self.env["STEPLOG_METRICS_PORT"] = str(metrics_port)
        self.env.setdefault("STEPLOG_SHUTDOWN_GRACE_S", "2")
        if extra_env:
            self.env.update(extra_env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        # Only a first start moves: a restart must keep the address clients know.
        may_move = self._auto_port and self.proc is None
        for attempt in range(3):
            out = open(self.log_path, "ab") if self.log_path else subprocess.PIPE  # noqa: SIM115
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            if out is not subprocess.PIPE:
                out.close()
            try:
                wait_healthy(self.address, timeout, self.proc)
            except RuntimeError as exc:
                said = self._output()
                if may_move and attempt < 2 and "in use" in said:
                    self._move_to(free_port())
                    continue
                raise RuntimeError(f"{exc}; it said: {said[-2000:]}") from None
            if self.proc.stdout is not None:
                # Keep the pipe drained so a chatty service never blocks on it.
                threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True).start()
            return self
        raise AssertionError("unreachable")

    def _output(self) -> str:
        if self.proc is not None and self.proc.stdout is not None:
            return self.proc.stdout.read().decode(errors="replace")
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def _move_to(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.env["STEPLOG_LISTEN"] = self.address

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
