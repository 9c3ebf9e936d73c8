"""TLS and mutual TLS end to end: the real service process on loopback, with
certificates made here (a CA, a server certificate for localhost/127.0.0.1,
client certificates of that CA and of another one), and the real steplog
client logging a run through them.

Also: the plaintext health-only port (probes that cannot speak TLS), and
/metrics over HTTPS with basic auth (401 without credentials, 200 with them).
"""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ingest import healthcheck
from ingest.healthcheck import wait_healthy
from ingest.observe.metrics_http import make_hash
from steplog import Experiment, Run
from steplog._channel import ChannelSettings
from steplog.client import Client
from steplog.errors import PermissionDeniedError, ServiceError, UnauthenticatedError
from steplog.v1 import experiment_service_pb2 as ex
from steplog.v1 import run_service_pb2, run_service_pb2_grpc
from tests.support import ServiceProcess, free_port
from tests.tlscerts import CertificateAuthority, Pem

METRICS_USER = "prometheus"
METRICS_PASSWORD = "correct horse battery staple " + uuid.uuid4().hex


class TlsService(ServiceProcess):
    """The service with TLS on its gRPC port: health is probed on the
    plaintext health-only port."""

    def __init__(self, *args: object, health_port: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.health_port = health_port

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        import subprocess
        import sys

        from tests.support import ROOT

        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "serve"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        wait_healthy(f"127.0.0.1:{self.health_port}", timeout, self.proc)
        return self


@dataclass
class Setup:
    service: TlsService
    ca: CertificateAuthority
    client: Pem
    other_client: Pem
    log: Path

    @property
    def url(self) -> str:
        return f"localhost:{self.service.port}"

    @property
    def metrics_url(self) -> str:
        return f"https://localhost:{self.service.metrics_port}/metrics"


def _start(service_env: dict[str, str], folder: Path, *, mutual: bool) -> Iterator[Setup]:
    ca = CertificateAuthority(folder / "ca")
    other = CertificateAuthority(folder / "other", "another CA")
    server = ca.server()
    metrics_cert = ca.server("metrics")
    auth_file = folder / "metrics-users"
    auth_file.write_text(f"# users\n{METRICS_USER}:{make_hash(METRICS_PASSWORD, 20_000)}\n")
    health_port = free_port()
    extra = {
        "STEPLOG_TLS_CERT": str(server.cert),
        "STEPLOG_TLS_KEY": str(server.key),
        "STEPLOG_HEALTH_PORT": str(health_port),
        "STEPLOG_METRICS_TLS_CERT": str(metrics_cert.cert),
        "STEPLOG_METRICS_TLS_KEY": str(metrics_cert.key),
        "STEPLOG_METRICS_BASIC_AUTH": str(auth_file),
    }
    if mutual:
        extra["STEPLOG_TLS_CLIENT_CA"] = str(ca.cert_path)
    log = folder / "service.log"
    service = TlsService(
        service_env,
        metrics_port=free_port(),
        log_path=log,
        extra_env=extra,
        health_port=health_port,
    )
    service.start()
    try:
        yield Setup(service, ca, ca.client(), other.client("stranger"), log)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def tls(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _start(service_env, tmp_path_factory.mktemp("tls"), mutual=False)


@pytest.fixture(scope="module")
def mtls(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _start(service_env, tmp_path_factory.mktemp("mtls"), mutual=True)


def _log_a_run(url: str, **connection: object) -> None:
    """The real client end to end: experiment, run, points, flush, query."""
    name = f"tls-{uuid.uuid4().hex[:10]}"
    run = Experiment(name, url=url, **connection).start_logging()  # type: ignore[arg-type]
    for step in range(50):
        run.log("loss", 1.0 / (step + 1), step=step)
    run.log("final", 0.5)
    assert run.flush(60)
    metrics = run.get_metrics()
    assert metrics["loss"] == [1.0 / (s + 1) for s in range(50)]
    assert metrics["final"] == 0.5
    run.complete()
    again = Run.get(run.id, url=url, **connection)  # type: ignore[arg-type]
    assert again.status == "Completed"


def _fails_to_connect(settings: ChannelSettings) -> ServiceError:
    client = Client(settings.target, "default", settings)
    with pytest.raises(ServiceError) as info:
        client.call(
            client.experiments.GetOrCreateExperiment,
            ex.GetOrCreateExperimentRequest(workspace="default", name="never"),
            timeout=3,
        )
    client.channel.close()
    return info.value


# -- TLS ---------------------------------------------------------------------------


def test_a_client_with_the_ca_logs_a_run(tls: Setup) -> None:
    _log_a_run(tls.url, tls_ca=tls.ca.cert_path)
    assert "TLS" in tls.log.read_text()  # the start line says how it serves


def test_a_client_with_the_ca_from_the_environment_logs_a_run(
    tls: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEPLOG_TLS_CA", str(tls.ca.cert_path))
    _log_a_run(tls.url)


def test_a_client_without_the_ca_fails(tls: Setup) -> None:
    # TLS with the system's CAs only: the test CA is not among them
    err = _fails_to_connect(ChannelSettings.resolve(tls.url, tls=True, env={}))
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # a CA that did not sign the server's certificate
    other = ChannelSettings.resolve(tls.url, tls_ca=tls.other_client.cert, env={})
    assert _fails_to_connect(other).code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    # plaintext against the TLS port
    plain = _fails_to_connect(ChannelSettings.resolve(tls.url, env={}))
    assert plain.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_health_port_is_plaintext_and_serves_only_health(tls: Setup) -> None:
    address = f"127.0.0.1:{tls.service.health_port}"
    assert healthcheck.check(address) == (True, "SERVING")
    with grpc.insecure_channel(address) as channel:
        stub = run_service_pb2_grpc.RunServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetRun(run_service_pb2.GetRunRequest(run_id="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- mutual TLS ----------------------------------------------------------------------


def test_mtls_a_client_with_a_certificate_of_the_ca_logs_a_run(mtls: Setup) -> None:
    _log_a_run(
        mtls.url, tls_ca=mtls.ca.cert_path, tls_cert=mtls.client.cert, tls_key=mtls.client.key
    )
    assert "client certificates required" in mtls.log.read_text()


def test_mtls_a_client_without_a_certificate_fails(mtls: Setup) -> None:
    err = _fails_to_connect(ChannelSettings.resolve(mtls.url, tls_ca=mtls.ca.cert_path, env={}))
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mtls_a_certificate_of_another_ca_fails(mtls: Setup) -> None:
    settings = ChannelSettings.resolve(
        mtls.url,
        tls_ca=mtls.ca.cert_path,
        tls_cert=mtls.other_client.cert,
        tls_key=mtls.other_client.key,
        env={},
    )
    err = _fails_to_connect(settings)
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mtls_environment_settings_log_a_run(mtls: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLOG_TLS_CA", str(mtls.ca.cert_path))
    monkeypatch.setenv("STEPLOG_TLS_CERT", str(mtls.client.cert))
    monkeypatch.setenv("STEPLOG_TLS_KEY", str(mtls.client.key))
    _log_a_run(mtls.url)


# -- /metrics over HTTPS with basic auth ------------------------------------------------


def _get(setup: Setup, auth: tuple[str, str] | None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(setup.ca.cert_path))
    request = urllib.request.Request(setup.metrics_url)
    if auth is not None:
        pair = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        assert err.headers.get("WWW-Authenticate", "").startswith("Basic ")
        return err.code, err.read().decode()


def test_metrics_over_https_needs_basic_auth(tls: Setup) -> None:
    assert _get(tls, None)[0] == 401
    assert _get(tls, (METRICS_USER, "wrong"))[0] == 401
    assert _get(tls, ("someone", METRICS_PASSWORD))[0] == 401
    status, text = _get(tls, (METRICS_USER, METRICS_PASSWORD))
    assert status == 200
    assert "steplog_" in text
    # twice: the remembered check answers alike
    assert _get(tls, (METRICS_USER, METRICS_PASSWORD))[0] == 200
    # plain HTTP to the HTTPS port gets nothing
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(
            f"http://127.0.0.1:{tls.service.metrics_port}/metrics", timeout=5
        ).read()
    # the password and its hash are nowhere in the service's log
    log = tls.log.read_text()
    assert METRICS_PASSWORD not in log
    assert "pbkdf2_sha256$" not in log


# -- tokens over TLS (auth=token), and over plaintext loopback -------------------------------


@pytest.fixture(scope="module")
def token_tls(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Setup, str]]:
    import asyncio

    from ingest.store.tokens import create_token

    env = {**service_env, "STEPLOG_AUTH": "token", "STEPLOG_TOKEN_PEPPER": "tls-test-pepper"}
    token = asyncio.run(
        create_token(
            env["STEPLOG_DATABASE_URL"], "tls-ws", "writer", "tls test", pepper="tls-test-pepper"
        )
    )
    for setup in _start(env, tmp_path_factory.mktemp("token-tls"), mutual=False):
        yield setup, token


def test_a_token_over_tls_logs_a_run(token_tls: tuple[Setup, str]) -> None:
    setup, token = token_tls
    name = f"tls-{uuid.uuid4().hex[:10]}"
    run = Experiment(
        "tls-ws", name, url=setup.url, token=token, tls_ca=setup.ca.cert_path
    ).start_logging()
    for step in range(20):
        run.log("loss", 1.0 / (step + 1), step=step)
    assert run.flush(60)
    assert run.get_metrics()["loss"] == [1.0 / (s + 1) for s in range(20)]
    run.complete()
    # the token never reaches the log
    assert token not in setup.log.read_text()


def test_without_the_token_tls_alone_is_not_enough(token_tls: tuple[Setup, str]) -> None:
    setup, _ = token_tls
    with pytest.raises(UnauthenticatedError):
        Experiment("tls-ws", "never", url=setup.url, token="", tls_ca=setup.ca.cert_path)
    with pytest.raises((UnauthenticatedError, PermissionDeniedError)):
        Experiment(
            "tls-ws",
            "never",
            url=setup.url,
            token="stl_AAAAAAAAAAAA_" + "B" * 43,
            tls_ca=setup.ca.cert_path,
        )


def test_a_token_over_plaintext_loopback_logs_a_run(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    import asyncio

    from ingest.store.tokens import create_token

    env = {**service_env, "STEPLOG_AUTH": "token", "STEPLOG_TOKEN_PEPPER": "plain-pepper"}
    token = asyncio.run(
        create_token(env["STEPLOG_DATABASE_URL"], "plain-ws", "writer", pepper="plain-pepper")
    )
    with ServiceProcess(env, log_path=tmp_path / "service.log") as service:
        url = f"127.0.0.1:{service.port}"
        _log_a_run_in(url, "plain-ws", token=token)
        with pytest.raises(UnauthenticatedError):
            Experiment("plain-ws", "never", url=url, token="")


def _log_a_run_in(url: str, workspace: str, **connection: object) -> None:
    run = Experiment(
        workspace,
        f"tok-{uuid.uuid4().hex[:10]}",
        url=url,
        **connection,  # type: ignore[arg-type]
    ).start_logging()
    run.log("loss", 0.5, step=0)
    assert run.flush(60)
    assert run.get_metrics() == {"loss": 0.5}
