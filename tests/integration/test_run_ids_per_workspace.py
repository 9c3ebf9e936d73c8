"""Run ids are per workspace (migration 007): the same run id created in two
workspaces is two runs, each with its own metrics, tags, children, files and
series; a run of another workspace answers exactly like a run that does not
exist; and a database made at the previous schema upgrades in place.

Against the real service, database and bucket: with auth=token (the
workspace comes from each side's token, requests leave it empty) and with
auth=none (requests name their workspace)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ingest.devstack import LocalStack
from ingest.store import tokens
from steplog.v1 import (
    artifact_service_pb2 as art,
)
from steplog.v1 import (
    artifact_service_pb2_grpc as art_grpc,
)
from steplog.v1 import (
    common_pb2,
    data_pb2,
)
from steplog.v1 import (
    ingest_service_pb2 as ing,
)
from steplog.v1 import (
    ingest_service_pb2_grpc as ing_grpc,
)
from steplog.v1 import (
    query_service_pb2 as qry,
)
from steplog.v1 import (
    query_service_pb2_grpc as qry_grpc,
)
from steplog.v1 import (
    run_service_pb2 as rs,
)
from steplog.v1 import (
    run_service_pb2_grpc as rs_grpc,
)
from tests.support import ServiceProcess

PEPPER = "test-pepper-" + uuid.uuid4().hex
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class Side:
    """One workspace as a client sees it: its name, what its requests put in
    their workspace field ('' with auth=token: the token's), its metadata."""

    name: str
    field: str
    md: tuple[tuple[str, str], ...]
    channel: grpc.Channel

    @property
    def runs(self) -> rs_grpc.RunServiceStub:
        return rs_grpc.RunServiceStub(self.channel)

    @property
    def query(self) -> qry_grpc.QueryServiceStub:
        return qry_grpc.QueryServiceStub(self.channel)

    @property
    def files(self) -> art_grpc.ArtifactServiceStub:
        return art_grpc.ArtifactServiceStub(self.channel)

    @property
    def ingest(self) -> ing_grpc.IngestServiceStub:
        return ing_grpc.IngestServiceStub(self.channel)

    def create(self, run_id: str, experiment: str, parent: str = "", tag: str = "") -> Any:
        return self.runs.CreateRun(
            rs.CreateRunRequest(
                workspace=self.field,
                experiment_name=experiment,
                run_id=run_id,
                parent_run_id=parent,
                tags=[common_pb2.Tag(key="side", value=tag or self.name)],
            ),
            metadata=self.md,
            timeout=20,
        )

    def write(self, writer: str, seq: int, series: list[ing.RunSeries]) -> ing.WriteResponse:
        batch = ing.Batch(writer_id=writer, sequence=seq, series=series)
        return self.ingest.Write(
            ing.WriteRequest(workspace=self.field, batch=batch), metadata=self.md, timeout=30
        )

    def upload(self, run_id: str, path: str, data: bytes) -> art.UploadArtifactResponse:
        header = art.UploadArtifactHeader(workspace=self.field, run_id=run_id, path=path)
        parts = [art.UploadArtifactRequest(header=header), art.UploadArtifactRequest(chunk=data)]
        return self.files.UploadArtifact(iter(parts), metadata=self.md, timeout=30)

    def download(self, run_id: str, path: str) -> bytes:
        parts = self.files.DownloadArtifact(
            art.DownloadArtifactRequest(workspace=self.field, run_id=run_id, path=path),
            metadata=self.md,
            timeout=30,
        )
        return b"".join(p.chunk for p in parts if p.WhichOneof("part") == "chunk")

    def metrics(self, run_id: str, recursive: bool = False) -> dict[str, dict[str, list[Any]]]:
        """run id -> series name -> [(step, value)], over every page."""
        out: dict[str, dict[str, list[Any]]] = {}
        token = ""
        while True:
            reply = self.query.GetMetrics(
                qry.GetMetricsRequest(
                    workspace=self.field, run_id=run_id, recursive=recursive, page_token=token
                ),
                metadata=self.md,
                timeout=30,
            )
            for r in reply.runs:
                series = out.setdefault(r.run_id, {})
                for s in r.series:
                    points = series.setdefault(s.name, [])
                    points += list(zip(s.scalars.steps, s.scalars.values, strict=True))
            token = reply.next_page_token
            if not token:
                return out


def scalars(run_id: str, name: str, steps: list[int], values: list[float]) -> ing.RunSeries:
    return ing.RunSeries(
        run_id=run_id,
        series=data_pb2.SeriesData(
            name=name, scalars=data_pb2.ScalarColumns(steps=steps, values=values)
        ),
    )


@dataclass
class Pair:
    a: Side
    b: Side
    mode: str
    database_url: str


@pytest.fixture(scope="module", params=["token", "none"])
def pair(
    request: pytest.FixtureRequest,
    service_env: dict[str, str],
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pair]:
    mode = request.param
    tag = uuid.uuid4().hex[:8]
    ws_a, ws_b = f"rid-a-{mode}-{tag}", f"rid-b-{mode}-{tag}"
    extra = {"STEPLOG_AUTH": mode}
    if mode == "token":
        extra["STEPLOG_TOKEN_PEPPER"] = PEPPER
    log = tmp_path_factory.mktemp(f"runids-{mode}") / "service.log"
    service = ServiceProcess(service_env, log_path=log, extra_env=extra).start()
    channel = grpc.insecure_channel(service.address)
    try:
        if mode == "token":

            async def make() -> tuple[str, str]:
                a = await tokens.create_token(database_url, ws_a, "writer", "a", pepper=PEPPER)
                b = await tokens.create_token(database_url, ws_b, "writer", "b", pepper=PEPPER)
                return a, b

            ta, tb = asyncio.run(make())
            a = Side(ws_a, "", (("authorization", "Bearer " + ta),), channel)
            b = Side(ws_b, "", (("authorization", "Bearer " + tb),), channel)
        else:
            a = Side(ws_a, ws_a, (), channel)
            b = Side(ws_b, ws_b, (), channel)
        yield Pair(a, b, mode, database_url)
    finally:
        channel.close()
        service.stop()


def error_shape(call: Callable[[], Any], run_id: str) -> tuple[Any, ...]:
    """The whole error a call ends with (code, message, every field violation),
    with the run id and the workspace name written as placeholders."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)  # a server stream fails when read
    e = info.value
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    violations = []
    if status is not None:
        for d in status.details:
            br = error_details_pb2.BadRequest()
            if d.Unpack(br):
                violations += [(v.field, v.description) for v in br.field_violations]

    def norm(s: str) -> str:
        return s.replace(run_id, "<run>")

    return (
        e.code(),  # type: ignore[attr-defined]
        norm(e.details() or ""),  # type: ignore[attr-defined]
        tuple((f, norm(d)) for f, d in violations),
    )


# -- the same run id in two workspaces ---------------------------------------------------


def test_same_run_id_is_two_runs(pair: Pair) -> None:
    a, b = pair.a, pair.b
    run_id = "shared-" + uuid.uuid4().hex[:8]
    child = run_id + "-child"
    # Both are created (before migration 007 the second was ALREADY_EXISTS),
    # in experiments of different names, with different tags.
    ra = a.create(run_id, "exp-a")
    rb = b.create(run_id, "exp-b")
    assert ra.created and rb.created
    assert (ra.run.experiment_name, rb.run.experiment_name) == ("exp-a", "exp-b")
    # The same child id under each: each parent gets its own child.
    ca, cb = a.create(child, "exp-a", parent=run_id), b.create(child, "exp-b", parent=run_id)
    assert ca.created and cb.created
    assert ca.run.root_run_id == run_id and cb.run.root_run_id == run_id
    # Asking again is idempotent in each workspace, and still its own run.
    again = b.create(run_id, "exp-b")
    assert not again.created and again.run.experiment_name == "exp-b"

    got_a = a.runs.GetRun(rs.GetRunRequest(workspace=a.field, run_id=run_id), metadata=a.md)
    got_b = b.runs.GetRun(rs.GetRunRequest(workspace=b.field, run_id=run_id), metadata=b.md)
    assert {t.key: t.value for t in got_a.run.tags} == {"side": a.name}
    assert {t.key: t.value for t in got_b.run.tags} == {"side": b.name}
    a.runs.UpdateRunTags(
        rs.UpdateRunTagsRequest(
            workspace=a.field, run_id=run_id, set_tags=[common_pb2.Tag(key="only", value="a")]
        ),
        metadata=a.md,
    )
    a.runs.AddRunProperties(
        rs.AddRunPropertiesRequest(workspace=a.field, run_id=run_id, properties={"p": "a"}),
        metadata=a.md,
    )
    got_b = b.runs.GetRun(rs.GetRunRequest(workspace=b.field, run_id=run_id), metadata=b.md)
    assert {t.key for t in got_b.run.tags} == {"side"}
    assert dict(got_b.run.properties) == {}

    # Points: concurrent batches of both workspaces, same writer ids, same
    # run id and series names (so a group commit holds both): each lands in
    # its own workspace's run.
    n = 8
    results: dict[tuple[str, int], ing.WriteResponse] = {}
    errors: list[BaseException] = []

    def send(side: Side, i: int, base: float) -> None:
        try:
            results[(side.name, i)] = side.write(
                f"w-{i}",
                1,
                [
                    scalars(run_id, f"m{i}", [1, 2, 3], [base + i, base + i + 1, base + i + 2]),
                    scalars(child, f"c{i}", [i], [base + i]),
                ],
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=send, args=(side, i, base))
        for i in range(n)
        for side, base in ((a, 0.0), (b, 1000.0))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for (_, _), r in results.items():
        assert (r.result.accepted, r.result.rejected) == (4, 0), r

    for side, base in ((a, 0.0), (b, 1000.0)):
        got = side.metrics(run_id)
        assert set(got) == {run_id}
        assert got[run_id] == {
            f"m{i}": [(1, base + i), (2, base + i + 1), (3, base + i + 2)] for i in range(n)
        }
        # Recursive: its own child only, with its own points.
        tree = side.metrics(run_id, recursive=True)
        assert set(tree) == {run_id, child}
        assert tree[child] == {f"c{i}": [(i, base + i)] for i in range(n)}
        listed = side.runs.ListRuns(
            rs.ListRunsRequest(workspace=side.field, parent_run_id=run_id, recursive=True),
            metadata=side.md,
        )
        assert [r.run_id for r in listed.runs] == [child]
        assert {t.key: t.value for t in listed.runs[0].tags} == {"side": side.name}
        series = side.query.ListSeries(
            qry.ListSeriesRequest(workspace=side.field, run_id=run_id), metadata=side.md
        )
        assert sorted(s.name for s in series.series) == sorted(f"m{i}" for i in range(n))
        assert all(s.point_count == 3 for s in series.series)
        one = side.query.ReadSeries(
            qry.ReadSeriesRequest(workspace=side.field, run_id=run_id, name="m0"),
            metadata=side.md,
        )
        assert list(one.series.scalars.values) == [base, base + 1, base + 2]

    # Files: the same path in each run holds each workspace's own bytes.
    a.upload(run_id, "notes.txt", b"from a")
    b.upload(run_id, "notes.txt", b"from b, longer")
    b.upload(run_id, "only-b.txt", b"b")
    assert a.download(run_id, "notes.txt") == b"from a"
    assert b.download(run_id, "notes.txt") == b"from b, longer"
    listed_a = a.files.ListArtifacts(
        art.ListArtifactsRequest(workspace=a.field, run_id=run_id), metadata=a.md
    )
    assert [(f.path, f.size) for f in listed_a.artifacts] == [("notes.txt", 6)]

    # Rewind A's run: B's series keep every point.
    rewound = a.runs.RewindRun(
        rs.RewindRunRequest(workspace=a.field, run_id=run_id, step=1), metadata=a.md
    )
    assert (rewound.hidden_points, rewound.series) == (2 * n, n)
    assert a.metrics(run_id)[run_id]["m0"] == [(1, 0.0)]
    assert b.metrics(run_id)[run_id]["m0"] == [(1, 1000.0), (2, 1001.0), (3, 1002.0)]

    # Finishing A's run leaves B's running and taking points.
    a.runs.UpdateRunStatus(
        rs.UpdateRunStatusRequest(
            workspace=a.field, run_id=child, status=common_pb2.RUN_STATUS_COMPLETED
        ),
        metadata=a.md,
    )
    late_a = a.write("late", 1, [scalars(child, "late", [1], [1.0])])
    late_b = b.write("late", 1, [scalars(child, "late", [1], [2.0])])
    assert (late_a.result.accepted, late_a.result.rejected) == (0, 1)
    assert (late_b.result.accepted, late_b.result.rejected) == (1, 0)
    got_b = b.runs.GetRun(rs.GetRunRequest(workspace=b.field, run_id=child), metadata=b.md)
    assert got_b.run.status == common_pb2.RUN_STATUS_RUNNING
    beats = b.runs.Heartbeat(
        rs.HeartbeatRequest(workspace=b.field, run_ids=[run_id, child]), metadata=b.md
    )
    assert list(beats.statuses) == [common_pb2.RUN_STATUS_RUNNING] * 2


# -- another workspace's run is not found, exactly like a missing one ---------------------


def _probes(side: Side, run_id: str) -> dict[str, Callable[[], Any]]:
    """Every call that names a run, made by `side` for `run_id`."""
    f, md = side.field, side.md
    return {
        "GetRun": lambda: side.runs.GetRun(
            rs.GetRunRequest(workspace=f, run_id=run_id), metadata=md
        ),
        "UpdateRunTags": lambda: side.runs.UpdateRunTags(
            rs.UpdateRunTagsRequest(
                workspace=f, run_id=run_id, set_tags=[common_pb2.Tag(key="x", value="y")]
            ),
            metadata=md,
        ),
        "AddRunProperties": lambda: side.runs.AddRunProperties(
            rs.AddRunPropertiesRequest(workspace=f, run_id=run_id, properties={"x": "y"}),
            metadata=md,
        ),
        "UpdateRunStatus": lambda: side.runs.UpdateRunStatus(
            rs.UpdateRunStatusRequest(
                workspace=f, run_id=run_id, status=common_pb2.RUN_STATUS_CANCELED
            ),
            metadata=md,
        ),
        "Heartbeat": lambda: side.runs.Heartbeat(
            rs.HeartbeatRequest(workspace=f, run_ids=[run_id]), metadata=md
        ),
        "RewindRun": lambda: side.runs.RewindRun(
            rs.RewindRunRequest(workspace=f, run_id=run_id, step=0), metadata=md
        ),
        "CreateRun(parent)": lambda: side.create(run_id + "-kid", "exp-probe", parent=run_id),
        "ListRuns(parent)": lambda: side.runs.ListRuns(
            rs.ListRunsRequest(workspace=f, parent_run_id=run_id), metadata=md
        ),
        "GetMetrics": lambda: side.query.GetMetrics(
            qry.GetMetricsRequest(workspace=f, run_id=run_id, recursive=True), metadata=md
        ),
        "ListSeries": lambda: side.query.ListSeries(
            qry.ListSeriesRequest(workspace=f, run_id=run_id), metadata=md
        ),
        "ReadSeries": lambda: side.query.ReadSeries(
            qry.ReadSeriesRequest(workspace=f, run_id=run_id, name="loss"), metadata=md
        ),
        "ListArtifacts": lambda: side.files.ListArtifacts(
            art.ListArtifactsRequest(workspace=f, run_id=run_id), metadata=md
        ),
        "DownloadArtifact": lambda: side.files.DownloadArtifact(
            art.DownloadArtifactRequest(workspace=f, run_id=run_id, path="f.txt"), metadata=md
        ),
        "UploadArtifact": lambda: side.upload(run_id, "stolen.txt", b"stolen"),
    }


def test_other_workspaces_run_is_not_found_like_a_missing_one(pair: Pair) -> None:
    a, b = pair.a, pair.b
    theirs = "theirs-" + uuid.uuid4().hex[:8]
    missing = "nobody-" + uuid.uuid4().hex[:8]  # same length, exists nowhere
    assert len(theirs) == len(missing)
    b.create(theirs, "exp-b")
    b.write("seed", 1, [scalars(theirs, "loss", [1, 2], [1.0, 2.0])])
    b.upload(theirs, "f.txt", b"secret of b")

    theirs_probes, missing_probes = _probes(a, theirs), _probes(a, missing)
    for name, probe in theirs_probes.items():
        shape = error_shape(probe, theirs)
        assert shape[0] == NOT_FOUND, (name, shape)
        assert shape == error_shape(missing_probes[name], missing), name

    # Points for B's run sent by A: rejected like points for a missing run.
    def rejection(run_id: str) -> tuple[Any, ...]:
        r = a.write("probe-" + run_id, 1, [scalars(run_id, "loss", [3], [666.0])]).result
        assert (r.accepted, r.rejected) == (0, 1)
        p = r.rejected_points[0]
        return (
            [(c.reason, c.count) for c in r.reject_counts],
            p.reason,
            p.name,
            p.message.replace(run_id, "<run>"),
        )

    assert rejection(theirs) == rejection(missing)
    assert rejection(theirs)[1] == ing.REJECT_REASON_RUN_NOT_FOUND

    # B's run is untouched: its tags, status, points and files.
    got = b.runs.GetRun(rs.GetRunRequest(workspace=b.field, run_id=theirs), metadata=b.md)
    assert got.run.status == common_pb2.RUN_STATUS_RUNNING
    assert {t.key: t.value for t in got.run.tags} == {"side": b.name}
    assert dict(got.run.properties) == {}
    assert b.metrics(theirs) == {theirs: {"loss": [(1, 1.0), (2, 2.0)]}}
    listed = b.files.ListArtifacts(
        art.ListArtifactsRequest(workspace=b.field, run_id=theirs), metadata=b.md
    )
    assert [f.path for f in listed.artifacts] == ["f.txt"]
    runs_b = b.runs.ListRuns(
        rs.ListRunsRequest(workspace=b.field, parent_run_id=theirs), metadata=b.md
    )
    assert list(runs_b.runs) == []

    # And nothing blocks A from a run of that id: it is A's own, and empty.
    made = a.create(theirs, "exp-a")
    assert made.created and made.run.experiment_name == "exp-a"
    assert a.metrics(theirs) == {theirs: {}}
    assert (
        list(
            a.files.ListArtifacts(
                art.ListArtifactsRequest(workspace=a.field, run_id=theirs), metadata=a.md
            ).artifacts
        )
        == []
    )
    assert b.metrics(theirs) == {theirs: {"loss": [(1, 1.0), (2, 2.0)]}}


# -- upgrading a database made at the previous schema --------------------------------------


async def _old_schema_with_data(url: str) -> None:
    """Migrations 001-006 applied as the service at schema v6 applied them,
    then runs, series, points, a file and a writer written at that schema."""
    files = sorted(
        (
            f
            for f in resources.files("ingest.store.migrations").iterdir()
            if f.name.endswith(".sql")
        ),
        key=lambda f: f.name,
    )
    old = [f for f in files if f.name < "007"]
    assert [f.name[:3] for f in old] == ["001", "002", "003", "004", "005", "006"]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for f in old:
            await conn.execute(f.read_text())
            await conn.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)", f.name.removesuffix(".sql")
            )
        exp_id = await conn.fetchval(
            "INSERT INTO experiments (workspace, name, run_count) VALUES ('old-ws', 'old-exp', 2)"
            " RETURNING experiment_id"
        )
        await conn.execute(
            "INSERT INTO runs (run_id, workspace, experiment_id, number, root_run_id, status,"
            " tags) VALUES ('old-run', 'old-ws', $1, 1, 'old-run', 'Running', '{\"k\": \"v\"}')",
            exp_id,
        )
        await conn.execute(
            "INSERT INTO runs (run_id, workspace, experiment_id, number, parent_run_id,"
            " root_run_id, status) VALUES ('old-kid', 'old-ws', $1, 2, 'old-run', 'old-run',"
            " 'Running')",
            exp_id,
        )
        sid = await conn.fetchval(
            "INSERT INTO series (run_id, name, kind, stepped, last_step, last_value,"
            " point_count) VALUES ('old-run', 'loss', 1, true, 2, 0.5, 2) RETURNING series_id"
        )
        await conn.execute(
            "INSERT INTO scalar_points (time, series_id, step, value) VALUES"
            " (now(), $1, 1, 1.0), (now(), $1, 2, 0.5)",
            sid,
        )
        kid = await conn.fetchval(
            "INSERT INTO series (run_id, name, kind, stepped, last_step, last_value,"
            " point_count) VALUES ('old-kid', 'acc', 1, true, 7, 0.9, 1) RETURNING series_id"
        )
        await conn.execute(
            "INSERT INTO scalar_points (time, series_id, step, value) VALUES (now(), $1, 7, 0.9)",
            kid,
        )
        await conn.execute(
            "INSERT INTO artifacts (run_id, path, sha256, size) VALUES ('old-run', 'model.bin',"
            " $1, 42)",
            "ab" * 32,
        )
        await conn.execute(
            "INSERT INTO writers (workspace, writer_id, last_sequence) VALUES ('old-ws', 'w', 5)"
        )
    finally:
        await conn.close()


def test_upgrade_in_place_from_schema_v6(
    stack: LocalStack, service_env: dict[str, str], tmp_path: Path
) -> None:
    name = f"steplog_upgrade_{uuid.uuid4().hex[:10]}"
    url = stack.create_database(name)
    try:
        asyncio.run(_old_schema_with_data(url))
        service = ServiceProcess(
            {**service_env, "STEPLOG_DATABASE_URL": url},
            log_path=tmp_path / "service.log",
            extra_env={"STEPLOG_AUTH": "none"},
        ).start()
        channel = grpc.insecure_channel(service.address)
        try:
            old = Side("old-ws", "old-ws", (), channel)
            new = Side("new-ws", "new-ws", (), channel)
            got = old.runs.GetRun(rs.GetRunRequest(workspace="old-ws", run_id="old-run"))
            assert got.run.experiment_name == "old-exp"
            assert {t.key: t.value for t in got.run.tags} == {"k": "v"}
            assert old.metrics("old-run", recursive=True) == {
                "old-run": {"loss": [(1, 1.0), (2, 0.5)]},
                "old-kid": {"acc": [(7, 0.9)]},
            }
            files = old.files.ListArtifacts(
                art.ListArtifactsRequest(workspace="old-ws", run_id="old-run")
            )
            assert [(f.path, f.size) for f in files.artifacts] == [("model.bin", 42)]
            # The old series takes the next step; the writer's mark survived.
            more = old.write("w", 6, [scalars("old-run", "loss", [2, 3], [9.0, 0.25])])
            assert (more.result.accepted, more.result.rejected) == (1, 1)
            dup = old.write("w", 5, [scalars("old-run", "loss", [4], [0.1])])
            assert dup.duplicate_batch
            assert old.metrics("old-run")["old-run"]["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25)]
            # The same ids are free in another workspace, and empty there.
            assert new.create("old-run", "new-exp").created
            assert new.create("old-kid", "new-exp", parent="old-run").created
            assert new.metrics("old-run", recursive=True) == {"old-run": {}, "old-kid": {}}
            new.write("w", 1, [scalars("old-run", "loss", [1], [5.0])])
            assert new.metrics("old-run") == {"old-run": {"loss": [(1, 5.0)]}}
            assert old.metrics("old-run")["old-run"]["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25)]
        finally:
            channel.close()
            service.stop()

        async def schema() -> tuple[list[str], int]:
            conn = await asyncpg.connect(url)
            try:
                versions = [
                    r["version"]
                    for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
                ]
                nulls = await conn.fetchval(
                    "SELECT (SELECT count(*) FROM series WHERE workspace IS DISTINCT FROM"
                    " 'old-ws' AND run_id LIKE 'old-%' AND workspace <> 'new-ws')"
                    " + (SELECT count(*) FROM artifacts WHERE workspace <> 'old-ws')"
                )
                return versions, int(nulls)
            finally:
                await conn.close()

        versions, stray = asyncio.run(schema())
        # Every migration is applied on top of v6: 007 and all that came after it.
        shipped = sorted(
            f.name.removesuffix(".sql")
            for f in resources.files("ingest.store.migrations").iterdir()
            if f.name.endswith(".sql")
        )
        assert versions == shipped and "007_run_ids_per_workspace" in versions
        assert stray == 0
    finally:
        stack.drop_database(name)
