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
