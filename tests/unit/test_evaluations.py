"""Evaluation documents without I/O: every schema rule with a document that
breaks it, and the client helpers against straightforward reference loops."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ingest.core import batch as b
from ingest.core.decode import decode_batch
from ingest.core.evaluations import SCHEMA_CODES, Document, DocumentError, parse
from ingest.core.validate import Limits
from steplog import _tables, evaluation
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb

LIMIT = 1 << 20


def cm_doc() -> dict[str, Any]:
    return {
        "schema_type": "confusion_matrix",
        "schema_version": "1.0.0",
        "data": {"class_labels": ["a", "b", "c"], "matrix": [[3, 0, 1], [0, 2, 0], [1, 0, 4]]},
    }


def at_doc() -> dict[str, Any]:
    # 2 classes, 3 thresholds, 10 samples (4 of class "0", 6 of class "1").
    return {
        "schema_type": "accuracy_table",
        "schema_version": "1.0.1",
        "data": {
            "class_labels": ["0", "1"],
            "probability_thresholds": [0.0, 0.5, 1.0],
            "percentile_thresholds": [0.1, 0.6],
            "probability_tables": [
                [[4, 6, 0, 0], [3, 1, 5, 1], [0, 0, 6, 4]],
                [[6, 4, 0, 0], [5, 1, 3, 1], [0, 0, 4, 6]],
            ],
            "percentile_tables": [
                [[4, 6, 0, 0], [2, 2, 4, 2]],
                [[6, 4, 0, 0], [4, 0, 4, 2]],
            ],
        },
    }


def pred_doc() -> dict[str, Any]:
    return {
        "schema_type": "predictions",
        "schema_version": "v1",
        "data": {
            "bin_averages": [0.25, 0.75],
            "bin_errors": [0.013, 0.042],
            "bin_counts": [56, 34],
            "bin_edges": [0.0, 0.5, 1.0],
        },
    }


def res_doc() -> dict[str, Any]:
    return {
        "schema_type": "residuals",
        "schema_version": "1.0.0",
        "data": {"bin_edges": [-1.0, 0.0, 1.0], "bin_counts": [3, 4]},
    }


def check(doc: Any) -> Document:
    return parse(doc if isinstance(doc, str) else json.dumps(doc), LIMIT)


def broken(make: Callable[[], dict[str, Any]], edit: Callable[[dict[str, Any]], None]) -> str:
    doc = copy.deepcopy(make())
    edit(doc)
    return json.dumps(doc)


@pytest.mark.parametrize("make", [cm_doc, at_doc, pred_doc, res_doc])
def test_valid_documents(make: Callable[[], dict[str, Any]]) -> None:
    doc = check(make())
    assert doc.value == make() and doc.schema_type in SCHEMA_CODES


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target: Any = doc
        for key in head:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return edit


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(key)


BROKEN = [
    # confusion matrix: square, one row and column per label, non-negative integers
    (cm_doc, _set("data.matrix", [[3, 0, 1], [0, 2, 0]]), "square", "2 rows for 3 class labels"),
    (cm_doc, _set("data.matrix.1", [0, 2]), "square", "row 1 has 2 entries"),
    (cm_doc, _set("data.class_labels", ["a", "b"]), "square", "3 rows for 2 class labels"),
    (cm_doc, _set("data.matrix.0.0", -1), "non_negative_integers", "found -1"),
    (cm_doc, _set("data.matrix.0.0", 2.5), "non_negative_integers", "found 2.5"),
    (cm_doc, _set("data.matrix.0.0", True), "non_negative_integers", "true/false"),
    (cm_doc, _set("data.matrix.0.0", "3"), "non_negative_integers", "numbers"),
    # accuracy table
    (at_doc, _set("data.class_labels", [0, 1]), "class_labels_strings", "found 0"),
    (at_doc, _set("data.probability_thresholds", ["0", 0.5, 1]), "thresholds_floats", ""),
    (at_doc, _set("data.probability_thresholds", [0.0, 0.5]), "shape", "thresholds=2"),
    (at_doc, _set("data.percentile_tables.1", [[6, 4, 0, 0]]), "shape", "ragged"),
    (at_doc, _set("data.probability_tables.0.1", [3, 1, 5]), "shape", ""),
    (at_doc, _set("data.class_labels", ["0", "1", "2"]), "shape", "classes=3"),
    (at_doc, _set("data.probability_tables.0.1", [3, 1.5, 4.5, 1]), "counts_integers", ""),
    (at_doc, _set("data.probability_tables.0.1", [3, -1, 7, 1]), "counts_integers", ""),
    (at_doc, _set("data.probability_tables.1.1", [5, 1, 3, 2]), "total_constant", "'1'"),
    (at_doc, _set("data.probability_tables.0.1", [3, 2, 5, 1]), "total_constant", "11"),
    (at_doc, _set("data.probability_tables.0.1", [3, 1, 4, 2]), "class_totals_constant", "'0'"),
    (at_doc, _set("data.percentile_tables.1.1", [5, 1, 2, 2]), "class_totals_constant", "TP+FN"),
    # predictions
    (pred_doc, _set("data.bin_errors", [0.1]), "equal_lengths", "2, 1 and 2"),
    (pred_doc, _set("data.bin_counts", [1, 2, 3]), "equal_lengths", ""),
    (pred_doc, _set("data.bin_edges", [0.0, 1.0]), "edges_one_longer", "2 edges for 2 bins"),
    (pred_doc, _set("data.bin_counts", [56, 3.5]), "counts_integers", ""),
    (pred_doc, _set("data.bin_averages", ["x", 1]), "numbers", ""),
    # residuals
    (res_doc, _set("data.bin_edges", [0.0, 1.0]), "edges_one_longer", "2 edges for 2 counts"),
    (res_doc, _set("data.bin_counts", [3, 4, 5]), "edges_one_longer", ""),
    (res_doc, _delete("data"), "data", "'data' must be a JSON object"),
    # every schema
    (cm_doc, _set("schema_type", "roc"), "schema_type", "known: accuracy_table"),
    (cm_doc, _set("schema_version", "2.0"), "schema_version", "known versions: 1.0.0, v1"),
    (at_doc, _delete("schema_version"), "schema_version", "known versions: 1.0.0, 1.0.1, v1"),
]


@pytest.mark.parametrize("make,edit,rule,needle", BROKEN)
def test_each_rule_names_itself(
    make: Callable[[], dict[str, Any]],
    edit: Callable[[dict[str, Any]], None],
    rule: str,
    needle: str,
) -> None:
    with pytest.raises(DocumentError) as err:
        check(broken(make, edit))
    assert err.value.rule == rule
    assert f"rule {rule!r} failed" in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "text,rule",
    [
        ("{not json", "json"),
        ("[1, 2]", "json_object"),
        ('{"schema_type": "residuals", "x": NaN}', "json"),
        ('{"schema_type": "residuals", "x": 1e999}', "json"),
        ('{"schema_type": "residuals", "x": "\\u0000"}', "json"),
        ('{"schema_type": "residuals", "x": "\\ud800"}', "json"),
    ],
)
def test_what_cannot_be_stored_is_rejected(text: str, rule: str) -> None:
    with pytest.raises(DocumentError) as err:
        parse(text, LIMIT)
    assert err.value.rule == rule


def test_surrogate_pairs_are_fine() -> None:
    doc = cm_doc()
    doc["data"]["class_labels"] = ["\\ud83d\\ude00", "b", "c"]
    text = json.dumps(doc).replace("\\\\u", "\\u")
    assert check(text).value["data"]["class_labels"][0] == "\U0001f600"


def test_size_limit() -> None:
    with pytest.raises(DocumentError) as err:
        parse(json.dumps(cm_doc()), 50)
    assert err.value.rule == "size"


def test_chunk_schema_is_fixed_by_its_first_document() -> None:
    docs = [json.dumps(cm_doc()), json.dumps(res_doc()), "{}", json.dumps(cm_doc())]
    rs = pb.RunSeries(
        run_id="run-1",
        series=data_pb2.SeriesData(name="e", evaluations=data_pb2.EvaluationPoints(documents=docs)),
    )
    batch = decode_batch(
        "default", pb.Batch(writer_id="w", sequence=1, series=[rs]), 1.7e9, Limits()
    )
    chunk = batch.chunks[0]
    assert chunk.value_type == SCHEMA_CODES["confusion_matrix"]
    assert chunk.alive.tolist() == [True, False, False, True]
    assert batch.outcome.by_reason == {b.KIND_MISMATCH: 1, b.INVALID_EVALUATION: 1}
    assert isinstance(chunk.payload, list) and isinstance(chunk.payload[3], Document)


def test_kept_documents_hold_their_text_not_the_parsed_value() -> None:
    """The parsed value costs several times the text; only the text is stored."""
    text = json.dumps(cm_doc())
    rs = pb.RunSeries(
        run_id="run-1",
        series=data_pb2.SeriesData(
            name="e", evaluations=data_pb2.EvaluationPoints(documents=[text, "", "{"])
        ),
    )
    batch = decode_batch(
        "default", pb.Batch(writer_id="w", sequence=1, series=[rs]), 1.7e9, Limits()
    )
    doc = batch.chunks[0].payload[0] if batch.chunks[0].payload else None
    assert isinstance(doc, Document) and doc.text == text and doc.value == {}
    assert batch.outcome.by_reason == {b.INVALID_EVALUATION: 2}


# -- client: documents from dicts or JSON strings -----------------------------------------


def test_client_fills_schema_type_and_version() -> None:
    doc = {"data": {"class_labels": ["a"], "matrix": np.array([[1]])}}
    text = _tables.evaluation_document("confusion_matrix", doc)
    parsed = json.loads(text)
    assert parsed["schema_type"] == "confusion_matrix" and parsed["schema_version"] == "1.0.0"
    assert parsed["data"]["matrix"] == [[1]]
    assert check(text).schema_type == "confusion_matrix"
    assert json.loads(_tables.evaluation_document("residuals", json.dumps(res_doc()))) == res_doc()


def test_client_refuses_what_is_not_a_document() -> None:
    with pytest.raises(InvalidArgumentError, match="schema_type is 'residuals'"):
        _tables.evaluation_document("confusion_matrix", res_doc())
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        _tables.evaluation_document("residuals", "{oops")
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        _tables.evaluation_document("residuals", {"data": {"x": math.nan}})
    with pytest.raises(InvalidArgumentError, match="dict or a JSON string"):
        _tables.evaluation_document("residuals", 3)  # type: ignore[arg-type]


# -- helpers against reference loops --------------------------------------------------------


def ref_confusion(true: list[Any], pred: list[Any], labels: list[Any]) -> list[list[int]]:
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred, strict=True):
        matrix[labels.index(t)][labels.index(p)] += 1
    return matrix


def test_confusion_matrix_matches_reference() -> None:
    rng = np.random.default_rng(1)
    true = rng.choice(["cat", "dog", "eel"], 500)
    pred = rng.choice(["cat", "dog", "eel"], 500)
    doc = evaluation.confusion_matrix(true, pred)
    assert doc["data"]["class_labels"] == ["cat", "dog", "eel"]
    assert doc["data"]["matrix"] == ref_confusion(
        true.tolist(), pred.tolist(), ["cat", "dog", "eel"]
    )
    check(doc)
    # Probabilities: argmax picks the label; labels in a given order.
    proba = rng.random((500, 3))
    doc = evaluation.confusion_matrix(true, proba, labels=["eel", "cat", "dog"])
    argmax = [["eel", "cat", "dog"][i] for i in proba.argmax(axis=1)]
    assert doc["data"]["matrix"] == ref_confusion(true.tolist(), argmax, ["eel", "cat", "dog"])
    ints = evaluation.confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2])
    assert ints["data"] == {
        "class_labels": ["0", "1", "2"],
        "matrix": [[1, 0, 0], [0, 1, 1], [0, 0, 1]],
    }
    with pytest.raises(ValueError, match="not among labels"):
        evaluation.confusion_matrix([0, 1], [0, 5], labels=[0, 1])


def ref_table(
    true: list[Any], proba: list[list[float]], labels: list[Any], thresholds: list[float]
) -> list[list[list[int]]]:
    tables = []
    for c, label in enumerate(labels):
        rows = []
        for t in thresholds:
            tp = fp = tn = fn = 0
            for y, p in zip(true, proba, strict=True):
                predicted = p[c] >= t
                actual = y == label
                tp += predicted and actual
                fp += predicted and not actual
                tn += not predicted and not actual
                fn += not predicted and actual
            rows.append([tp, fp, tn, fn])
        tables.append(rows)
    return tables


def test_accuracy_table_matches_reference() -> None:
    rng = np.random.default_rng(2)
    true = rng.integers(0, 3, 300)
    raw = rng.random((300, 3))
    proba = raw / raw.sum(axis=1, keepdims=True)
    proba[:5] = [0.5, 0.25, 0.25]  # scores exactly on thresholds
    doc = evaluation.accuracy_table(true, proba, num_points=11)
    data = doc["data"]
    assert data["class_labels"] == ["0", "1", "2"]
    thresholds = [i / 10 for i in range(11)]
    assert data["probability_thresholds"] == pytest.approx(thresholds)
    expected = ref_table(true.tolist(), proba.tolist(), [0, 1, 2], data["probability_thresholds"])
    assert data["probability_tables"] == expected
    flat = sorted(proba.ravel().tolist())
    assert (
        data["percentile_thresholds"][0] == flat[0]
        and data["percentile_thresholds"][-1] == flat[-1]
    )
    expected = ref_table(true.tolist(), proba.tolist(), [0, 1, 2], data["percentile_thresholds"])
    assert data["percentile_tables"] == expected
    check(doc)
    binary = evaluation.accuracy_table([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.4], num_points=3)
    assert binary["data"]["probability_tables"][1] == [[2, 2, 0, 0], [2, 0, 2, 0], [0, 0, 2, 2]]
    check(binary)


def test_accuracy_table_of_a_class_missing_from_the_data_is_still_valid() -> None:
    doc = evaluation.accuracy_table([0, 0, 1], np.eye(3)[[0, 0, 1]], labels=[0, 1, 2], num_points=5)
    assert doc["data"]["probability_tables"][2][0] == [0, 3, 0, 0]
    check(doc)


def test_predictions_match_reference() -> None:
    rng = np.random.default_rng(3)
    true = rng.normal(size=400)
    pred = true + rng.normal(scale=0.3, size=400)
    doc = evaluation.predictions(true, pred, bins=7)
    data = doc["data"]
    edges = data["bin_edges"]
    assert len(edges) == 8 and edges[0] == true.min() and edges[-1] == pytest.approx(true.max())
    for i in range(7):
        members = [
            p
            for t, p in zip(true.tolist(), pred.tolist(), strict=True)
            if (i == 0 or t > edges[i]) and t <= edges[i + 1]
        ]
        assert data["bin_counts"][i] == len(members)
        mean = sum(members) / len(members) if members else 0.0
        std = math.sqrt(sum((p - mean) ** 2 for p in members) / len(members)) if members else 0.0
        assert data["bin_averages"][i] == pytest.approx(mean)
        assert data["bin_errors"][i] == pytest.approx(std, abs=1e-12)
    check(doc)
    empty = evaluation.predictions([0.0, 10.0], [1.0, 2.0], bins=[0.0, 1.0, 5.0, 10.0])
    assert empty["data"]["bin_counts"] == [1, 0, 1] and empty["data"]["bin_averages"][1] == 0.0


def test_residuals_match_reference() -> None:
    rng = np.random.default_rng(4)
    true = rng.normal(scale=2.0, size=500)
    pred = true + rng.normal(scale=1.0, size=500)
    pred[0] = true[0] + 100  # an outlier past the last inner edge
    doc = evaluation.residuals(true, pred)
    data = doc["data"]
    res = (pred - true).tolist()
    edges = data["bin_edges"]
    assert len(edges) == 11 and len(data["bin_counts"]) == 10
    bound = 2 * float(np.std(true))
    assert edges[1] == pytest.approx(-bound, abs=0.01) and edges[-2] == pytest.approx(
        bound, abs=0.01
    )
    assert edges[-1] == max(res) and edges[0] == pytest.approx(
        min(min(res), edges[1] - (edges[2] - edges[1]))
    )
    counts = [0] * 10
    for r in res:  # outlier bins are open at the outside; a bin holds its lower edge
        i = sum(1 for e in edges[1:-1] if e <= r)
        counts[i] += 1
    assert data["bin_counts"] == counts
    assert data["res_count"] == 500
    assert data["mean"] == pytest.approx(sum(res) / 500)
    check(doc)


def test_helpers_refuse_non_finite_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        evaluation.residuals([1.0, 2.0], [1.0, math.nan])
