"""Evaluation documents: the four Azure ML schemas, validated. Pure.

A document is JSON: {"schema_type": ..., "schema_version": ..., "data": {...}}.
Each check is a named rule; a document that breaks one is rejected with the
schema and the rule named, so a user sees which invariant their numbers
broke. The invariants are the ones a chart drawn from the document relies on:

- confusion_matrix: square, one row and column per class label, entries
  non-negative integers;
- accuracy_table: probability_tables and percentile_tables shaped
  [classes, thresholds, 4] (TP, FP, TN, FN), thresholds numbers, counts
  non-negative integers, TP+FP+TN+FN the same at every threshold of every
  class, TP+FN and TN+FP constant across the thresholds of a class, class
  labels strings;
- predictions: bin_averages, bin_errors and bin_counts of equal length,
  bin_edges one longer;
- residuals: bin_edges one longer than bin_counts, both flat lists of numbers
  (counts may be fractions, as in Azure ML's example).

The schema type is also the series' value type: a series holds one schema,
fixed by its first document, like every other kind.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.core.batch import INVALID_EVALUATION, KIND_MISMATCH, LIMIT_EXCEEDED, Chunk, Outcome

# Series value_type of an evaluation series: its schema.
SCHEMA_CODES = {"confusion_matrix": 1, "accuracy_table": 2, "predictions": 3, "residuals": 4}
SCHEMA_NAMES = {v: k for k, v in SCHEMA_CODES.items()}

# Versions written by Azure ML's SDKs ("v1" in its docs, semantic versions by
# AutoML); the rules are the same for each.
KNOWN_VERSIONS: dict[str, tuple[str, ...]] = {
    "confusion_matrix": ("1.0.0", "v1"),
    "accuracy_table": ("1.0.0", "1.0.1", "v1"),
    "predictions": ("1.0.0", "v1"),
    "residuals": ("1.0.0", "v1"),
}

# Escapes that json accepts but PostgreSQL's jsonb does not store: NUL, and
# lone surrogates (a valid pair is fine, so those are checked one by one).
_NUL_ESCAPE = re.compile(r"\\u0000")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class DocumentError(ValueError):
    """A document that breaks a rule; str() names the schema and the rule."""

    def __init__(self, schema: str, rule: str, detail: str) -> None:
        super().__init__(f"{schema}: rule {rule!r} failed: {detail}")
        self.schema = schema
        self.rule = rule


@dataclass(frozen=True)
class Document:
    """A validated document, parsed."""

    schema_type: str
    schema_version: str
    value: dict[str, Any]
    text: str


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_strings(value: Any) -> None:
    """Every string (keys too) must be storable: no lone surrogate."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def parse(text: str, max_bytes: int) -> Document:
    """Parse and validate one document; raise DocumentError naming the rule."""
    if len(text) > max_bytes:
        raise DocumentError("document", "size", f"{len(text)} bytes; the limit is {max_bytes}")
    if _NUL_ESCAPE.search(text):
        raise DocumentError("document", "json", "contains \\u0000, which cannot be stored")
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
        if _SURROGATE_ESCAPE.search(text):
            _check_strings(value)
    except (ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise DocumentError("document", "json", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DocumentError("document", "json_object", "a document must be a JSON object")
    schema = value.get("schema_type")
    if not isinstance(schema, str) or schema not in SCHEMA_CODES:
        raise DocumentError(
            "document",
            "schema_type",
            f"unknown schema_type {schema!r}; known: {', '.join(sorted(SCHEMA_CODES))}",
        )
    version = value.get("schema_version")
    known = KNOWN_VERSIONS[schema]
    if not isinstance(version, str) or version not in known:
        raise DocumentError(
            schema,
            "schema_version",
            f"unknown schema_version {version!r}; known versions: {', '.join(known)}",
        )
    data = value.get("data")
    if not isinstance(data, dict):
        raise DocumentError(schema, "data", "'data' must be a JSON object")
    _CHECKS[schema](data, "true" in text or "false" in text)
    return Document(schema, version, value, text)


# -- helpers ---------------------------------------------------------------------


def _list(data: dict[str, Any], key: str, schema: str, rule: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise DocumentError(schema, rule, f"'{key}' must be a list")
    return value


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return False


def _numbers(
    values: list[Any], key: str, schema: str, rule: str, may_have_bools: bool
) -> np.ndarray[Any, Any]:
    """A list of JSON numbers as float64 (any nesting, must be rectangular)."""
    if may_have_bools and _has_bool(values):
        raise DocumentError(schema, rule, f"'{key}' holds true/false where numbers belong")
    arr = _array(values)
    if arr is None or arr.dtype.kind not in "iuf":
        raise DocumentError(schema, rule, f"'{key}' must hold numbers (in a rectangular nesting)")
    return arr.astype(np.float64)


def _array(values: list[Any]) -> np.ndarray[Any, Any] | None:
    """The nested list as an array, None when ragged (numpy converts no
    types here, so strings stay strings and a dtype says what was found)."""
    try:
        arr = np.array(values)
    except (ValueError, OverflowError):
        return None
    return None if arr.dtype == object else arr


def _counts(
    values: list[Any], key: str, schema: str, rule: str, may_have_bools: bool
) -> np.ndarray[Any, Any]:
    """Non-negative integers (an integral float such as 3.0 counts)."""
    arr = _numbers(values, key, schema, rule, may_have_bools)
    if arr.size and not (np.all(arr >= 0) and np.all(arr == np.floor(arr))):
        bad = arr[(arr < 0) | (arr != np.floor(arr))].flat[0]
        raise DocumentError(schema, rule, f"'{key}' must hold non-negative integers; found {bad:g}")
    return arr


# -- the four schemas ------------------------------------------------------------


def _confusion_matrix(data: dict[str, Any], may_have_bools: bool) -> None:
    schema = "confusion_matrix"
    labels = _list(data, "class_labels", schema, "class_labels")
    matrix = _list(data, "matrix", schema, "square")
    c = len(labels)
    if len(matrix) != c:
        raise DocumentError(
            schema,
            "square",
            f"matrix has {len(matrix)} rows for {c} class labels (one row and column per label)",
        )
    for i, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != c:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise DocumentError(
                schema,
                "square",
                f"matrix row {i} has {got} entries for {c} class labels "
                "(one row and column per label)",
            )
    _counts(matrix, "matrix", schema, "non_negative_integers", may_have_bools)


def _accuracy_table(data: dict[str, Any], may_have_bools: bool) -> None:
    schema = "accuracy_table"
    labels = _list(data, "class_labels", schema, "class_labels_strings")
    bad = [x for x in labels if not isinstance(x, str)]
    if bad:
        raise DocumentError(
            schema, "class_labels_strings", f"class labels must be strings; found {bad[0]!r}"
        )
    c = len(labels)
    for kind in ("probability", "percentile"):
        thresholds = _numbers(
            _list(data, f"{kind}_thresholds", schema, "thresholds_floats"),
            f"{kind}_thresholds",
            schema,
            "thresholds_floats",
            may_have_bools,
        )
        if thresholds.ndim != 1:
            raise DocumentError(
                schema, "thresholds_floats", f"'{kind}_thresholds' must be a flat list of numbers"
            )
        t = thresholds.shape[0]
        key = f"{kind}_tables"
        raw = _list(data, key, schema, "shape")
        arr = _array(raw)
        shape = () if arr is None else arr.shape
        if shape != (c, t, 4) and not (c == 0 and len(raw) == 0):
            raise DocumentError(
                schema,
                "shape",
                f"'{key}' must be shaped [classes={c}, thresholds={t}, 4] "
                f"(TP, FP, TN, FN); it is {list(shape) if shape else 'ragged'}",
            )
        tables = _counts(raw, key, schema, "counts_integers", may_have_bools)
        if tables.size == 0:
            continue
        tables = tables.reshape(c, t, 4)
        totals = tables.sum(axis=2)
        if not np.all(totals == totals.flat[0]):
            cls, thr = np.argwhere(totals != totals.flat[0])[0]
            raise DocumentError(
                schema,
                "total_constant",
                f"'{key}': TP+FP+TN+FN is {totals[cls, thr]:g} for class {labels[cls]!r} at "
                f"threshold {thr}, but {totals.flat[0]:g} elsewhere (the same samples are "
                "counted at every threshold of every class)",
            )
        positives = tables[:, :, 0] + tables[:, :, 3]
        negatives = tables[:, :, 1] + tables[:, :, 2]
        for name, sums in (("TP+FN", positives), ("TN+FP", negatives)):
            varying = np.flatnonzero(np.any(sums != sums[:, :1], axis=1))
            if varying.size:
                cls = int(varying[0])
                raise DocumentError(
                    schema,
                    "class_totals_constant",
                    f"'{key}': {name} of class {labels[cls]!r} changes across thresholds "
                    f"({sums[cls].min():g}..{sums[cls].max():g}); a class has the same "
                    "positives and negatives at every threshold",
                )


def _predictions(data: dict[str, Any], may_have_bools: bool) -> None:
    schema = "predictions"
    averages = _list(data, "bin_averages", schema, "equal_lengths")
    errors = _list(data, "bin_errors", schema, "equal_lengths")
    counts = _list(data, "bin_counts", schema, "equal_lengths")
    edges = _list(data, "bin_edges", schema, "edges_one_longer")
    if not len(averages) == len(errors) == len(counts):
        raise DocumentError(
            schema,
            "equal_lengths",
            f"bin_averages, bin_errors and bin_counts must have equal lengths; they have "
            f"{len(averages)}, {len(errors)} and {len(counts)}",
        )
    if len(edges) != len(counts) + 1:
        raise DocumentError(
            schema,
            "edges_one_longer",
            f"bin_edges must be one longer than the bins: {len(edges)} edges for "
            f"{len(counts)} bins",
        )
    for key, values in (("bin_averages", averages), ("bin_errors", errors), ("bin_edges", edges)):
        if _numbers(values, key, schema, "numbers", may_have_bools).ndim != 1:
            raise DocumentError(schema, "numbers", f"'{key}' must be a flat list of numbers")
    if _counts(counts, "bin_counts", schema, "counts_integers", may_have_bools).ndim != 1:
        raise DocumentError(schema, "counts_integers", "'bin_counts' must be a flat list")


def _residuals(data: dict[str, Any], may_have_bools: bool) -> None:
    schema = "residuals"
    counts = _list(data, "bin_counts", schema, "edges_one_longer")
    edges = _list(data, "bin_edges", schema, "edges_one_longer")
    if len(edges) != len(counts) + 1:
        raise DocumentError(
            schema,
            "edges_one_longer",
            f"bin_edges must be one longer than bin_counts: {len(edges)} edges for "
            f"{len(counts)} counts",
        )
    if _numbers(edges, "bin_edges", schema, "numbers", may_have_bools).ndim != 1:
        raise DocumentError(schema, "numbers", "'bin_edges' must be a flat list of numbers")
    # Numbers, not only integers: Azure ML's own example has bin_counts
    # [0.88, 20, 30, 50.99] (weighted or normalised histograms).
    if _numbers(counts, "bin_counts", schema, "numbers", may_have_bools).ndim != 1:
        raise DocumentError(schema, "numbers", "'bin_counts' must be a flat list of numbers")


_CHECKS = {
    "confusion_matrix": _confusion_matrix,
    "accuracy_table": _accuracy_table,
    "predictions": _predictions,
    "residuals": _residuals,
}


def validate_evaluations(chunk: Chunk, outcome: Outcome, max_bytes: int) -> None:
    """Parse every document of the chunk; reject the invalid ones by rule and
    those whose schema differs from the chunk's first valid one. Sets the
    chunk's value type to that schema and its payload to `Document`s.

    Documents are read from the request one at a time, and a kept Document
    holds its text only: the parsed value (several times the text's size)
    is dropped as soon as the document is validated."""
    texts: Any = chunk.payload if chunk.payload is not None else []
    docs: list[Document | None] = [None] * len(chunk)
    schema: str | None = None
    alive = chunk.alive
    for i, text in enumerate(texts):
        if i >= len(docs):
            break
        if not alive[i]:
            continue
        try:
            doc = parse(text, max_bytes)
        except DocumentError as exc:
            reason = LIMIT_EXCEEDED if exc.rule == "size" else INVALID_EVALUATION
            outcome.reject_one(chunk, i, reason, str(exc))
            continue
        if schema is None:
            schema = doc.schema_type
        elif doc.schema_type != schema:
            outcome.reject_one(
                chunk,
                i,
                KIND_MISMATCH,
                f"series {chunk.name!r} holds {schema} documents in this request; "
                f"this one is {doc.schema_type}",
            )
            continue
        docs[i] = Document(doc.schema_type, doc.schema_version, {}, doc.text)
    chunk.payload = docs
    if schema is not None:
        chunk.value_type = SCHEMA_CODES[schema]
