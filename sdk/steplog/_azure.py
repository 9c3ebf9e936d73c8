"""What the Azure ML v1 compatibility of `Experiment` and `Run` shares.

Parameters that only mean something inside Azure (a datastore, a snapshot
directory, a compute target) are accepted and ignored with one warning per
process and parameter, so a ported script runs. Methods that belong to the
rest of Azure ML (models, environments, snapshots, compute, submission) raise
`NotApplicableError` naming the steplog way where there is one.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import NoReturn

from steplog import _settings
from steplog.errors import InvalidArgumentError, NotApplicableError


class AzureCompatibilityWarning(UserWarning):
    """An Azure ML parameter that has no meaning in steplog was ignored."""


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def ignored(method: str, parameter: str, why: str = "it has no meaning outside Azure ML") -> None:
    """Warn once per process that `method` ignores `parameter`."""
    with _warned_lock:
        if (method, parameter) in _warned:
            return
        _warned.add((method, parameter))
    warnings.warn(
        f"steplog: {method}({parameter}=...) is accepted and ignored: {why}",
        AzureCompatibilityWarning,
        stacklevel=3,
    )


def not_applicable(method: str, instead: str) -> NoReturn:
    raise NotApplicableError(
        f"{method} is part of Azure ML, not of a run-history service; steplog does not "
        f"provide it. {instead}"
    )


def strict() -> bool:
    """STEPLOG_AZURE_STRICT=1: Azure ML's own rules where steplog's are wider
    (today: the experiment-name rule)."""
    return _settings.flag("STEPLOG_AZURE_STRICT")


# Azure ML's experiment-name rule: 3 to 36 characters, starting with a letter
# or a digit, of letters, digits, '_' and '-'.
AZURE_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,35}")


def check_azure_experiment_name(name: str) -> None:
    if not AZURE_EXPERIMENT_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid experiment name {name!r} under STEPLOG_AZURE_STRICT: Azure ML's rule is "
            "3..36 characters of letters, digits, '_' and '-', starting with a letter or digit",
            field="name",
        )


def property_filter(
    properties: Mapping[str, str] | Iterable[str] | str | None,
) -> tuple[dict[str, str], list[str]]:
    """Azure's `properties` filter: "key" (the run has that property), a
    dict {key: value} (it has it with that value), or several keys. Returns
    (key -> value to match, keys that must be present)."""
    if properties is None:
        return {}, []
    if isinstance(properties, str):
        return {}, [properties]
    if isinstance(properties, Mapping):
        values: dict[str, str] = {}
        keys: list[str] = []
        for k, v in properties.items():
            if v is None:
                keys.append(str(k))
            else:
                values[str(k)] = str(v)
        return values, keys
    try:
        keys = [k for k in properties]
    except TypeError:
        raise InvalidArgumentError(
            f"properties must be a key, keys or a dict, not {type(properties).__name__}",
            field="properties",
        ) from None
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise InvalidArgumentError(
            f"property keys must be strings; found {bad[0]!r}", field="properties"
        )
    return {}, keys
