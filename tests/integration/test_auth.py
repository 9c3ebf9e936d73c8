"""Bearer tokens end to end: a service started with STEPLOG_AUTH=token, raw
stubs with `authorization` metadata, the real database and bucket.

The matrix calls EVERY RPC of every steplog service (enumerated from the
service descriptors, so a new RPC without a request here fails the test)
with each kind of bad credential, and checks the status code and that the
database (row counts and checksums, by SQL) and the bucket (its listing and
its unfinished multipart uploads) are unchanged after each denied call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import os
import pkgutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from aiobotocore.session import get_session
from google.protobuf import message_factory
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import steplog.v1
from ingest.api import auth
from ingest.devstack import StackInfo
from ingest.store import tokens
from steplog.v1 import (
    artifact_service_pb2 as art,
)
from steplog.v1 import (
    common_pb2,
    data_pb2,
)
from steplog.v1 import (
    experiment_service_pb2 as exp,
)
from steplog.v1 import (
    ingest_service_pb2 as ing,
)
from steplog.v1 import (
    query_service_pb2 as qry,
)
from steplog.v1 import (
    run_service_pb2 as run,
)
from steplog.v1 import (
    token_service_pb2 as tok,
)
from tests.support import ROOT, ServiceProcess, free_port

PEPPER = "test-pepper-" + uuid.uuid4().hex
WS = "auth-a-" + uuid.uuid4().hex[:8]
OTHER_WS = "auth-b-" + uuid.uuid4().hex[:8]
EXPERIMENT = "exp-auth"
RUN = "run-auth-" + uuid.uuid4().hex[:8]
TTL_S = 1.0

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the service and its tokens ---------------------------------------------------------


@dataclass
class Env:
    service: ServiceProcess
    log_path: Path
    database_url: str
    info: StackInfo
    tokens: dict[str, str]  # cell -> token text
    channel: grpc.Channel
    deletable_experiment_id: str = ""  # an experiment without runs (DeleteExperiment)

    def call(self, method: str, request: Any, token: str | None, timeout: float = 20.0) -> Any:
        return invoke(self.channel, method, request, metadata(token), timeout)


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", "Bearer " + token),)


async def _make_tokens(url: str) -> dict[str, str]:
    async def make(ws: str, role: str, name: str, **kw: Any) -> str:
        return await tokens.create_token(url, ws, role, name, pepper=PEPPER, **kw)

    out = {
        "admin": await make(WS, "admin", "admin-a"),
        "writer": await make(WS, "writer", "writer-a"),
        "reader": await make(WS, "reader", "reader-a"),
        "other_workspace": await make(OTHER_WS, "admin", "admin-b"),
        "expired": await make(WS, "admin", "expired-a", expires_in=3600),
        "revoked": await make(WS, "admin", "revoked-a"),
        "victim": await make(WS, "reader", "victim-a"),  # RevokeToken's target
    }
    conn = await asyncpg.connect(url)
    try:
        expired_id = tokens.parse(out["expired"])[0]  # type: ignore[index]
        await conn.execute(
            "UPDATE tokens SET expires_at = now() - interval '1 minute' WHERE token_id = $1",
            expired_id,
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        revoked_id = tokens.parse(out["revoked"])[0]  # type: ignore[index]
        await tokens.TokenStore(pool, PEPPER).revoke(revoked_id, None)
    finally:
        await pool.close()
    writer_id = tokens.parse(out["writer"])[0]  # type: ignore[index]
    out["wrong"] = f"stl_{writer_id}_{'A' * 43}"
    out["malformed"] = "stl_short"
    return out


@pytest.fixture(scope="module")
def env(
    service_env: dict[str, str],
    database_url: str,
    stack_info: StackInfo,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    toks = run_async(_make_tokens(database_url))
    # A bucket of its own: other test sessions share the stack's.
    info = dataclasses.replace(stack_info, s3_bucket="auth-" + uuid.uuid4().hex[:12])
    run_async(_s3(info, "create_bucket"))
    log_path = tmp_path_factory.mktemp("auth") / "service.log"
    service = ServiceProcess(
        {**service_env, "STEPLOG_S3_BUCKET": info.s3_bucket},
        metrics_port=free_port(),
        log_path=log_path,
        extra_env={
            "STEPLOG_AUTH": "token",
            "STEPLOG_TOKEN_PEPPER": PEPPER,
            "STEPLOG_AUTH_CACHE_TTL_S": str(TTL_S),
            "STEPLOG_LOG_LEVEL": "DEBUG",
        },
    ).start()
    channel = grpc.insecure_channel(service.address)
    e = Env(service, log_path, database_url, info, toks, channel)
    try:
        _seed(e)
        yield e
    finally:
        channel.close()
        service.stop()
        run_async(_drop_bucket(info))


def _client(info: StackInfo) -> Any:
    return get_session().create_client(
        "s3",
        endpoint_url=info.s3_endpoint,
        region_name=info.s3_region,
        aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=info.s3_secret_key,
    )


async def _s3(info: StackInfo, method: str, **kwargs: Any) -> Any:
    async with _client(info) as c:
        return await getattr(c, method)(Bucket=info.s3_bucket, **kwargs)


async def _drop_bucket(info: StackInfo) -> None:
    async with _client(info) as c:
        async for page in c.get_paginator("list_objects_v2").paginate(Bucket=info.s3_bucket):
            for o in page.get("Contents", []):
                await c.delete_object(Bucket=info.s3_bucket, Key=o["Key"])
        await c.delete_bucket(Bucket=info.s3_bucket)


def _scalars(run_id: str, name: str, steps: list[int]) -> ing.RunSeries:
    return ing.RunSeries(
        run_id=run_id,
        series=data_pb2.SeriesData(
            name=name,
            scalars=data_pb2.ScalarColumns(steps=steps, values=[float(s) for s in steps]),
        ),
    )


def _seed(e: Env) -> None:
    """An experiment, a run with a series and a file, in WS (by the writer)."""
    w = e.tokens["writer"]
    made = e.call(
        "/steplog.v1.ExperimentService/GetOrCreateExperiment",
        exp.GetOrCreateExperimentRequest(name="exp-deletable"),
        w,
    )
    e.deletable_experiment_id = made.experiment.experiment_id
    e.call(
        "/steplog.v1.RunService/CreateRun",
        run.CreateRunRequest(experiment_name=EXPERIMENT, run_id=RUN),
        w,
    )
    batch = ing.Batch(writer_id="seed", sequence=1, series=[_scalars(RUN, "loss", [1, 2, 3])])
    e.call("/steplog.v1.IngestService/Write", ing.WriteRequest(batch=batch), w)
    e.call(
        "/steplog.v1.ArtifactService/UploadArtifact",
        [
            art.UploadArtifactRequest(header=art.UploadArtifactHeader(run_id=RUN, path="f.txt")),
            art.UploadArtifactRequest(chunk=b"seeded file"),
        ],
        w,
    )


# -- calling any RPC by name ------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    name: str  # /steplog.v1.Service/Method
    input: Any
    output: Any
    client_streaming: bool
    server_streaming: bool


def all_rpcs() -> dict[str, Rpc]:
    out = {}
    for info in pkgutil.iter_modules(steplog.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"steplog.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                name = f"/{service.full_name}/{m.name}"
                out[name] = Rpc(
                    name,
                    message_factory.GetMessageClass(m.input_type),
                    message_factory.GetMessageClass(m.output_type),
                    m.client_streaming,
                    m.server_streaming,
                )
    return out


RPCS = all_rpcs()


def invoke(
    channel: grpc.Channel,
    method: str,
    request: Any,
    md: tuple[tuple[str, str], ...],
    timeout: float = 20.0,
) -> Any:
    """Call a method; a stream's responses come back as a list."""
    r = RPCS[method]
    ser, de = r.input.SerializeToString, r.output.FromString
    if r.client_streaming and r.server_streaming:
        call = channel.stream_stream(method, ser, de)
        return list(call(iter(request), metadata=md, timeout=timeout))
    if r.client_streaming:
        return channel.stream_unary(method, ser, de)(iter(request), metadata=md, timeout=timeout)
    if r.server_streaming:
        return list(channel.unary_stream(method, ser, de)(request, metadata=md, timeout=timeout))
    return channel.unary_unary(method, ser, de)(request, metadata=md, timeout=timeout)


def victim_id(e: Env) -> str:
    return tokens.parse(e.tokens["victim"])[0]  # type: ignore[index]


def request_for(method: str, e: Env, workspace: str = WS) -> Any:
    """A request that an allowed caller in WS could make, and that would
    write (or read) something real: denial, not a bad request, must stop it."""
    ws = workspace
    tag = [common_pb2.Tag(key="k", value="v")]
    batch = ing.Batch(
        writer_id="denied-writer", sequence=1, series=[_scalars(RUN, "denied", [1, 2])]
    )
    upload = [
        art.UploadArtifactRequest(
            header=art.UploadArtifactHeader(workspace=ws, run_id=RUN, path="denied.bin", size=9)
        ),
        art.UploadArtifactRequest(chunk=b"not-there"),
    ]
    requests: dict[str, Callable[[], Any]] = {
        "/steplog.v1.ExperimentService/GetOrCreateExperiment": lambda: (
            exp.GetOrCreateExperimentRequest(workspace=ws, name="denied-exp")
        ),
        "/steplog.v1.ExperimentService/GetExperiment": lambda: exp.GetExperimentRequest(
            workspace=ws, name=EXPERIMENT
        ),
        "/steplog.v1.ExperimentService/ListExperiments": lambda: exp.ListExperimentsRequest(
            workspace=ws
        ),
        "/steplog.v1.ExperimentService/UpdateExperimentTags": lambda: (
            exp.UpdateExperimentTagsRequest(workspace=ws, name=EXPERIMENT, set_tags=tag)
        ),
        "/steplog.v1.ExperimentService/ArchiveExperiment": lambda: exp.ArchiveExperimentRequest(
            workspace=ws, name=EXPERIMENT
        ),
        "/steplog.v1.ExperimentService/ReactivateExperiment": lambda: (
            exp.ReactivateExperimentRequest(workspace=ws, name=EXPERIMENT)
        ),
        "/steplog.v1.RunService/CreateRun": lambda: run.CreateRunRequest(
            workspace=ws, experiment_name=EXPERIMENT, run_id="denied-run"
        ),
        "/steplog.v1.RunService/GetRun": lambda: run.GetRunRequest(workspace=ws, run_id=RUN),
        "/steplog.v1.RunService/ListRuns": lambda: run.ListRunsRequest(
            workspace=ws, experiment_name=EXPERIMENT
        ),
        "/steplog.v1.RunService/UpdateRunTags": lambda: run.UpdateRunTagsRequest(
            workspace=ws, run_id=RUN, set_tags=tag
        ),
        "/steplog.v1.RunService/AddRunProperties": lambda: run.AddRunPropertiesRequest(
            workspace=ws, run_id=RUN, properties={"denied": "yes"}
        ),
        "/steplog.v1.RunService/UpdateRunStatus": lambda: run.UpdateRunStatusRequest(
            workspace=ws, run_id=RUN, status=common_pb2.RUN_STATUS_COMPLETED
        ),
        "/steplog.v1.RunService/Heartbeat": lambda: run.HeartbeatRequest(
            workspace=ws, run_ids=[RUN]
        ),
        "/steplog.v1.RunService/RewindRun": lambda: run.RewindRunRequest(
            workspace=ws, run_id=RUN, step=1
        ),
        "/steplog.v1.RunService/SetEarlyTerminationPolicy": lambda: (
            run.SetEarlyTerminationPolicyRequest(workspace=ws, run_id=RUN)
        ),
        "/steplog.v1.RunService/GetEarlyTerminationPolicy": lambda: (
            run.GetEarlyTerminationPolicyRequest(workspace=ws, run_id=RUN)
        ),
        "/steplog.v1.IngestService/Ingest": lambda: [ing.IngestRequest(workspace=ws, batch=batch)],
        "/steplog.v1.IngestService/Write": lambda: ing.WriteRequest(workspace=ws, batch=batch),
        "/steplog.v1.QueryService/GetMetrics": lambda: qry.GetMetricsRequest(
            workspace=ws, run_id=RUN
        ),
        "/steplog.v1.QueryService/ReadSeries": lambda: qry.ReadSeriesRequest(
            workspace=ws, run_id=RUN, name="loss"
        ),
        "/steplog.v1.QueryService/ReadCharts": lambda: qry.ReadChartsRequest(
            workspace=ws, run_id=RUN, series=[qry.SeriesRef(name="loss")], max_points=10
        ),
        "/steplog.v1.QueryService/ListSeries": lambda: qry.ListSeriesRequest(
            workspace=ws, run_id=RUN
        ),
        "/steplog.v1.ArtifactService/UploadArtifact": lambda: upload,
        "/steplog.v1.ArtifactService/DownloadArtifact": lambda: art.DownloadArtifactRequest(
            workspace=ws, run_id=RUN, path="f.txt"
        ),
        "/steplog.v1.ArtifactService/ListArtifacts": lambda: art.ListArtifactsRequest(
            workspace=ws, run_id=RUN
        ),
        "/steplog.v1.TokenService/CreateToken": lambda: tok.CreateTokenRequest(
            workspace=ws, name="denied", role=tok.TOKEN_ROLE_ADMIN
        ),
        "/steplog.v1.ExperimentService/DeleteExperiment": lambda: RPCS[
            "/steplog.v1.ExperimentService/DeleteExperiment"
        ].input(workspace=ws, experiment_id=e.deletable_experiment_id),
        "/steplog.v1.TokenService/ListTokens": lambda: tok.ListTokensRequest(workspace=ws),
        "/steplog.v1.TokenService/RevokeToken": lambda: tok.RevokeTokenRequest(
            workspace=ws, token_id=victim_id(e)
        ),
    }
    return requests[method]()


def expected_role(name: str) -> str:
    """The role an RPC should need, from its name (checked against ingest/api/auth.py)."""
    method = name.rsplit("/", 1)[1]
    if "/steplog.v1.TokenService/" in name or method.startswith("Delete"):
        return "admin"
    writes = ("GetOrCreate", "Update", "Archive", "Reactivate", "Create", "Add", "Heartbeat", "Set")
    if method.startswith((*writes, "Rewind")) or method in ("Ingest", "Write", "UploadArtifact"):
        return "writer"
    return "reader"


WRITE_METHODS = {name for name in RPCS if expected_role(name) == "writer"}
ADMIN_METHODS = {name for name in RPCS if expected_role(name) == "admin"}
TOKEN_METHODS = {name for name in RPCS if "/steplog.v1.TokenService/" in name}


# -- what the database and the bucket hold -----------------------------------------------


async def _db_state(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        state: dict[str, Any] = {}
        for t in tables:
            state[f"count:{t}"] = await conn.fetchval(f'SELECT count(*) FROM "{t}"')
        ws = [WS, OTHER_WS]
        mine = "SELECT run_id FROM runs WHERE workspace = ANY($1::text[])"
        digests = {
            "experiments": "SELECT e::text FROM experiments e WHERE workspace = ANY($1::text[])",
            "runs": "SELECT r::text FROM runs r WHERE workspace = ANY($1::text[])",
            "series": f"SELECT s::text FROM series s WHERE run_id IN ({mine})",
            "artifacts": f"SELECT a::text FROM artifacts a WHERE run_id IN ({mine})",
            "writers": "SELECT w::text FROM writers w WHERE workspace = ANY($1::text[])",
            "writer_batches": (
                "SELECT b::text FROM writer_batches b WHERE workspace = ANY($1::text[])"
            ),
            # every column but the last-used time (a valid token's use may set it)
            "tokens": (
                "SELECT concat_ws('|', token_id, name, workspace, role, secret_hash, created_at,"
                " expires_at, revoked_at) FROM tokens WHERE $1::text[] IS NOT NULL"
            ),
        }
        for t in tables:
            if t in digests or t == "schema_migrations":
                continue
            cols = {
                r["column_name"]: r["data_type"]
                for r in await conn.fetch(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_name = $1",
                    t,
                )
            }
            of_mine = f"series_id IN (SELECT series_id FROM series WHERE run_id IN ({mine}))"
            # Points: insert-only, or hidden (a block's `hidden` is an array: whole rows).
            if "series_id" in cols and cols.get("hidden") == "boolean":
                digests[t] = (
                    f"SELECT concat_ws('|', count(*), count(*) FILTER (WHERE hidden))"
                    f' FROM "{t}" WHERE {of_mine}'
                )
            elif "series_id" in cols:
                digests[t] = f'SELECT x::text FROM "{t}" x WHERE {of_mine}'
            else:  # small tables (quotas, usage, blob touches, ...): whole
                digests[t] = f'SELECT x::text FROM "{t}" x WHERE $1::text[] IS NOT NULL'
        for t, query in digests.items():
            rows = await conn.fetch(
                f"SELECT md5(coalesce(string_agg(v, E'\\n' ORDER BY v), ''))"
                f" FROM ({query}) AS q(v)",
                ws,
            )
            state[f"md5:{t}"] = rows[0][0]
        return state
    finally:
        await conn.close()


async def _bucket_state(info: StackInfo) -> dict[str, Any]:
    async with _client(info) as c:
        objects = set()
        async for page in c.get_paginator("list_objects_v2").paginate(Bucket=info.s3_bucket):
            for o in page.get("Contents", []):
                objects.add((o["Key"], o["Size"], o.get("ETag")))
        uploads = await c.list_multipart_uploads(Bucket=info.s3_bucket)
        pending = {(u["Key"], u["UploadId"]) for u in uploads.get("Uploads", [])}
        return {"objects": objects, "uploads": pending}


def state(e: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    return run_async(_db_state(e.database_url)), run_async(_bucket_state(e.info))


def secret_parts(text: str) -> list[str]:
    """The strings that must never be shown: the token and its secret."""
    parsed = tokens.parse(text)
    return [text] + ([parsed[1]] if parsed else [])


# -- the matrix -------------------------------------------------------------------------

# cell -> (which token, which methods it is tried on, the expected code)
CELLS: dict[str, tuple[str | None, set[str] | None, grpc.StatusCode]] = {
    "no_token": (None, None, UNAUTH),
    "malformed_token": ("malformed", None, UNAUTH),
    "wrong_token": ("wrong", None, UNAUTH),
    "expired_token": ("expired", None, UNAUTH),
    "revoked_token": ("revoked", None, UNAUTH),
    "other_workspace": ("other_workspace", None, DENIED),
    "reader_writes": ("reader", WRITE_METHODS | ADMIN_METHODS, DENIED),
    # TokenService, and any other admin-only RPC
    "writer_manages_tokens": ("writer", ADMIN_METHODS, DENIED),
}


def test_the_matrix_covers_every_rpc(env: Env) -> None:
    assert len(RPCS) >= 25
    for method in RPCS:  # a new RPC needs a request here (and a role in ingest/api/auth.py)
        assert request_for(method, env) is not None
    assert TOKEN_METHODS <= ADMIN_METHODS and len(TOKEN_METHODS) == 3
    assert "/steplog.v1.RunService/GetRun" not in WRITE_METHODS
    assert len(WRITE_METHODS) == 14
    for method in RPCS:
        assert auth.METHOD_ROLES[method].value == expected_role(method), method


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_denied_everywhere_and_nothing_changes(env: Env, cell: str) -> None:
    which, methods, expected = CELLS[cell]
    token = None if which is None else env.tokens[which]
    hidden = secret_parts(token) if token else []
    before = state(env)
    for method in sorted(methods if methods is not None else RPCS):
        with pytest.raises(grpc.RpcError) as err:
            env.call(method, request_for(method, env), token)
        code, details = err.value.code(), err.value.details() or ""
        assert code == expected, f"{cell} {method}: {code} {details}"
        assert details, f"{cell} {method}: a denial says why"
        for s in hidden:
            assert s not in details and s not in str(err.value.trailing_metadata())
        after = state(env)
        db_diff = {k for k in before[0] if before[0][k] != after[0].get(k)}
        assert not db_diff and before[0].keys() == after[0].keys(), f"{cell} {method}: {db_diff}"
        assert after[1] == before[1], f"{cell} {method}: the bucket changed"


def test_health_is_open_and_reflection_needs_a_token(env: Env) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([ask]), timeout=10))
    assert err.value.code() == UNAUTH
    answers = list(
        stub.ServerReflectionInfo(iter([ask]), metadata=metadata(env.tokens["reader"]), timeout=10)
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "steplog.v1.TokenService" in names and "steplog.v1.RunService" in names


# -- the positive cells -----------------------------------------------------------------

READ_METHODS = set(RPCS) - WRITE_METHODS - ADMIN_METHODS


@pytest.mark.parametrize("role", ["reader", "writer", "admin"])
def test_every_role_reads_its_workspace_with_an_empty_workspace(env: Env, role: str) -> None:
    for method in sorted(READ_METHODS):
        response = env.call(method, request_for(method, env, workspace=""), env.tokens[role])
        assert response is not None, method
    got = env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), env.tokens[role])
    assert got.run.workspace == WS
    files = env.call(
        "/steplog.v1.ArtifactService/DownloadArtifact",
        art.DownloadArtifactRequest(run_id=RUN, path="f.txt"),
        env.tokens[role],
    )
    assert b"".join(p.chunk for p in files[1:]) == b"seeded file"


def test_writer_writes_into_its_own_workspace(env: Env) -> None:
    w = env.tokens["writer"]
    run_id = "w-" + uuid.uuid4().hex[:8]
    created = env.call(
        "/steplog.v1.RunService/CreateRun",
        run.CreateRunRequest(experiment_name="writer-exp", run_id=run_id),
        w,
    )
    assert created.run.workspace == WS and created.created
    calls = [
        (
            "/steplog.v1.ExperimentService/GetOrCreateExperiment",
            exp.GetOrCreateExperimentRequest(name="writer-exp-2"),
        ),
        (
            "/steplog.v1.ExperimentService/UpdateExperimentTags",
            exp.UpdateExperimentTagsRequest(
                name="writer-exp-2", set_tags=[common_pb2.Tag(key="a")]
            ),
        ),
        (
            "/steplog.v1.ExperimentService/ArchiveExperiment",
            exp.ArchiveExperimentRequest(name="writer-exp-2"),
        ),
        (
            "/steplog.v1.ExperimentService/ReactivateExperiment",
            exp.ReactivateExperimentRequest(name="writer-exp-2"),
        ),
        (
            "/steplog.v1.RunService/UpdateRunTags",
            run.UpdateRunTagsRequest(run_id=run_id, set_tags=[common_pb2.Tag(key="a")]),
        ),
        (
            "/steplog.v1.RunService/AddRunProperties",
            run.AddRunPropertiesRequest(run_id=run_id, properties={"p": "1"}),
        ),
        ("/steplog.v1.RunService/Heartbeat", run.HeartbeatRequest(run_ids=[run_id])),
    ]
    for method, request in calls:
        env.call(method, request, w)
    stream = [
        ing.IngestRequest(
            batch=ing.Batch(writer_id="w1", sequence=i, series=[_scalars(run_id, "x", [i])])
        )
        for i in (1, 2, 3)
    ]
    acks = env.call("/steplog.v1.IngestService/Ingest", stream, w)
    assert [a.result.accepted for a in acks] == [1, 1, 1]
    written = env.call(
        "/steplog.v1.IngestService/Write",
        ing.WriteRequest(
            workspace=WS,
            batch=ing.Batch(writer_id="w2", sequence=1, series=[_scalars(run_id, "y", [5])]),
        ),
        w,
    )
    assert written.result.accepted == 1
    env.call("/steplog.v1.RunService/RewindRun", run.RewindRunRequest(run_id=run_id, step=1), w)
    up = env.call(
        "/steplog.v1.ArtifactService/UploadArtifact",
        [
            art.UploadArtifactRequest(header=art.UploadArtifactHeader(run_id=run_id, path="a")),
            art.UploadArtifactRequest(chunk=b"abc"),
        ],
        w,
    )
    assert up.artifact.sha256 == hashlib.sha256(b"abc").hexdigest()
    env.call(
        "/steplog.v1.RunService/UpdateRunStatus",
        run.UpdateRunStatusRequest(run_id=run_id, status=common_pb2.RUN_STATUS_COMPLETED),
        w,
    )
    rows = run_async(
        _fetch(env.database_url, "SELECT workspace FROM runs WHERE run_id = $1", run_id)
    )
    assert [r["workspace"] for r in rows] == [WS]
    writers = run_async(
        _fetch(env.database_url, "SELECT workspace FROM writers WHERE writer_id IN ('w1', 'w2')")
    )
    assert {r["workspace"] for r in writers} == {WS}


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def test_a_stream_message_naming_another_workspace_is_refused_and_not_written(env: Env) -> None:
    w = env.tokens["writer"]
    good = ing.IngestRequest(
        batch=ing.Batch(writer_id="mixed", sequence=1, series=[_scalars(RUN, "mixed", [1])])
    )
    bad = ing.IngestRequest(
        workspace=OTHER_WS,
        batch=ing.Batch(writer_id="mixed", sequence=2, series=[_scalars(RUN, "mixed", [2])]),
    )
    with pytest.raises(grpc.RpcError) as err:
        env.call("/steplog.v1.IngestService/Ingest", [good, bad], w)
    assert err.value.code() == DENIED and "workspace" in (err.value.details() or "")
    rows = run_async(
        _fetch(env.database_url, "SELECT count(*) AS n FROM writers WHERE workspace = $1", OTHER_WS)
    )
    assert rows[0]["n"] == 0
    # An upload whose header names another workspace: refused before any byte is stored.
    with pytest.raises(grpc.RpcError) as err:
        env.call(
            "/steplog.v1.ArtifactService/UploadArtifact",
            [
                art.UploadArtifactRequest(
                    header=art.UploadArtifactHeader(workspace=OTHER_WS, run_id=RUN, path="x")
                ),
                art.UploadArtifactRequest(chunk=b"never stored " + uuid.uuid4().bytes),
            ],
            w,
        )
    assert err.value.code() == DENIED


def test_another_workspaces_run_is_not_found_like_a_missing_one(env: Env) -> None:
    other = env.tokens["other_workspace"]

    def details(run_id: str) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=run_id), other)
        return err.value.code(), (err.value.details() or "").replace(run_id, "<id>")

    assert details(RUN) == details("no-such-run-" + uuid.uuid4().hex[:6])
    assert details(RUN)[0] == grpc.StatusCode.NOT_FOUND
    for method in (
        "/steplog.v1.QueryService/GetMetrics",
        "/steplog.v1.ArtifactService/ListArtifacts",
    ):
        with pytest.raises(grpc.RpcError) as err:
            env.call(method, request_for(method, env, workspace=""), other)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Points for it: rejected as RUN_NOT_FOUND, nothing stored in the other workspace.
    ack = env.call(
        "/steplog.v1.IngestService/Write",
        ing.WriteRequest(
            batch=ing.Batch(writer_id="b1", sequence=1, series=[_scalars(RUN, "stolen", [1])])
        ),
        other,
    )
    assert ack.result.rejected == 1 and ack.result.accepted == 0
    assert ack.result.reject_counts[0].reason == ing.REJECT_REASON_RUN_NOT_FOUND
    rows = run_async(
        _fetch(env.database_url, "SELECT count(*) AS n FROM series WHERE name = 'stolen'")
    )
    assert rows[0]["n"] == 0


def test_admin_manages_the_tokens_of_its_workspace(env: Env) -> None:
    admin = env.tokens["admin"]
    made = env.call(
        "/steplog.v1.TokenService/CreateToken",
        tok.CreateTokenRequest(
            name="made-by-admin", role=tok.TOKEN_ROLE_READER, expires_in=Duration(seconds=3600)
        ),
        admin,
    )
    assert made.info.workspace == WS and made.info.role == tok.TOKEN_ROLE_READER
    assert made.info.HasField("expire_time")
    assert made.token.startswith(f"stl_{made.info.token_id}_")
    got = env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), made.token)
    assert got.run.run_id == RUN
    listed = env.call("/steplog.v1.TokenService/ListTokens", tok.ListTokensRequest(), admin)
    assert {t.workspace for t in listed.tokens} == {WS}
    assert made.info.token_id in {t.token_id for t in listed.tokens}
    assert tokens.parse(made.token)[1] not in str(listed)  # type: ignore[index]
    # Another workspace's token id: NOT_FOUND, as one that does not exist.
    other_id = tokens.parse(env.tokens["other_workspace"])[0]  # type: ignore[index]
    for token_id in (other_id, "zzzzzzzzzzzz"):
        with pytest.raises(grpc.RpcError) as err:
            env.call(
                "/steplog.v1.TokenService/RevokeToken",
                tok.RevokeTokenRequest(token_id=token_id),
                admin,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    revoked = env.call(
        "/steplog.v1.TokenService/RevokeToken",
        tok.RevokeTokenRequest(token_id=made.info.token_id),
        admin,
    )
    assert revoked.token.HasField("revoke_time")
    # This process forgets it at once; other replicas within the TTL.
    with pytest.raises(grpc.RpcError) as err:
        env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), made.token)
    assert err.value.code() == UNAUTH and "revoked" in (err.value.details() or "")


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full["STEPLOG_DATABASE_URL"] = env.database_url
    full["STEPLOG_TOKEN_PEPPER"] = PEPPER
    return subprocess.run(
        [sys.executable, "-m", "ingest", "token", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_token_cli_create_list_revoke(env: Env) -> None:
    made = _cli(
        env,
        "create",
        "--workspace",
        WS,
        "--role",
        "reader",
        "--name",
        "cli-made",
        "--expires-in",
        "30d",
    )
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 1 and tokens.parse(lines[0]) is not None
    text = lines[0]
    token_id, secret = tokens.parse(text)  # type: ignore[misc]
    assert "not shown again" in made.stderr and secret not in made.stderr
    got = env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), text)
    assert got.run.run_id == RUN
    listed = _cli(env, "list", "--workspace", WS)
    assert listed.returncode == 0, listed.stderr
    assert token_id in listed.stdout and "cli-made" in listed.stdout
    assert secret not in listed.stdout and text not in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith(token_id))
    assert "reader" in row and WS in row
    bad = _cli(env, "create", "--workspace", WS, "--role", "reader", "--expires-in", "soon")
    assert bad.returncode == 2 and "duration" in bad.stderr
    # The cache has it: a revoke takes effect within the TTL, not at once.
    revoked = _cli(env, "revoke", token_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    deadline = time.monotonic() + TTL_S + 10
    while True:
        try:
            env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), text)
        except grpc.RpcError as err:
            assert err.code() == UNAUTH
            break
        assert time.monotonic() < deadline, "the revoke did not take effect within the TTL"
        time.sleep(0.1)
    again = _cli(env, "revoke", token_id)
    assert again.returncode == 0 and "already revoked" in again.stdout
    missing = _cli(env, "revoke", "zzzzzzzzzzzz")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_an_open_stream_ends_when_its_token_is_revoked(env: Env) -> None:
    """The CLI revokes the token of a stream that keeps sending (every 50 ms,
    also while the CLI runs): the stream ends UNAUTHENTICATED within the cache
    TTL of the revoke (plus the commit of what was sent before it)."""
    admin = env.tokens["admin"]
    made = env.call(
        "/steplog.v1.TokenService/CreateToken",
        tok.CreateTokenRequest(name="streamer", role=tok.TOKEN_ROLE_WRITER),
        admin,
    )
    sent: list[int] = []
    stop = threading.Event()

    def requests() -> Iterator[ing.IngestRequest]:
        for i in range(1, 10_000):
            if stop.is_set():
                return
            sent.append(i)
            yield ing.IngestRequest(
                batch=ing.Batch(writer_id="streamer", sequence=i, series=[_scalars(RUN, "st", [i])])
            )
            time.sleep(0.05)

    call = env.channel.stream_stream(
        "/steplog.v1.IngestService/Ingest",
        ing.IngestRequest.SerializeToString,
        ing.IngestResponse.FromString,
    )
    responses = call(requests(), metadata=metadata(made.token), timeout=60)
    revoked_at: float | None = None
    try:
        with pytest.raises(grpc.RpcError) as err:
            for n, _ in enumerate(responses, 1):
                if n == 2:
                    # Checked here: a revoke that failed used to show up only as
                    # the stream's deadline, 60 s later.
                    revoked = _cli(env, "revoke", made.info.token_id)
                    assert revoked.returncode == 0 and "revoked" in revoked.stdout, (
                        f"the CLI did not revoke {made.info.token_id!r}: {revoked.stderr}"
                    )
                    revoked_at = time.monotonic()
    finally:
        stop.set()
        responses.cancel()
    ended = time.monotonic()
    assert revoked_at is not None, f"the stream ended before the revoke: {err.value}"
    assert err.value.code() == UNAUTH and "revoked" in (err.value.details() or ""), err.value
    assert ended - revoked_at < TTL_S + 15, f"ended {ended - revoked_at:.1f} s after the revoke"
    assert len(sent) < 10_000


def _rename_token(env: Env, old: str, new: str) -> None:
    async def rename() -> None:
        conn = await asyncpg.connect(env.database_url)
        try:
            await conn.execute("UPDATE tokens SET token_id = $2 WHERE token_id = $1", old, new)
        finally:
            await conn.close()

    run_async(rename())


def _until_refused(env: Env, text: str) -> grpc.RpcError:
    """GetRun with the token until it is refused (at most TTL + 10 s)."""
    deadline = time.monotonic() + TTL_S + 10
    while True:
        try:
            env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), text)
        except grpc.RpcError as err:
            return err
        assert time.monotonic() < deadline, "the revoke did not take effect within the TTL"
        time.sleep(0.1)


def test_the_cli_revokes_an_id_that_starts_with_a_dash(env: Env) -> None:
    """One id in 64 made before new ids stopped starting with '-' does: the
    documented `token revoke ID` took it for an option (exit 2, not revoked)."""
    made = env.call(
        "/steplog.v1.TokenService/CreateToken",
        tok.CreateTokenRequest(name="dashed", role=tok.TOKEN_ROLE_READER),
        env.tokens["admin"],
    )
    old = made.info.token_id
    assert not old.startswith("-")
    dashed = "-" + old[1:]
    _rename_token(env, old, dashed)
    text = made.token.replace(f"stl_{old}_", f"stl_{dashed}_", 1)
    got = env.call("/steplog.v1.RunService/GetRun", run.GetRunRequest(run_id=RUN), text)
    assert got.run.run_id == RUN
    revoked = _cli(env, "revoke", dashed)
    assert revoked.returncode == 0 and f"token {dashed} revoked" in revoked.stdout, revoked.stderr
    err = _until_refused(env, text)
    assert err.code() == UNAUTH and "revoked" in (err.details() or "")
    listed = _cli(env, "list", "--workspace", WS)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(dashed))
    assert row.split()[-1] != "-", row  # the REVOKED column has a time


def test_the_cli_revokes_without_waiting_for_a_migrating_service(env: Env) -> None:
    """A service that is starting holds the migration lock while it migrates:
    with the schema current, the CLI does not take it (it used to wait behind
    it), and a lock it must take is waited for CLI_LOCK_TIMEOUT_S at most."""

    def new_id(name: str) -> str:
        made = env.call(
            "/steplog.v1.TokenService/CreateToken",
            tok.CreateTokenRequest(name=name, role=tok.TOKEN_ROLE_READER),
            env.tokens["admin"],
        )
        return str(made.info.token_id)

    async def with_lock(
        token_id: str, sql: str, *args: str
    ) -> tuple[subprocess.CompletedProcess[str], float]:
        conn = await asyncpg.connect(env.database_url)
        try:
            async with conn.transaction():
                await conn.execute(sql, *args)
                started = time.monotonic()
                done = await asyncio.to_thread(_cli, env, "revoke", token_id)
                return done, time.monotonic() - started
        finally:
            await conn.close()

    # The migration lock, held as `migrate.migrate` holds it.
    first = new_id("locked-1")
    revoked, took = run_async(with_lock(first, "SELECT pg_advisory_xact_lock(7324118)"))
    assert revoked.returncode == 0 and f"token {first} revoked" in revoked.stdout, revoked.stderr
    assert took < tokens.CLI_LOCK_TIMEOUT_S, took
    # The token's row, held for longer than any service holds it: a clear error
    # after the bound, not a command that hangs; nothing changed.
    second = new_id("locked-2")
    row_lock = "SELECT 1 FROM tokens WHERE token_id = $1 FOR UPDATE"
    again, took = run_async(with_lock(second, row_lock, second))
    assert again.returncode == 1 and "busy" in again.stderr, (again.stdout, again.stderr)
    assert tokens.CLI_LOCK_TIMEOUT_S <= took < tokens.CLI_LOCK_TIMEOUT_S + 30, took
    active = _cli(env, "list", "--workspace", WS, "--active")
    assert second in active.stdout and first not in active.stdout, active.stdout


def test_denials_are_counted_and_no_token_is_logged_or_exported(env: Env) -> None:
    page = (
        urllib.request.urlopen(f"http://127.0.0.1:{env.service.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    for reason in (
        "missing",
        "malformed",
        "wrong_secret",
        "expired",
        "revoked",
        "role",
        "workspace",
    ):
        assert any(
            line.startswith("steplog_auth_denied_total{")
            and f'reason="{reason}"' in line
            and 'method="steplog.v1.' in line
            for line in page.splitlines()
        ), reason
    assert "steplog_tokens_created_total" in page and "steplog_tokens_revoked_total" in page
    log_text = env.log_path.read_text(errors="replace")
    assert "auth denied: method=/steplog.v1." in log_text and "token created: token_id=" in log_text
    assert "peer=ipv" in log_text
    for text in env.tokens.values():
        for s in secret_parts(text):
            assert s not in log_text, "a token appears in the service log"
            assert s not in page, "a token appears on /metrics"
