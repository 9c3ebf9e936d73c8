"""Tables and evaluation results end to end: Python client -> real gRPC server
-> TimescaleDB, and back through queries."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pytest

from steplog import Experiment, Run, evaluation
from steplog._writer.transport import Rejection
from steplog.client import Client
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import query_service_pb2 as qs

DBL, I64, STR, BLN = (
    data_pb2.COLUMN_TYPE_DOUBLE,
    data_pb2.COLUMN_TYPE_INT64,
    data_pb2.COLUMN_TYPE_STRING,
    data_pb2.COLUMN_TYPE_BOOL,
)


def new_run(url: str, experiment_name: str) -> Run:
    return Experiment(experiment_name, url=url).start_logging()


def rejections(run: Run) -> list[Rejection]:
    run.flush()
    return [r for r in run._client.writer.rejections() if r.run_id == run.id]


class RawWriter:
    """The unary Write with a writer id and sequence numbers of its own."""

    def __init__(self, url: str) -> None:
        self.client = Client(url, "default")
        self.writer_id = f"raw-{uuid.uuid4().hex[:12]}"
        self.sequence = 0

    def write(
        self, run_id: str, *series: data_pb2.SeriesData, sequence: int | None = None
    ) -> pb.WriteResponse:
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        batch = pb.Batch(
            writer_id=self.writer_id,
            sequence=sequence,
            series=[pb.RunSeries(run_id=run_id, series=s) for s in series],
        )
        return self.client.ingest.Write(pb.WriteRequest(workspace="default", batch=batch))

    def read(self, run_id: str, name: str, **kw: Any) -> qs.ReadSeriesResponse:
        return self.client.queries.ReadSeries(
            qs.ReadSeriesRequest(workspace="default", run_id=run_id, name=name, **kw)
        )


def table(name: str, *columns: data_pb2.Column, **kw: Any) -> data_pb2.SeriesData:
    n = max(len(c.ints) or len(c.doubles) or len(c.strings) or len(c.bools) for c in columns)
    return data_pb2.SeriesData(
        name=name, table=data_pb2.TableColumns(row_count=n, columns=list(columns), **kw)
    )


def reasons(response: pb.WriteResponse) -> dict[str, int]:
    return {pb.RejectReason.Name(rc.reason): rc.count for rc in response.result.reject_counts}


# -- tables --------------------------------------------------------------------------


def test_log_row_builds_a_table_whose_columns_grow(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    run.log_row("perf", epoch=0, loss=0.9)
    run.log_row("perf", description="per epoch", epoch=1, loss=0.5)
    run.log_row("perf", epoch=2, loss=0.25, note="best", acc=0.75)
    assert run.get_metrics() == {
        "perf": {
            "epoch": [0, 1, 2],
            "loss": [0.9, 0.5, 0.25],
            "note": [None, None, "best"],
            "acc": [None, None, 0.75],
        }
    }
    # Rows logged later still read back in order, with the columns they have.
    run.log_row("perf", epoch=3, note=None)
    got = run.get_metrics("perf")["perf"]
    assert got["epoch"] == [0, 1, 2, 3] and got["note"] == [None, None, "best", None]
    assert rejections(run) == []


def test_log_table_in_azure_shape(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    value: dict[str, list[Any]] = {
        "x": [1, 2, 3],
        "y": [0.5, float("nan"), -1e300],
        "name": ["a", "é", ""],
        "ok": [True, False, True],
        "gap": [None, 2.5, None],
    }
    run.log_table("t", value, description="a table")
    got = run.get_metrics()["t"]
    assert got["x"] == [1, 2, 3] and got["name"] == ["a", "é", ""] and got["ok"] == value["ok"]
    assert got["y"][0] == 0.5 and np.isnan(got["y"][1]) and got["y"][2] == -1e300
    assert got["gap"] == [None, 2.5, None]
    run.log_table("t", {"x": np.array([4, 5])})
    assert run.get_metrics()["t"]["x"] == [1, 2, 3, 4, 5]


def test_type_change_is_rejected_naming_the_column(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    run.log_table("t", {"x": [1, 2], "y": [0.5, 0.25]})
    run.flush()
    with pytest.warns(Warning):
        run.log_table("t", {"x": ["three"], "y": [3]})  # y: an int into a double column is fine
        got = rejections(run)
    assert [(r.reason, r.name) for r in got] == [("INVALID_TABLE", "t")]
    assert "column 'x' holds int64 values; this row's is string" in got[0].message
    assert run.get_metrics()["t"] == {"x": [1, 2], "y": [0.5, 0.25]}
    run.log_table("t", {"x": [3], "y": [3]})
    assert run.get_metrics()["t"] == {"x": [1, 2, 3], "y": [0.5, 0.25, 3.0]}


def test_mixed_types_in_one_column_keep_the_valid_rows(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    with pytest.warns(Warning):
        for value in (1, "two", 3, True):
            run.log_row("mixed", value=value, i=len(str(value)))
        got = rejections(run)
    assert sorted(r.reason for r in got) == ["INVALID_TABLE", "INVALID_TABLE"]
    assert all("column 'value' holds int64 values" in r.message for r in got)
    assert run.get_metrics()["mixed"] == {"value": [1, 3], "i": [1, 1]}


def test_a_batch_of_valid_and_invalid_rows_stores_the_valid_ones(
    url: str, experiment_name: str
) -> None:
    run = new_run(url, experiment_name)
    raw = RawWriter(url)
    first = raw.write(run.id, table("t", data_pb2.Column(name="n", type=I64, ints=[1])))
    assert first.result.accepted == 1
    response = raw.write(
        run.id,
        table(
            "t",
            data_pb2.Column(
                name="n", type=I64, ints=[2, 0, 4, 5, 0], present=[True, False, True, True, False]
            ),
            data_pb2.Column(
                name="n",
                type=DBL,
                doubles=[0, 3.5, 0, 0, 0],
                present=[False, True, False, False, False],
            ),
            data_pb2.Column(name="s", type=STR, strings=["ok", "ok", "x" * 5000, "ok", "ok"]),
            data_pb2.Column(
                name="n",
                type=STR,
                strings=["", "", "", "", "six"],
                present=[False, False, False, False, True],
            ),
        ),
        table("bad", data_pb2.Column(name="a", type=I64, ints=[1, 2], doubles=[1.0])),
    )
    assert response.result.accepted == 2 and response.result.rejected == 5
    assert reasons(response) == {
        "REJECT_REASON_INVALID_TABLE": 4,
        "REJECT_REASON_LIMIT_EXCEEDED": 1,
    }
    messages = [p.message for p in response.result.rejected_points]
    assert any("column 'n' holds int64 values; this row's is double" in m for m in messages)
    assert any("column 'n' holds int64 values; this row's is string" in m for m in messages)
    assert any("column 's'" in m and "4096" in m for m in messages)
    assert any("column 'a' is int64" in m for m in messages)
    assert {p.index for p in response.result.rejected_points if p.name == "t"} == {1, 2, 4}
    assert run.get_metrics()["t"] == {"n": [1, 2, 5], "s": [None, "ok", "ok"]}


def test_stepped_tables_follow_the_step_rules(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    run.log_table("curve", {"x": [0.0, 0.1, 0.2]}, steps=[0, 10, 20])
    with pytest.warns(Warning):
        run.log_table("curve", {"x": [9.9]}, steps=[5])
        got = rejections(run)
    assert [r.reason for r in got] == ["STEP_NOT_INCREASING"]
    with pytest.warns(Warning):
        run.log_row("curve", x=1.0)  # unstepped rows into a stepped table
        got = rejections(run)
    assert "STEP_MODE_MISMATCH" in [r.reason for r in got]
    run.log_table("curve", {"x": [0.3]}, steps=[30])
    raw = RawWriter(url)
    reply = raw.read(run.id, "curve", start_step=10, end_step=20)
    assert list(reply.series.table.steps) == [10, 20]
    assert [c.doubles for c in reply.series.table.columns] == [[0.1, 0.2]]
    assert run.get_metrics()["curve"] == {"x": [0.0, 0.1, 0.2, 0.3]}


def test_read_a_table_by_row_range(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    for i in range(10):
        run.log_row("rows", i=i, sq=i * i)
    run.flush()
    reply = RawWriter(url).read(run.id, "rows", start_step=3, end_step=5)
    t = reply.series.table
    assert t.row_count == 3 and list(t.steps) == [3, 4, 5]
    assert {c.name: list(c.ints) for c in t.columns} == {"i": [3, 4, 5], "sq": [9, 16, 25]}


def test_out_of_order_table_last_write_wins(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = RawWriter(url)
    policy = data_pb2.STEP_POLICY_OUT_OF_ORDER
    t1 = table("ooo", data_pb2.Column(name="v", type=I64, ints=[1, 2]), steps=[1, 2])
    t1.step_policy = policy
    assert raw.write(run.id, t1).result.accepted == 2
    t2 = table("ooo", data_pb2.Column(name="v", type=I64, ints=[10]), steps=[1])
    t2.step_policy = policy
    assert raw.write(run.id, t2).result.accepted == 1
    assert run.get_metrics()["ooo"] == {"v": [10, 2]}


def test_a_resent_batch_is_stored_once(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = RawWriter(url)
    series = table("once", data_pb2.Column(name="v", type=I64, ints=[1, 2, 3]))
    assert raw.write(run.id, series).result.accepted == 3
    assert raw.write(run.id, series, sequence=1).duplicate_batch
    assert run.get_metrics()["once"] == {"v": [1, 2, 3]}


def test_request_limits(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = RawWriter(url)
    rows = raw.write(run.id, table("big", data_pb2.Column(name="v", type=I64, ints=[1] * 100_001)))
    assert reasons(rows) == {"REJECT_REASON_LIMIT_EXCEEDED": 100_001}
    wide = raw.write(
        run.id,
        table("wide", *[data_pb2.Column(name=f"c{i}", type=I64, ints=[i]) for i in range(1001)]),
    )
    assert reasons(wide) == {"REJECT_REASON_LIMIT_EXCEEDED": 1}
    ok = raw.write(
        run.id,
        table(
            "ok", *[data_pb2.Column(name=f"c{i}", type=DBL, doubles=[i] * 100) for i in range(1000)]
        ),
    )
    assert ok.result.accepted == 100
    got = run.get_metrics("ok")["ok"]
    assert len(got) == 1000 and got["c999"] == [999.0] * 100


def test_a_series_keeps_its_kind(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    raw = RawWriter(url)
    scalar = data_pb2.SeriesData(name="loss", scalars=data_pb2.ScalarColumns(values=[1.0]))
    assert raw.write(run.id, scalar).result.accepted == 1
    reply = raw.write(run.id, table("loss", data_pb2.Column(name="v", type=I64, ints=[1])))
    assert reasons(reply) == {"REJECT_REASON_KIND_MISMATCH": 1}


# -- evaluations --------------------------------------------------------------------------


def test_evaluation_documents_come_back_as_logged(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = rng.random((200, 3))
    proba /= proba.sum(axis=1, keepdims=True)
    target = rng.normal(size=200)
    docs = {
        "cm": evaluation.confusion_matrix(y, proba.argmax(axis=1)),
        "at": evaluation.accuracy_table(y, proba),
        "pred": evaluation.predictions(target, target + rng.normal(size=200) * 0.1),
        "res": evaluation.residuals(target, target + rng.normal(size=200) * 0.1),
    }
    run.log_confusion_matrix("cm", docs["cm"], description="validation")
    run.log_accuracy_table("at", json.dumps(docs["at"]))  # a JSON string, as Azure allows
    run.log_predictions("pred", docs["pred"])
    run.log_residuals("res", docs["res"])
    assert rejections(run) == []
    assert run.get_metrics() == docs
    # Azure's own example documents (schema_version "v1") are accepted too.
    run.log_confusion_matrix(
        "v1",
        '{"schema_type": "confusion_matrix", "schema_version": "v1", "data": {"class_labels": '
        '["0", "1", "2", "3"], "matrix": [[3, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], '
        "[0, 0, 0, 1]]}}",
    )
    run.log_predictions(
        "pred",
        {
            "data": {
                "bin_averages": [0.25, 0.75],
                "bin_errors": [0.013, 0.042],
                "bin_counts": [56, 34],
                "bin_edges": [0.0, 0.5, 1.0],
            }
        },
    )
    got = run.get_metrics()
    assert got["v1"]["data"]["matrix"][0] == [3, 0, 1, 0]
    assert got["pred"][1]["schema_version"] == "1.0.0" and got["pred"][0] == docs["pred"]


BROKEN = [
    ("confusion_matrix", {"class_labels": ["a", "b"], "matrix": [[1, 2]]}, "square"),
    ("confusion_matrix", {"class_labels": ["a"], "matrix": [[-1]]}, "non_negative_integers"),
    (
        "accuracy_table",
        {
            "class_labels": [0],
            "probability_thresholds": [0.5],
            "percentile_thresholds": [0.5],
            "probability_tables": [[[1, 1, 1, 1]]],
            "percentile_tables": [[[1, 1, 1, 1]]],
        },
        "class_labels_strings",
    ),
    (
        "accuracy_table",
        {
            "class_labels": ["0"],
            "probability_thresholds": [0.0, 0.5],
            "percentile_thresholds": [0.5],
            "probability_tables": [[[2, 2, 0, 0], [1, 1, 1, 2]]],
            "percentile_tables": [[[1, 1, 1, 1]]],
        },
        "total_constant",
    ),
    (
        "accuracy_table",
        {
            "class_labels": ["0"],
            "probability_thresholds": [0.0, 0.5],
            "percentile_thresholds": [0.5],
            "probability_tables": [[[2, 2, 0, 0], [3, 0, 1, 0]]],
            "percentile_tables": [[[1, 1, 1, 1]]],
        },
        "class_totals_constant",
    ),
    (
        "accuracy_table",
        {
            "class_labels": ["0"],
            "probability_thresholds": [0.5],
            "percentile_thresholds": [0.5],
            "probability_tables": [[[2, 2, 0]]],
            "percentile_tables": [[[1, 1, 1, 1]]],
        },
        "shape",
    ),
    (
        "predictions",
        {"bin_averages": [1], "bin_errors": [], "bin_counts": [1], "bin_edges": [0, 1]},
        "equal_lengths",
    ),
    (
        "predictions",
        {"bin_averages": [1], "bin_errors": [0], "bin_counts": [1], "bin_edges": [0]},
        "edges_one_longer",
    ),
    ("residuals", {"bin_counts": [1, 2], "bin_edges": [0, 1]}, "edges_one_longer"),
]


@pytest.mark.parametrize("schema,data,rule", BROKEN)
def test_broken_documents_are_rejected_with_the_rule_named(
    url: str, experiment_name: str, schema: str, data: dict[str, Any], rule: str
) -> None:
    run = new_run(url, experiment_name)
    with pytest.warns(Warning):
        getattr(run, f"log_{schema}")("doc", {"data": data})
        got = rejections(run)
    assert [r.reason for r in got] == ["INVALID_EVALUATION"]
    assert f"rule {rule!r} failed" in got[0].message
    assert run.get_metrics() == {}


def test_unknown_schema_version_lists_the_known_ones(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    doc = {"schema_version": "9.9", "data": {"bin_counts": [1], "bin_edges": [0, 1]}}
    with pytest.warns(Warning):
        run.log_residuals("res", doc)
        got = rejections(run)
    assert "unknown schema_version '9.9'; known versions: 1.0.0, v1" in got[0].message


def test_an_evaluation_series_keeps_its_schema(url: str, experiment_name: str) -> None:
    run = new_run(url, experiment_name)
    run.log_residuals("e", {"data": {"bin_counts": [1], "bin_edges": [0, 1]}})
    run.flush()
    with pytest.warns(Warning):
        run.log_confusion_matrix("e", {"data": {"class_labels": ["a"], "matrix": [[1]]}})
        got = rejections(run)
    assert [r.reason for r in got] == ["KIND_MISMATCH"]


def test_recursive_metrics_cover_children(url: str, experiment_name: str) -> None:
    parent = new_run(url, experiment_name)
    child = parent.child_run(name="fold-1")
    grandchild = child.child_run(name="fold-1a")
    parent.log_row("summary", fold=1, score=0.5)
    child.log_confusion_matrix("cm", evaluation.confusion_matrix([0, 1, 1], [0, 1, 0]))
    grandchild.log_table("t", {"a": [1, 2]})
    child.flush()
    got = parent.get_metrics(recursive=True)
    assert got[parent.id] == {"summary": {"fold": [1], "score": [0.5]}}
    assert got[child.id]["cm"]["data"]["matrix"] == [[1, 0], [1, 1]]
    assert got[grandchild.id] == {"t": {"a": [1, 2]}}
