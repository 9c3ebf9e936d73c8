"""Configuration: flag, then environment, then default; bad values name the variable."""

from __future__ import annotations

import argparse

import pytest

from ingest import config


def parse(argv: list[str], env: dict[str, str]) -> config.Config:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_sources(parser.parse_args(argv), env)


def test_defaults() -> None:
    cfg = parse([], {})
    assert cfg.listen == "127.0.0.1:50051" and cfg.pipeline_workers == 2


def test_env_then_flag() -> None:
    env = {"STEPLOG_LISTEN": "127.0.0.1:7000", "STEPLOG_PIPELINE_WORKERS": "4"}
    cfg = parse([], env)
    assert cfg.listen == "127.0.0.1:7000" and cfg.pipeline_workers == 4
    cfg = parse(["--listen", "127.0.0.1:8000"], env)
    assert cfg.listen == "127.0.0.1:8000" and cfg.pipeline_workers == 4


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"STEPLOG_PIPELINE_WORKERS": "zero"}, "STEPLOG_PIPELINE_WORKERS"),
        ({"STEPLOG_PIPELINE_WORKERS": "0"}, "must be > 0"),
        ({"STEPLOG_LISTEN": "nowhere"}, "HOST:PORT"),
        ({"STEPLOG_METRICS_PORT": "70000"}, "STEPLOG_METRICS_PORT"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(config.ConfigError, match=needle):
        parse([], env)


def test_config_is_frozen() -> None:
    cfg = parse([], {})
    with pytest.raises(AttributeError):
        cfg.listen = "x"  # type: ignore[misc]


def test_describe_hides_secrets() -> None:
    cfg = config.Config(s3_secret_key="topsecret", database_url="postgresql://u:pw@h:1/db")
    text = config.describe(cfg)
    assert "topsecret" not in text and "pw@" not in text


# (DSN, the password in it, what must still show)
DSNS = [
    ("postgresql://u:Qx7@h/db", "Qx7", "postgresql://u:***@h/db"),
    ("postgres://:Qx7@h", "Qx7", "postgres://:***@h"),
    ("postgresql://h/db?password=Qx7", "Qx7", "postgresql://h/db?password=***"),
    ("postgresql://u@h/db?sslmode=require&password=hunter2", "hunter2", "sslmode=require"),
    ("postgresql://u@h/db?PASSWORD=hunter2", "hunter2", "postgresql://u@h/db"),
    ("postgresql://u@h/db?sslpassword=keyQz9", "keyQz9", "postgresql://u@h/db"),
    ("postgresql://u@h/db?pass%77ord=hunter2", "hunter2", "postgresql://u@h/db"),
    ("postgresql:///db?host=/run/pg&password=hunter2", "hunter2", "/db?host="),
    ("postgresql://steplog:s3cr3t@db1:5432,db2:5433/steplog", "s3cr3t", "db1:5432,db2:5433"),
    ("postgresql://u:Qx%40ss%3Aword@h/db", "Qx%40ss", "postgresql://u:***@h/db"),
    ("postgresql://a@b:c%2Fd@h/db", "c%2Fd", "@h/db"),
    ("postgresql://u:pa/ss@h/db", "pa/ss", "@h/db"),
    ("postgresql://u:pa?ss@h/db", "pa?ss", "@h/db"),
    ("postgresql://u:pa#ss@h/db", "pa#ss", "@h/db"),
    ("postgresql://h/db?password=Qx@Zy", "Zy", "postgresql://"),
    ("postgresql://u:hunter2@[::1/db", "hunter2", "postgresql://u:***@"),
    ("postgresql://postgres@127.0.0.1:5432/steplog", "", "postgresql://postgres@127.0.0.1:5432/steplog"),
    ("host=h password=hunter2 dbname=x", "hunter2", "host=h password=*** dbname=x"),
    ("host=h password = 'hun ter2' dbname=x", "hun ter2", "dbname=x"),
]  # fmt: skip


@pytest.mark.parametrize("dsn,password,kept", DSNS)
def test_redact_url_hides_every_password(dsn: str, password: str, kept: str) -> None:
    text = config.redact_url(dsn)
    if password:
        assert password not in text, text
        for part in (password[:3], password[-3:]) if len(password) > 3 else ():
            assert part not in text, text
    assert kept in text, text


@pytest.mark.parametrize("dsn,password,kept", DSNS)
def test_the_startup_line_never_shows_a_password(dsn: str, password: str, kept: str) -> None:
    cfg = config.Config(
        database_url=dsn,
        s3_secret_key="s3-secret-value",
        s3_endpoint="http://key:endpoint-secret@127.0.0.1:8333",
    )
    text = config.describe(cfg)
    assert "s3-secret-value" not in text and "endpoint-secret" not in text
    if password:
        assert password not in text
    assert "s3_secret_key=***" in text and "s3_endpoint=http://key:***@127.0.0.1:8333" in text


def test_an_empty_secret_shows_as_empty() -> None:
    assert "s3_secret_key= " in config.describe(config.Config()) + " "


def test_a_bad_value_of_a_secret_setting_is_not_echoed() -> None:
    assert config.shown("s3_secret_key", "x") == "***"
    assert config.shown("database_url", "postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_reuse_port_is_off_unless_asked_for() -> None:
    assert parse([], {}).reuse_port is False
    assert parse([], {"STEPLOG_REUSE_PORT": "true"}).reuse_port is True
    assert parse(["--reuse-port", "0"], {"STEPLOG_REUSE_PORT": "true"}).reuse_port is False
    with pytest.raises(config.ConfigError, match="STEPLOG_REUSE_PORT"):
        parse([], {"STEPLOG_REUSE_PORT": "maybe"})


@pytest.mark.parametrize("listen", ["::1:50051", "[::1:50051", ":50051", "h:65536", "h:"])
def test_bad_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(config.ConfigError, match="STEPLOG_LISTEN"):
        parse([], {"STEPLOG_LISTEN": listen})


@pytest.mark.parametrize("listen", ["[::1]:50051", "localhost:0", "0.0.0.0:50051"])
def test_good_listen_addresses(listen: str) -> None:
    assert parse([], {"STEPLOG_LISTEN": listen}).listen == listen


def test_scrub_removes_every_secret_from_a_message() -> None:
    cfg = config.Config(
        database_url="postgresql://u:Hunter2@h/db?sslpassword=KeyPass9",
        s3_secret_key="S3-secret-value",
    )
    text = config.scrub("failed: Hunter2 / KeyPass9 / S3-secret-value / h/db", cfg)
    assert text == "failed: *** / *** / *** / h/db"
    keyword = config.Config(database_url="host=h password='Hun ter2' dbname=x")
    assert config.scrub("x Hun ter2 y", keyword) == "x *** y"
