"""The README documents every setting of the service and of the client writer."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ingest.config import Config
from steplog._writer import WriterSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_service_setting_is_in_the_configuration_table() -> None:
    missing = [
        f.name
        for f in fields(Config)
        if f"`STEPLOG_{f.name.upper()}`" not in README
        or f"`--{f.name.replace('_', '-')}`" not in README
    ]
    assert not missing, f"README configuration table lacks {missing}"


def test_every_writer_setting_is_documented() -> None:
    missing = [f.name for f in fields(WriterSettings) if f"STEPLOG_{f.name.upper()}" not in README]
    assert not missing, f"README client settings lack {missing}"


def test_the_two_commands_are_in_the_quickstart() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quickstart and "make test" in quickstart
