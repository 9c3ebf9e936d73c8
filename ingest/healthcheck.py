"""`python -m ingest.healthcheck [ADDRESS]`: exit 0 when the service is SERVING.

A container health probe (the Docker image's HEALTHCHECK) built on the
standard grpc.health.v1 check the service answers. ADDRESS is HOST:PORT; when
it is left out, the address comes from STEPLOG_LISTEN (the service's own
setting), and a wildcard host (0.0.0.0, ::) is dialled on loopback; with
STEPLOG_HEALTH_PORT set (the plaintext health-only port a TLS service opens
for probes), that port is dialled instead of the gRPC one.

Exit codes: 0 the service (or --service NAME) reports SERVING; 1 anything
else (NOT_SERVING while shutting down, unknown service, nothing listening,
timeout); 2 bad arguments. One line on stdout says which, because Docker keeps
a probe's last output in `docker inspect`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingest.config import Config, setting

DEFAULT_LISTEN = Config.listen
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


def probe_address(listen: str) -> str:
    """Where to dial a service that listens on `listen` from the same host."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    if not port.isdigit():
        raise ValueError(f"{listen!r} has no numeric port")
    return f"{_WILDCARDS.get(host, host)}:{port}"


def default_address(env: Mapping[str, str]) -> str:
    """The probe's address from the service's own settings."""
    # Parsed as the service parses them (ingest/config.py): the same words, the same errors.
    address = probe_address(str(setting("listen", env=env)))
    health_port = int(setting("health_port", env=env))
    if health_port:
        address = f"{address.rpartition(':')[0]}:{health_port}"
    return address


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """One Health.Check call: (serving, what was seen)."""
    # A probe dials the service directly: never through an HTTP proxy from the environment.
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            name = code.name if code is not None else type(err).__name__
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            return False, f"{name}: {details}"
    status = int(reply.status)
    name = str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return status == health_pb2.HealthCheckResponse.SERVING, name


def wait_healthy(
    address: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until the service at address reports SERVING; fail early if the
    process that should serve it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        ok, _ = check(address, timeout=1.0)
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service at {address} did not become healthy in {timeout}s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.healthcheck",
        description="Exit 0 when the steplog service at ADDRESS reports SERVING (grpc.health.v1).",
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=None,
        help="HOST:PORT to check (default: STEPLOG_LISTEN, a wildcard host dialled on loopback)",
    )
    parser.add_argument(
        "--service", default="", help="health service name to check (default: the whole server)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    ns = parser.parse_args(argv)
    if ns.timeout <= 0:
        parser.error("--timeout must be > 0")
    try:
        address = ns.address or default_address(os.environ)
    except ValueError as exc:
        parser.error(f"STEPLOG_LISTEN / STEPLOG_HEALTH_PORT: {exc}")
    serving, seen = check(address, ns.service, ns.timeout)
    target = f"{address} ({ns.service})" if ns.service else address
    print(f"{target}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
