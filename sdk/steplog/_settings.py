"""The one parser of the client's STEPLOG_* variables.

Every setting of the client is read here: one set of true/false words, one
way to write a size in bytes, and an error that names the variable and the
value it could not read. Callers give the environment (os.environ by
default) so tests pass their own mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from steplog.errors import InvalidArgumentError

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})
_BYTE_SUFFIXES = (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("B", 1))


class SettingError(InvalidArgumentError):
    """A STEPLOG_* variable (or the argument standing in for it) holds a value
    that cannot be read; the message names the variable and the value."""

    def __init__(self, name: str, raw: str, expected: str) -> None:
        super().__init__(f"{name}={raw!r}: {expected}", field=name)


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def parse_flag(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise SettingError(name, raw, "expected true or false (1/0, yes/no, on/off)")


def parse_int(name: str, raw: str) -> int:
    """An int; a variable whose name ends in _BYTES also takes a KiB, MiB,
    GiB or B suffix (`64MiB`, `0.5GiB`); `_` separates digits."""
    text = raw.strip().replace("_", "")
    try:
        if name.upper().endswith("_BYTES"):
            for suffix, factor in _BYTE_SUFFIXES:
                if text.endswith(suffix):
                    return int(float(text.removesuffix(suffix)) * factor)
        return int(text)
    except ValueError:
        pass
    unit = " (or with a KiB/MiB/GiB/B suffix)" if name.upper().endswith("_BYTES") else ""
    raise SettingError(name, raw, f"expected a whole number{unit}")


def parse_float(name: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise SettingError(name, raw, "expected a number") from None


def flag(name: str, default: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """A true/false variable; unset or empty is `default`."""
    raw = _env(environ).get(name)
    if raw is None or not raw.strip():
        return default
    return parse_flag(name, raw)


def number(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """A number of seconds (or any float); unset or empty is `default`."""
    raw = _env(environ).get(name)
    if raw is None or not raw.strip():
        return default
    return parse_float(name, raw)


def text(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """A string, stripped; unset or empty is `default`."""
    raw = _env(environ).get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip()


def path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    raw = text(name, environ=environ)
    return Path(raw).expanduser() if raw else None


def exit_timeout(environ: Mapping[str, str] | None = None) -> float:
    """STEPLOG_EXIT_TIMEOUT (30 s): the one deadline every background worker
    shares at interpreter exit (steplog._lifecycle)."""
    value = number("STEPLOG_EXIT_TIMEOUT", 30.0, environ)
    if not value >= 0:
        raise SettingError("STEPLOG_EXIT_TIMEOUT", str(value), "expected a number >= 0")
    return value
