"""`python -m ingest.healthcheck`, the image's HEALTHCHECK, against the real service.

Also the opt-in that lets a container listen on 0.0.0.0 without
authentication: refused without it, serving with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ingest.server import SERVICE_NAMES
from tests.support import ROOT, ServiceProcess, free_port

OPT_IN = "STEPLOG_ALLOW_UNAUTHENTICATED_NON_LOOPBACK"


def probe(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest.healthcheck", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_live_service_is_serving(service: ServiceProcess) -> None:
    out = probe(service.address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"{service.address}: SERVING"


def test_each_named_service_is_serving(service: ServiceProcess) -> None:
    for name in SERVICE_NAMES:
        out = probe(service.address, "--service", name)
        assert out.returncode == 0, out.stdout + out.stderr


def test_unknown_service_name_is_not_healthy(service: ServiceProcess) -> None:
    out = probe(service.address, "--service", "no.such.Service")
    assert out.returncode == 1
    assert "NOT_FOUND" in out.stdout


def test_dead_port_is_not_healthy() -> None:
    address = f"127.0.0.1:{free_port()}"
    out = probe(address, "--timeout", "2")
    assert out.returncode == 1
    assert out.stdout.startswith(f"{address}: UNAVAILABLE")


def test_without_an_address_it_dials_steplog_listen(service: ServiceProcess) -> None:
    # As in the image: STEPLOG_LISTEN=0.0.0.0:PORT, dialled on loopback.
    out = probe(env={"STEPLOG_LISTEN": f"0.0.0.0:{service.port}"})
    assert out.returncode == 0, out.stdout + out.stderr
    dead = probe(env={"STEPLOG_LISTEN": f"0.0.0.0:{free_port()}"})
    assert dead.returncode == 1


def test_bad_arguments_exit_2() -> None:
    assert probe("127.0.0.1:1", "--timeout", "0").returncode == 2
    assert probe(env={"STEPLOG_LISTEN": "no-port"}).returncode == 2


def test_wildcard_address_is_refused_without_the_opt_in(service_env: dict[str, str]) -> None:
    env = {**os.environ, **service_env, "STEPLOG_LISTEN": f"0.0.0.0:{free_port()}"}
    env.pop(OPT_IN, None)
    out = subprocess.run(
        [sys.executable, "-m", "ingest", "serve", "--metrics-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0" in out.stderr and OPT_IN in out.stderr


def test_wildcard_address_serves_with_the_opt_in(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    extra = {"STEPLOG_LISTEN": f"0.0.0.0:{port}", OPT_IN: "true"}
    proc = ServiceProcess(
        service_env, port=port, log_path=tmp_path / "service.log", extra_env=extra
    )
    with proc:
        out = probe(env={"STEPLOG_LISTEN": f"0.0.0.0:{port}"})
        assert out.returncode == 0, out.stdout + out.stderr
    log = (tmp_path / "service.log").read_text()
    assert "WITHOUT AUTHENTICATION" in log
    assert proc.proc is not None and proc.proc.returncode == 0, log[-2000:]
    # Stopped (SIGTERM, graceful): the probe fails.
    assert probe(f"127.0.0.1:{port}", "--timeout", "2").returncode == 1


def test_a_name_that_resolves_to_loopback_serves(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    # The rule is on resolved addresses: 'localhost' is bound as what it resolves to.
    port = free_port()
    extra = {"STEPLOG_LISTEN": f"localhost:{port}"}
    proc = ServiceProcess(service_env, port=port, log_path=tmp_path / "s.log", extra_env=extra)
    with proc:
        out = probe(f"127.0.0.1:{port}")
        assert out.returncode == 0, out.stdout + out.stderr


def test_help_runs() -> None:
    out = probe("--help")
    assert out.returncode == 0 and "SERVING" in out.stdout
