"""The workspace of a request (ingest/api/auth.py, rule 4): an empty
`workspace` field is given the token's, one naming another workspace is
Denied before the servicer sees it; raw (unparsed) ingest requests are
scanned at the top level only, the batch inside is skipped."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ingest.api.principal import WORKSPACE, Denied, Principal
from ingest.core.errors import ApiError


def _plan(descriptor: Any) -> tuple[str, ...] | None:
    """How to reach a request's workspace: () for a top-level `workspace`
    field, (name,) for one inside a singular message field (an upload's
    header), None when the message has none."""
    fields = descriptor.fields_by_name
    ws = fields.get("workspace")
    if ws is not None and ws.type == FieldDescriptor.TYPE_STRING:
        return ()
    for f in descriptor.fields:
        if f.type != FieldDescriptor.TYPE_MESSAGE or f.message_type is None or f.is_repeated:
            continue
        inner = f.message_type.fields_by_name.get("workspace")
        if inner is not None and inner.type == FieldDescriptor.TYPE_STRING:
            return (f.name,)
    return None


_PLANS: dict[str, tuple[str, ...] | None] = {}


def workspace_plan(descriptor: Any) -> tuple[str, ...] | None:
    try:
        return _PLANS[descriptor.full_name]
    except KeyError:
        plan = _PLANS[descriptor.full_name] = _plan(descriptor)
        return plan


def _other_workspace(named: str, principal: Principal) -> Denied:
    return Denied(
        grpc.StatusCode.PERMISSION_DENIED,
        WORKSPACE,
        f"workspace {named[:70]!r} is not this token's workspace ({principal.workspace!r});"
        " leave workspace empty or name the token's own",
        principal.token_id,
        principal.name,
        field="workspace",
    )


def scope_message(message: Message, principal: Principal) -> None:
    """Fill an empty workspace with the token's; Denied for another one."""
    plan = workspace_plan(message.DESCRIPTOR)
    if plan is None:
        return
    target = message
    for name in plan:
        if not target.HasField(name):
            return  # an upload's chunk: its header was checked
        target = getattr(target, name)
    named = target.workspace  # type: ignore[attr-defined]
    if not named:
        target.workspace = principal.workspace  # type: ignore[attr-defined]
    elif named != principal.workspace:
        raise _other_workspace(named, principal)


# Top-level fields of a raw request scanned at most (a real one has two).
MAX_RAW_FIELDS = 64


class MalformedRequest(ApiError):
    def __init__(self, what: str) -> None:
        super().__init__("INVALID_ARGUMENT", f"malformed request: {what}", "")


def _varint(data: bytes | memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise MalformedRequest("a truncated or overlong varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def raw_workspace(data: bytes) -> bytes | None:
    """The last value of field 1 (`workspace`, a string) among a serialized
    message's top-level fields, or None; the batch inside is skipped, not parsed."""
    view = memoryview(data)
    i, n, found, count = 0, len(data), None, 0
    while i < n:
        count += 1
        if count > MAX_RAW_FIELDS:
            raise MalformedRequest(f"more than {MAX_RAW_FIELDS} top-level fields")
        key, i = _varint(view, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedRequest("field number 0")
        if wire == 0:
            _, i = _varint(view, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(view, i)
            if number == 1:
                found = bytes(view[i : i + length])
            i += length
        else:
            raise MalformedRequest(f"wire type {wire} at the top level")
        if i > n:
            raise MalformedRequest("a field runs past the end of the message")
    return found


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def scope_raw(data: bytes, principal: Principal) -> bytes:
    """The raw-request form of scope_message: the same bytes when the
    workspace is the token's, the bytes plus a workspace field when it is empty."""
    found = raw_workspace(data)
    mine = principal.workspace.encode()
    if found == mine:
        return data
    if found:
        raise _other_workspace(found.decode(errors="replace"), principal)
    return data + b"\x0a" + _encode_varint(len(mine)) + mine


def scope(request: Any, principal: Principal) -> Any:
    if isinstance(request, bytes):
        return scope_raw(request, principal)
    if isinstance(request, Message):
        scope_message(request, principal)
    return request  # e.g. the request guard's Malformed: the guard answers it
