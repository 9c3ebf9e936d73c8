"""Server-side TLS settings and the /metrics basic-auth check, without a
service: cross-setting rules, files that cannot serve, password hashes, the
WSGI check in front of the exposition."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from ingest import config, tls
from ingest.config import Config
from ingest.observe.metrics_http import BasicAuth, PasswordHash, make_hash, parse_basic_auth
from tests.tlscerts import CertificateAuthority


def test_tls_settings_parse_from_flags_and_environment() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.from_sources(
        parser.parse_args(["--tls-cert", "/c.pem", "--health-port", "9000"]),
        {"STEPLOG_TLS_KEY": "/k.pem", "STEPLOG_TLS_CLIENT_CA": "/ca.pem"},
    )
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == ("/c.pem", "/k.pem", "/ca.pem")
    assert cfg.health_port == 9000
    assert Config().tls_cert == "" and Config().health_port == 0
    with pytest.raises(config.ConfigError, match="STEPLOG_HEALTH_PORT"):
        config.from_sources(None, {"STEPLOG_HEALTH_PORT": "70000"})


def test_the_basic_auth_setting_is_never_shown() -> None:
    cfg = Config(metrics_basic_auth="prometheus:sha256:" + "ab" * 32)
    assert "abab" not in config.describe(cfg)
    assert "metrics_basic_auth=***" in config.describe(cfg)


def test_cross_setting_rules() -> None:
    with pytest.raises(ValueError, match="go together"):
        tls.check_settings(Config(tls_cert="/c.pem"))
    with pytest.raises(ValueError, match="needs TLS on"):
        tls.check_settings(Config(tls_client_ca="/ca.pem"))
    with pytest.raises(ValueError, match="--metrics-tls-cert and --metrics-tls-key"):
        tls.check_settings(Config(metrics_tls_key="/k.pem"))
    assert tls.server_credentials(Config()) is None


def test_files_that_cannot_serve_fail_at_start(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    a, b = ca.server("a"), ca.server("b")
    with pytest.raises(ValueError, match="--tls-cert: cannot read"):
        tls.server_credentials(Config(tls_cert=str(tmp_path / "none"), tls_key=str(a.key)))
    with pytest.raises(ValueError, match="do not load as a pair"):
        tls.server_credentials(Config(tls_cert=str(a.cert), tls_key=str(b.key)))
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(ValueError, match=r"--tls-client-ca: .* is not a PEM file"):
        tls.server_credentials(
            Config(tls_cert=str(a.cert), tls_key=str(a.key), tls_client_ca=str(tmp_path / "junk"))
        )
    assert tls.server_credentials(Config(tls_cert=str(a.cert), tls_key=str(a.key))) is not None


def test_a_changed_certificate_is_reloaded_and_a_broken_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = CertificateAuthority(tmp_path)
    pem = ca.server()
    files = tls._Files(str(pem.cert), str(pem.key), "")
    reloader = tls._Reloader(files)
    monkeypatch.setattr(tls, "RELOAD_CHECK_S", 0.0)
    assert reloader() is None  # unchanged
    renewed = ca.server("renewed")
    pem.cert.write_bytes(renewed.cert_bytes())
    pem.key.write_bytes(renewed.key_bytes())
    assert reloader() is not None  # new connections get the renewed pair
    assert reloader() is None
    pem.key.write_text("half-written")
    assert reloader() is None  # keeps the pair in use


def test_password_hashes() -> None:
    hashed = make_hash("s3cret", iterations=10_000)
    assert hashed.startswith("pbkdf2_sha256$10000$") and "s3cret" not in hashed
    parsed = PasswordHash.parse(hashed)
    assert parsed.matches("s3cret") and not parsed.matches("s3cret ")
    sha = PasswordHash.parse("sha256:" + hashlib.sha256(b"long-random").hexdigest())
    assert sha.matches("long-random") and not sha.matches("other")
    for bad, reason in (
        ("plaintext", "a password hash is"),
        ("sha256:abcd", "64 hex digits"),
        ("pbkdf2_sha256$10$salt$00", "at least 10000"),
        ("$2b$12$abcdefghijklmnopqrstuv", "bcrypt hashes are not supported"),
    ):
        with pytest.raises(ValueError, match=reason):
            PasswordHash.parse(bad)


def test_basic_auth_from_a_value_or_a_file(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"pw").hexdigest()
    assert set(parse_basic_auth(f"prom:sha256:{digest}")) == {"prom"}
    users = tmp_path / "users"
    users.write_text(f"# scrapers\n\nprom:sha256:{digest}\nother:{make_hash('x', 10_000)}\n")
    assert set(parse_basic_auth(str(users))) == {"prom", "other"}
    users.write_text("prom:secret-in-clear\n")
    with pytest.raises(ValueError, match="line 1 \\(user 'prom'\\)") as info:
        parse_basic_auth(str(users))
    assert "secret-in-clear" not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        parse_basic_auth(str(tmp_path / "missing"))
    assert parse_basic_auth("") == {}


def test_the_check_answers_401_without_the_right_credentials() -> None:
    users = {"prom": PasswordHash.parse(make_hash("pw", 10_000))}
    app = BasicAuth(users, lambda environ, start: (start("200 OK", []), [b"metrics"])[1])

    def call(header: str | None) -> tuple[str, list[Any]]:
        seen: list[Any] = []

        def start(status: str, headers: list[Any]) -> None:
            seen.extend([status, headers])

        environ = {} if header is None else {"HTTP_AUTHORIZATION": header}
        body = b"".join(app(environ, start))
        return seen[0], [seen[1], body]

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert call(None)[0].startswith("401")
    assert ("WWW-Authenticate", 'Basic realm="steplog metrics", charset="UTF-8"') in call(None)[1][
        0
    ]
    assert call(basic("prom", "wrong"))[0].startswith("401")
    assert call(basic("nobody", "pw"))[0].startswith("401")
    assert call("Bearer pw")[0].startswith("401")
    assert call("Basic !!!")[0].startswith("401")
    status, (_, body) = call(basic("prom", "pw"))
    assert status == "200 OK" and body == b"metrics"
    assert call(basic("prom", "pw"))[0] == "200 OK"  # remembered
    assert call(basic("prom", "pw2"))[0].startswith("401")
