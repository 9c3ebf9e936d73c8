"""Test support: the service as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ingest.healthcheck import wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "serve"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        wait_healthy(self.address, timeout, self.proc)
        return self

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
