"""Hyperparameters and training arguments as run properties.

Properties are strings the service bounds (a key of 1..255 characters
without control characters, a value of at most 5000 characters without NUL,
at most 1000 per run) and add-only (a key keeps its first value). Here a
nested dict / Namespace becomes flat `a/b` keys, every value a string that
fits, and what cannot be added (a key the run already has with another
value, the 1001st property) is left out with one warning instead of failing
the training.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from argparse import Namespace
from collections.abc import Mapping
from typing import Any, Protocol

log = logging.getLogger("steplog.integrations")

MAX_KEY = 255
MAX_VALUE = 5000
MAX_PROPERTIES = 1000
# One AddRunProperties call carries at most this many bytes of keys and
# values (well inside gRPC's default 4 MiB message).
MAX_CALL_BYTES = 1 << 20
TRUNCATED = "...[truncated]"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _HasProperties(Protocol):
    @property
    def properties(self) -> dict[str, str]: ...

    def refresh(self) -> None: ...

    def add_properties(self, properties: Mapping[str, str]) -> None: ...


def flatten(params: Mapping[str, Any] | Namespace, sep: str = "/") -> dict[str, Any]:
    """Nested dicts, Namespaces and dataclasses become `outer/inner` keys."""

    def items(value: Any) -> Mapping[str, Any] | None:
        if isinstance(value, Namespace):
            return vars(value)
        if isinstance(value, Mapping):
            return value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return None

    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        inner = items(value)
        if inner is None or (prefix and not inner):
            out[prefix] = value
            return
        for key, item in inner.items():
            walk(f"{prefix}{sep}{key}" if prefix else str(key), item)

    top = items(params)
    if top is None:
        raise TypeError(f"params must be a dict or a Namespace, not {type(params).__name__}")
    walk("", top)
    return out


def stringify(value: Any) -> str:
    """A property value: str() of it (a callable by its name, an enum by its
    value), NUL removed, at most 5000 characters."""
    if isinstance(value, enum.Enum):
        value = value.value
    if callable(value) and hasattr(value, "__qualname__"):
        text = f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    else:
        try:
            text = str(value)
        except Exception:  # a __str__ that raises
            text = f"<{type(value).__name__}>"
    text = text.replace("\x00", "")
    if len(text) > MAX_VALUE:
        text = text[: MAX_VALUE - len(TRUNCATED)] + TRUNCATED
    return text


def property_key(key: str) -> str:
    """A property key: control characters become '_', at most 255 characters."""
    return _CONTROL.sub("_", key)[:MAX_KEY]


def to_properties(params: Mapping[str, Any] | Namespace, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in flatten(params).items():
        name = property_key(prefix + key)
        if name:
            out.setdefault(name, stringify(value))
    return out


def add_properties(
    run: _HasProperties, properties: Mapping[str, str], *, fresh: bool = False
) -> int:
    """Add what the run can take; how many were sent. With `fresh` the run
    object's properties are current (no refresh call first)."""
    if not properties:
        return 0
    if not fresh:
        run.refresh()
    current = run.properties
    clash = sorted(k for k, v in properties.items() if k in current and current[k] != v)
    if clash:
        log.warning(
            "steplog: the run already has %d of these properties with other values (properties "
            "are add-only), kept as they were: %s",
            len(clash),
            ", ".join(clash[:10]) + (" ..." if len(clash) > 10 else ""),
        )
    new = {k: v for k, v in properties.items() if k not in current}
    room = MAX_PROPERTIES - len(current)
    if len(new) > room:
        log.warning(
            "steplog: a run holds at most %d properties; %d of these are left out",
            MAX_PROPERTIES,
            len(new) - max(room, 0),
        )
        new = dict(list(new.items())[: max(room, 0)])
    chunk: dict[str, str] = {}
    size = 0
    for key, value in new.items():
        item = len(key.encode()) + len(value.encode()) + 8
        if chunk and size + item > MAX_CALL_BYTES:
            run.add_properties(chunk)
            chunk, size = {}, 0
        chunk[key] = value
        size += item
    if chunk:
        run.add_properties(chunk)
    return len(new)


def numeric(value: Any) -> float | None:
    """A float for a number, a bool, or a one-element tensor / array; None
    for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item):
        try:
            count = size() if callable(size) else size
            if count in (None, 1):
                result = item()
                if isinstance(result, (bool, int, float)):
                    return float(result)
        except Exception:
            return None
    return None
