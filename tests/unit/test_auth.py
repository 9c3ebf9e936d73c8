"""Unit tests of ingest/api/auth.py and ingest/store/tokens.py: the role table covers
every RPC, token text and hashing, the raw workspace scan, and the verifier's
cache (with a fake store at the database boundary)."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest

import steplog.v1
from ingest.api import auth
from ingest.core.errors import ApiError
from ingest.store import tokens
from ingest.store.tokens import Role, TokenRow
from steplog.v1 import (
    artifact_service_pb2,
    experiment_service_pb2,
    ingest_service_pb2,
    run_service_pb2,
)


def all_methods() -> list[tuple[str, object]]:
    """(full method name, input descriptor) of every RPC in steplog.v1."""
    out = []
    for info in pkgutil.iter_modules(steplog.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"steplog.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m.input_type))
    return out


def test_every_rpc_has_a_role_and_a_workspace_to_scope() -> None:
    methods = all_methods()
    assert len(methods) >= 25
    names = {name for name, _ in methods}
    assert names == set(auth.METHOD_ROLES), "METHOD_ROLES must list exactly the RPCs"
    for name, input_type in methods:
        assert auth.workspace_plan(input_type) is not None, f"{name}: no workspace field"


def test_roles_are_ordered() -> None:
    assert Role.ADMIN.allows(Role.WRITER) and Role.WRITER.allows(Role.READER)
    assert not Role.READER.allows(Role.WRITER) and not Role.WRITER.allows(Role.ADMIN)
    assert auth.METHOD_ROLES["/steplog.v1.TokenService/CreateToken"] is Role.ADMIN
    assert auth.METHOD_ROLES["/steplog.v1.IngestService/Ingest"] is Role.WRITER
    assert auth.METHOD_ROLES["/steplog.v1.QueryService/ReadSeries"] is Role.READER


def test_token_text_and_hash() -> None:
    tid, secret, text = tokens.new_token()
    assert text == f"stl_{tid}_{secret}" and len(tid) == 12 and len(secret) == 43
    assert tokens.parse(text) == (tid, secret)
    for bad in ("", "stl_", text + "x", text[:-1], "Bearer " + text, text.replace("stl_", "stk_")):
        assert tokens.parse(bad) is None
    stored = tokens.hash_secret(secret, "pepper")
    assert stored != tokens.hash_secret(secret) and secret.encode() not in stored
    assert tokens.matches(secret, stored, "pepper")
    assert not tokens.matches(secret, stored, "other")
    other_last = "B" if secret[-1] == "A" else "A"  # a secret ends in "A" one time in 16
    assert not tokens.matches(secret[:-1] + other_last, stored, "pepper")


def test_durations() -> None:
    assert tokens.parse_duration("30d") == 30 * 86400
    assert tokens.parse_duration("90m") == 5400
    assert tokens.parse_duration("45") == 45
    for bad in ("", "0d", "-1d", "1y", "d"):
        with pytest.raises(ValueError):
            tokens.parse_duration(bad)


def test_bearer_metadata() -> None:
    assert auth.bearer((("authorization", "Bearer abc"),)) == "abc"
    assert auth.bearer((("Authorization", "bearer  abc "),)) == "abc"
    cases = {
        (): auth.MISSING,
        (("x", "y"),): auth.MISSING,
        (("authorization", "Basic abc"),): auth.MALFORMED,
        (("authorization", "Bearer"),): auth.MALFORMED,
        (("authorization", "Bearer a"), ("authorization", "Bearer b")): auth.MALFORMED,
    }
    for metadata, reason in cases.items():
        with pytest.raises(auth.Denied) as err:
            auth.bearer(metadata)
        assert err.value.reason == reason
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


P = auth.Principal("abcdefghijkl", "team-a", Role.WRITER)


def test_scope_message_fills_or_refuses() -> None:
    req = run_service_pb2.GetRunRequest(run_id="r")
    auth.scope_message(req, P)
    assert req.workspace == "team-a"
    auth.scope_message(req, P)  # its own: unchanged
    with pytest.raises(auth.Denied) as err:
        auth.scope_message(experiment_service_pb2.GetExperimentRequest(workspace="team-b"), P)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and err.value.field == "workspace"
    header = artifact_service_pb2.UploadArtifactRequest(
        header=artifact_service_pb2.UploadArtifactHeader(run_id="r", path="p")
    )
    auth.scope_message(header, P)
    assert header.header.workspace == "team-a"
    auth.scope_message(artifact_service_pb2.UploadArtifactRequest(chunk=b"x"), P)
    with pytest.raises(auth.Denied):
        auth.scope_message(
            artifact_service_pb2.UploadArtifactRequest(
                header=artifact_service_pb2.UploadArtifactHeader(workspace="default")
            ),
            P,
        )


def _ingest(workspace: str) -> bytes:
    req = ingest_service_pb2.IngestRequest(workspace=workspace)
    req.batch.writer_id = "w"
    req.batch.sequence = 7
    return req.SerializeToString()


def test_scope_raw_matches_protobuf() -> None:
    same = _ingest("team-a")
    assert auth.scope_raw(same, P) is same
    filled = ingest_service_pb2.IngestRequest.FromString(auth.scope_raw(_ingest(""), P))
    assert filled.workspace == "team-a" and filled.batch.sequence == 7
    with pytest.raises(auth.Denied):
        auth.scope_raw(_ingest("team-b"), P)
    # The field twice: protobuf keeps the last; so does the scan.
    twice = _ingest("team-a") + _ingest("team-b")
    assert ingest_service_pb2.IngestRequest.FromString(twice).workspace == "team-b"
    with pytest.raises(auth.Denied):
        auth.scope_raw(twice, P)
    sneaky = _ingest("team-b") + b"\x0a\x00"  # an explicit empty one last: filled, not passed
    out = ingest_service_pb2.IngestRequest.FromString(auth.scope_raw(sneaky, P))
    assert out.workspace == "team-a"


def test_raw_scan_refuses_garbage() -> None:
    for bad in (b"\x0a\x05ab", b"\x80", b"\x00\x01", b"\x0b", b"\x10" + b"\xff" * 11):
        with pytest.raises(ApiError) as err:
            auth.raw_workspace(bad)
        assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ApiError, match="top-level fields"):
        auth.raw_workspace(b"\x18\x01" * (auth.MAX_RAW_FIELDS + 1))


class FakeStore:
    """The database boundary of TokenVerifier."""

    pepper = "p"

    def __init__(self) -> None:
        self.rows: dict[str, tuple[TokenRow, bytes]] = {}
        self.lookups = 0
        self.touches: list[str] = []
        self.gate: asyncio.Event | None = None

    def add(self, role: Role = Role.READER, expires: datetime | None = None) -> str:
        tid, secret, text = tokens.new_token()
        now = datetime.now(UTC)
        row = TokenRow(tid, "ci", "team-a", role, now, "cli", expires, None, None)
        self.rows[tid] = (row, tokens.hash_secret(secret, self.pepper))
        return text

    async def lookup(self, token_id: str) -> tuple[TokenRow, bytes] | None:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.rows.get(token_id)

    async def touch(self, token_id: str, every_s: float = 60.0) -> None:
        self.touches.append(token_id)


async def _reason(verifier: auth.TokenVerifier, text: str) -> str:
    try:
        await verifier.verify(text)
    except auth.Denied as denied:
        assert text not in denied.message and text.split("_")[-1] not in denied.message
        return denied.reason
    return "ok"


def test_verifier_reasons_cache_and_revoke_within_ttl() -> None:
    async def main() -> None:
        store = FakeStore()
        now = [1000.0]
        v = auth.TokenVerifier(store, ttl_s=10, clock=lambda: now[0])  # type: ignore[arg-type]
        good = store.add(Role.WRITER)
        p = await v.verify(good)
        assert (p.workspace, p.role) == ("team-a", Role.WRITER)
        await v.verify(good)
        assert store.lookups == 1  # cached
        tid, secret = tokens.parse(good) or ("", "")
        wrong = f"stl_{tid}_{'A' * 43}"
        assert await _reason(v, wrong) == auth.WRONG
        assert await _reason(v, f"stl_{'z' * 12}_{secret}") == auth.UNKNOWN
        assert await _reason(v, "nope") == auth.MALFORMED
        old = store.add(expires=datetime.now(UTC) - timedelta(seconds=1))
        assert await _reason(v, old) == auth.EXPIRED
        # Revoked in the database: still accepted from the cache, refused after the TTL.
        row, h = store.rows[tid]
        store.rows[tid] = (replace(row, revoked_at=datetime.now(UTC)), h)
        assert await _reason(v, good) == "ok"
        now[0] += 10
        assert await _reason(v, good) == auth.REVOKED
        await asyncio.sleep(0)
        assert store.touches.count(tid) == 1  # once a minute at most
        await v.close()

    asyncio.run(main())


def test_verifier_single_flight_and_bound() -> None:
    async def main() -> None:
        store = FakeStore()
        store.gate = asyncio.Event()
        v = auth.TokenVerifier(store, max_entries=3)  # type: ignore[arg-type]
        text = store.add()
        waiting = [asyncio.create_task(v.verify(text)) for _ in range(20)]
        await asyncio.sleep(0.01)
        store.gate.set()
        await asyncio.gather(*waiting)
        assert store.lookups == 1
        for _ in range(10):
            await _reason(v, store.add())
        assert len(v._cache) <= 3
        await v.close()

    asyncio.run(main())


def test_a_cancelled_lookup_fails_its_waiters_retryably() -> None:
    from ingest.core.errors import StoreUnavailable

    async def main() -> None:
        store = FakeStore()
        store.gate = asyncio.Event()
        v = auth.TokenVerifier(store)  # type: ignore[arg-type]
        text = store.add()
        loader = asyncio.create_task(v.verify(text))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(v.verify(text))
        await asyncio.sleep(0.01)
        loader.cancel()
        with pytest.raises(StoreUnavailable):
            await waiter
        store.gate.set()
        assert (await v.verify(text)).workspace == "team-a"  # the next call looks it up again
        assert store.lookups == 2

    asyncio.run(main())
