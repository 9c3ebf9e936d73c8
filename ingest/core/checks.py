"""What a string from a client may hold: one definition for every module. Pure.

Two kinds of string reach the service. Identifiers (names, ids, keys, paths,
types) may not contain control characters: nothing a user means by a name
has a tab or a NUL in it. Free text (descriptions, display names, error
messages, tag and property values) may hold tabs and newlines, but never NUL,
which PostgreSQL text cannot store: a NUL that reached SQL would fail the
whole transaction it is part of, other writers' batches included.

Protobuf already refuses invalid UTF-8 in string fields when it parses a
message (that becomes INVALID_ARGUMENT in ingest.api.guard), so every
Python string here is valid Unicode; what is left to check is NUL, control
characters and length.

`check_strings` walks the string fields of a small request message (every
unary request outside ingest, and the header of an upload) and raises
INVALID_ARGUMENT naming the first bad field, for example ``names[2]`` or
``set_tags[0].key``. The ingest batch path checks its strings where it
decodes them (ingest.core.decode, ingest.core.validate, ingest.core.tables), without walking
the message again. Field-specific rules (what a run id or an experiment name
looks like) stay with the code that knows the field (ingest.core.model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ingest.core.errors import invalid

# C0 controls and DEL: refused in every identifier.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Label keys: what a Prometheus label name allows (and a JSON key never escapes).
# (Matched with fullmatch: "$" alone would let a trailing newline through.)
LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# Longest identifier and free text a request may carry, in characters; the
# field-specific rules are tighter (255 for most names, 1024 for paths).
MAX_IDENTIFIER_CHARS = 1024
MAX_TEXT_CHARS = 100_000
# Most entries of one repeated or map field of a unary request.
MAX_REPEATED = 10_000

# Fields whose strings are free text; every other string field is an identifier.
FREE_TEXT_FIELDS = frozenset({"description", "display_name", "message", "value"})
# Map fields whose values are identifiers too (label values are series identity).
IDENTIFIER_MAPS = frozenset({"labels"})


def has_control(value: str) -> bool:
    return CONTROL.search(value) is not None


def label_key_ok(key: str) -> bool:
    return LABEL_KEY.fullmatch(key) is not None


def identifier_problem(value: str, limit: int = MAX_IDENTIFIER_CHARS) -> str | None:
    """Why value cannot be an identifier, or None."""
    if len(value) > limit:
        return f"longer than {limit} characters ({len(value)})"
    if "\x00" in value:
        return "contains a NUL character"
    if has_control(value):
        return "contains a control character"
    return None


def text_problem(value: str, limit: int = MAX_TEXT_CHARS) -> str | None:
    """Why value cannot be stored as free text, or None."""
    if len(value) > limit:
        return f"longer than {limit} characters ({len(value)})"
    if "\x00" in value:
        return "contains a NUL character"
    return None


def clip(value: str, limit: int = 120) -> str:
    """value cut to limit characters, marked when cut (for messages and examples)."""
    return value if len(value) <= limit else value[:limit] + "…"


# -- the walker --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    repeated: bool
    # "string", "message", "map" (checked); other scalar and bytes fields are skipped.
    kind: str
    free_text: bool
    # For maps: whether the value is a message, and whether it is free text.
    map_value_message: bool = False
    map_value_free: bool = False


_PLANS: dict[str, tuple[_Field, ...]] = {}


def _plan(desc: Any) -> tuple[_Field, ...]:
    """The string-bearing fields of a message type, computed once per type."""
    found = _PLANS.get(desc.full_name)
    if found is not None:
        return found
    fields: list[_Field] = []
    for fd in desc.fields:
        repeated = bool(fd.is_repeated)
        if fd.type == FieldDescriptor.TYPE_STRING:
            fields.append(_Field(fd.name, repeated, "string", fd.name in FREE_TEXT_FIELDS))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            mt: Any = fd.message_type
            if mt.GetOptions().map_entry:
                value_fd = mt.fields_by_name["value"]
                fields.append(
                    _Field(
                        fd.name,
                        True,
                        "map",
                        False,
                        map_value_message=value_fd.type == FieldDescriptor.TYPE_MESSAGE,
                        map_value_free=fd.name not in IDENTIFIER_MAPS
                        and value_fd.type == FieldDescriptor.TYPE_STRING,
                    )
                )
            else:
                fields.append(_Field(fd.name, repeated, "message", False))
    plan = tuple(fields)
    _PLANS[desc.full_name] = plan
    return plan


def _check_one(value: str, path: str, free: bool) -> None:
    problem = text_problem(value) if free else identifier_problem(value)
    if problem is not None:
        raise invalid(path, problem)


def check_strings(message: Message, prefix: str = "", depth: int = 0) -> None:
    """Raise INVALID_ARGUMENT naming the first string field (or map key) of
    message that holds NUL, a control character where an identifier is
    expected, or more characters than any field may hold; also a repeated
    field with more than MAX_REPEATED entries. Bytes fields are never read
    (an upload chunk is not copied)."""
    if depth > 16:
        raise invalid(prefix, "nested too deeply")
    for f in _plan(message.DESCRIPTOR):
        path = f"{prefix}{f.name}"
        if f.kind == "string":
            if f.repeated:
                values = getattr(message, f.name)
                if len(values) > MAX_REPEATED:
                    raise invalid(path, f"{len(values)} entries; the limit is {MAX_REPEATED}")
                for i, v in enumerate(values):
                    _check_one(v, f"{path}[{i}]", f.free_text)
            else:
                _check_one(getattr(message, f.name), path, f.free_text)
        elif f.kind == "message":
            if f.repeated:
                items = getattr(message, f.name)
                if len(items) > MAX_REPEATED:
                    raise invalid(path, f"{len(items)} entries; the limit is {MAX_REPEATED}")
                for i, item in enumerate(items):
                    check_strings(item, f"{path}[{i}].", depth + 1)
            elif message.HasField(f.name):
                check_strings(getattr(message, f.name), f"{path}.", depth + 1)
        else:
            entries: Any = getattr(message, f.name)
            if len(entries) > MAX_REPEATED:
                raise invalid(path, f"{len(entries)} entries; the limit is {MAX_REPEATED}")
            for key, value in entries.items():
                if isinstance(key, str):
                    problem = identifier_problem(key)
                    if problem is not None:
                        raise invalid(path, f"a key {problem}")
                    where = f"{path}[{clip(key, 60)}]"
                else:
                    where = f"{path}[{key}]"
                if f.map_value_message:
                    check_strings(value, f"{where}.", depth + 1)
                elif isinstance(value, str):
                    _check_one(value, where, f.map_value_free)
