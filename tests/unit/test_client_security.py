"""The client's connection settings: the token goes on every call, and never
in plaintext to a host that is not loopback unless explicitly allowed; TLS and
client certificates from arguments or the environment, checked at
configuration time.

The refusals need no network at all (they happen before a channel opens).
Where the token must arrive, a small gRPC server in this process on loopback
records the metadata of every call (a unary call and an Ingest stream), over
plaintext (the client's interceptor) and over TLS (call credentials).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from steplog import Experiment, Run
from steplog._channel import ChannelSettings, is_loopback_target
from steplog._writer.transport import GrpcTransport, TransportError
from steplog.client import Client, get_client
from steplog.errors import InvalidArgumentError, NotFoundError
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import run_service_pb2 as rs
from tests.tlscerts import CertificateAuthority

TOKEN = "stl_abcdefghijkl_c2VjcmV0LXBhcnQtb2YtdGhlLXRva2VuLXRoYXQtaXMtbG9uZw"


def test_loopback_targets() -> None:
    for target in (
        "127.0.0.1:50051",
        "127.3.4.5:1",
        "[::1]:50051",
        "localhost:50051",
        "LOCALHOST.:50051",
        "svc.localhost:9",
        "dns:///localhost:50051",
        "ipv4:127.0.0.1:50051",
        "unix:/tmp/steplog.sock",
    ):
        assert is_loopback_target(target), target
    for target in (
        "10.0.0.5:50051",
        "0.0.0.0:50051",
        "[::]:50051",
        "steplog.example.com:443",
        "localhost.example.com:50051",
        "dns:///steplog:50051",
        "[2001:db8::1]:50051",
        "127.0.0.1.nip.io:50051",
    ):
        assert not is_loopback_target(target), target


def test_a_token_in_plaintext_to_a_remote_host_is_refused_at_configuration() -> None:
    with pytest.raises(InvalidArgumentError, match="refusing to send the token") as info:
        ChannelSettings.resolve("10.0.0.5:50051", token=TOKEN, env={})
    assert info.value.field == "token"
    assert TOKEN not in str(info.value)
    assert "STEPLOG_ALLOW_INSECURE_TOKEN" in str(info.value)
    # from the environment alike
    with pytest.raises(InvalidArgumentError, match="refusing"):
        ChannelSettings.resolve("steplog.internal:50051", env={"STEPLOG_TOKEN": TOKEN})
    # through the public API, before any call (the address does not exist)
    with pytest.raises(InvalidArgumentError, match="refusing"):
        Experiment("x", url="192.0.2.1:50051", token=TOKEN)
    with pytest.raises(InvalidArgumentError, match="refusing"):
        Run.get("r", url="192.0.2.1:50051", token=TOKEN)


def test_explicit_opt_in_tls_or_loopback_allow_the_token(tmp_path: Path) -> None:
    s = ChannelSettings.resolve("10.0.0.5:50051", token=TOKEN, allow_insecure_token=True, env={})
    assert s.token == TOKEN and not s.tls
    s = ChannelSettings.resolve(
        "10.0.0.5:50051", env={"STEPLOG_TOKEN": TOKEN, "STEPLOG_ALLOW_INSECURE_TOKEN": "true"}
    )
    assert s.allow_insecure_token
    assert ChannelSettings.resolve("127.0.0.1:1", token=TOKEN, env={}).token == TOKEN
    assert ChannelSettings.resolve("localhost:1", token=TOKEN, env={}).token == TOKEN
    # TLS with the system CAs: by URL scheme or by setting
    s = ChannelSettings.resolve("grpcs://steplog.example.com:443/", token=TOKEN, env={})
    assert s.tls and s.target == "steplog.example.com:443"
    s = ChannelSettings.resolve("steplog.example.com:443", env={"STEPLOG_TLS": "yes"}, token=TOKEN)
    assert s.tls and s.ca is None
    # TLS with a CA file
    ca = CertificateAuthority(tmp_path)
    s = ChannelSettings.resolve(
        "steplog.example.com:443", env={"STEPLOG_TLS_CA": str(ca.cert_path), "STEPLOG_TOKEN": TOKEN}
    )
    assert s.tls and s.ca == ca.cert_path.read_bytes()
    # no token, no refusal
    assert ChannelSettings.resolve("10.0.0.5:50051", env={}).token == ""


def test_the_token_is_never_in_repr() -> None:
    s = ChannelSettings.resolve("127.0.0.1:1", token=TOKEN, env={})
    assert TOKEN not in repr(s)


def test_bad_tls_settings_are_clear(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    client = ca.client()
    with pytest.raises(InvalidArgumentError, match="STEPLOG_TLS_CA: cannot read"):
        ChannelSettings.resolve("h:1", tls_ca=str(tmp_path / "missing.pem"), env={})
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidArgumentError, match="is not PEM"):
        ChannelSettings.resolve("h:1", env={"STEPLOG_TLS_CA": str(tmp_path / "junk.pem")})
    with pytest.raises(InvalidArgumentError, match="needs its key") as info:
        ChannelSettings.resolve("h:1", tls_cert=client.cert, env={})
    assert info.value.field == "tls_key"
    with pytest.raises(InvalidArgumentError, match="TLS is turned off"):
        ChannelSettings.resolve("h:1", tls=False, tls_ca=ca.cert_path, env={})
    with pytest.raises(InvalidArgumentError, match="STEPLOG_TLS="):
        ChannelSettings.resolve("h:1", env={"STEPLOG_TLS": "maybe"})
    with pytest.raises(InvalidArgumentError, match="whitespace"):
        ChannelSettings.resolve("127.0.0.1:1", token="two words", env={})
    # a client certificate turns TLS on; PEM bytes work as well as paths
    s = ChannelSettings.resolve(
        "h:1", tls_cert=client.cert_bytes(), tls_key=client.key_bytes(), env={}
    )
    assert s.tls and s.cert == client.cert_bytes()


class Recorder(grpc.GenericRpcHandler):
    """Answers every method NOT_FOUND and records the metadata it came with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, {k: str(v) for k, v in context.invocation_metadata()}))

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method

        def unary(request: bytes, context: grpc.ServicerContext) -> Any:
            self._record(method, context)
            context.abort(grpc.StatusCode.NOT_FOUND, "recorded")

        def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            self._record(method, context)
            next(requests, None)
            context.abort(grpc.StatusCode.NOT_FOUND, "recorded")
            yield b""  # pragma: no cover

        if method.endswith("/Ingest"):
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, grpc.Server]]:
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[rec])
    yield rec, server
    server.stop(0)


def _calls_carry_the_token(client: Client, rec: Recorder) -> None:
    with pytest.raises(NotFoundError):
        client.call(client.runs.GetRun, rs.GetRunRequest(run_id="r"), timeout=10)
    done = threading.Event()
    errors: list[TransportError | None] = []

    def on_done(err: TransportError | None) -> None:
        errors.append(err)
        done.set()

    stream = GrpcTransport(client.channel).open_stream(lambda r: None, on_done)
    stream.send(pb.IngestRequest())
    assert done.wait(10)
    stream.close()
    assert errors[0] is not None and errors[0].code == grpc.StatusCode.NOT_FOUND
    methods = [m for m, _ in rec.calls]
    assert methods == ["/steplog.v1.RunService/GetRun", "/steplog.v1.IngestService/Ingest"]
    for _, metadata in rec.calls:
        assert metadata.get("authorization") == f"Bearer {TOKEN}"


def test_the_token_goes_on_every_call_over_plaintext_loopback(
    recorder: tuple[Recorder, grpc.Server],
) -> None:
    rec, server = recorder
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = get_client(f"127.0.0.1:{port}", "ws", token=TOKEN)
    _calls_carry_the_token(client, rec)
    # a forked child's channel (the writer's factory) carries it too
    rec.calls.clear()
    with pytest.raises(grpc.RpcError):
        client.runs.__class__(client.new_channel()).GetRun(rs.GetRunRequest(), timeout=10)
    assert rec.calls[0][1].get("authorization") == f"Bearer {TOKEN}"


def test_the_token_goes_on_every_call_over_tls(
    recorder: tuple[Recorder, grpc.Server], tmp_path: Path
) -> None:
    rec, server = recorder
    ca = CertificateAuthority(tmp_path)
    cert = ca.server()
    credentials = grpc.ssl_server_credentials([(cert.key_bytes(), cert.cert_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    client = get_client(f"localhost:{port}", "ws", token=TOKEN, tls_ca=ca.cert_path)
    assert client.settings.tls
    _calls_carry_the_token(client, rec)


def test_without_a_token_no_authorization_is_sent(
    recorder: tuple[Recorder, grpc.Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEPLOG_TOKEN", raising=False)
    rec, server = recorder
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = get_client(f"127.0.0.1:{port}", "ws")
    with pytest.raises(NotFoundError):
        client.call(client.runs.GetRun, rs.GetRunRequest(run_id="r"), timeout=10)
    assert "authorization" not in rec.calls[0][1]


def test_clients_with_other_tokens_are_apart() -> None:
    a = get_client("127.0.0.1:1", "ws", token="stl_a_1")
    b = get_client("127.0.0.1:1", "ws", token="stl_b_2")
    assert a is not b
    assert get_client("127.0.0.1:1", "ws", token="stl_a_1") is a
