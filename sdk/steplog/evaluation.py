"""Evaluation documents from arrays, in Azure ML's shapes (numpy only).

    from steplog.evaluation import confusion_matrix, accuracy_table
    run.log_confusion_matrix("cm", confusion_matrix(y_true, y_pred))
    run.log_accuracy_table("at", accuracy_table(y_true, y_proba))
    run.log_predictions("pred", predictions(y_true, y_pred))
    run.log_residuals("res", residuals(y_true, y_pred))

The computations follow Azure ML's AutoML metrics, so charts drawn from these
documents look the same: confusion matrices have a row per true label and a
column per predicted one; accuracy tables count TP, FP, TN, FN one class
against the rest, predicting a class positive when its probability is at or
above the threshold, at evenly spaced probability thresholds and at the same
percentiles of the predicted probabilities; predictions bin the true values
and give the mean and standard deviation of the predictions in each bin;
residuals (prediction - truth) are counted in bins around zero two standard
deviations of the truth wide, with an outlier bin on each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

CONFUSION_MATRIX_VERSION = "1.0.0"
ACCURACY_TABLE_VERSION = "1.0.1"
PREDICTIONS_VERSION = "1.0.0"
RESIDUALS_VERSION = "1.0.0"

ArrayLike = npt.ArrayLike
F64 = npt.NDArray[np.float64]


def _labels(labels: ArrayLike | None, *arrays: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if labels is not None:
        out = np.asarray(labels)
        if out.ndim != 1 or out.size == 0:
            raise ValueError("labels must be a non-empty 1-d sequence")
        return out
    return np.unique(np.concatenate([a.ravel() for a in arrays]))


def _finite(name: str, values: F64) -> F64:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} holds NaN or infinity; a document holds finite numbers only")
    return values


def _floats(values: ArrayLike) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64)]


def _ints(values: ArrayLike) -> list[Any]:
    return np.asarray(values, dtype=np.int64).tolist()  # type: ignore[no-any-return]


def _document(schema: str, version: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"schema_type": schema, "schema_version": version, "data": data}


def confusion_matrix(
    y_true: ArrayLike, y_pred: ArrayLike, labels: ArrayLike | None = None
) -> dict[str, Any]:
    """A confusion_matrix document: matrix[i][j] counts the samples of true
    label i predicted as label j. `y_pred` holds labels, or one row of class
    probabilities per sample (columns in `labels` order; argmax wins).
    `labels` defaults to the sorted labels seen in either array."""
    true = np.asarray(y_true).ravel()
    pred = np.asarray(y_pred)
    if pred.ndim == 2:
        if labels is None:
            raise ValueError("labels are required with probabilities (one per column)")
        label_arr = _labels(labels)
        if pred.shape[1] != label_arr.size:
            raise ValueError(f"{pred.shape[1]} probability columns for {label_arr.size} labels")
        pred = label_arr[np.argmax(pred, axis=1)]
    else:
        pred = pred.ravel()
        label_arr = _labels(labels, true, pred)
    if true.shape != pred.shape:
        raise ValueError(f"{true.size} true labels but {pred.size} predictions")
    order = np.argsort(label_arr, kind="stable")
    sorted_labels = label_arr[order]

    def index(values: npt.NDArray[Any], what: str) -> npt.NDArray[np.int64]:
        pos = np.searchsorted(sorted_labels, values)
        pos = np.clip(pos, 0, sorted_labels.size - 1)
        unknown = sorted_labels[pos] != values
        if np.any(unknown):
            raise ValueError(f"{what} label {values[unknown][0]!r} is not among labels")
        return order[pos].astype(np.int64)

    k = label_arr.size
    flat = index(true, "true") * k + index(pred, "predicted")
    matrix = np.bincount(flat, minlength=k * k).reshape(k, k)
    return _document(
        "confusion_matrix",
        CONFUSION_MATRIX_VERSION,
        {"class_labels": [str(x) for x in label_arr.tolist()], "matrix": matrix.tolist()},
    )


def _class_table(
    positive: npt.NDArray[np.bool_], scores: F64, thresholds: F64
) -> npt.NDArray[np.int64]:
    """[thresholds, 4] counts TP, FP, TN, FN for one class against the rest,
    a sample predicted positive when its score >= the threshold."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    positives_below = np.concatenate(([0], np.cumsum(positive[order])))
    below = np.searchsorted(sorted_scores, thresholds, side="left")  # scores < threshold
    fn = positives_below[below]
    tn = below - fn
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return np.stack([n_pos - fn, n_neg - tn, tn, fn], axis=1).astype(np.int64)


def accuracy_table(
    y_true: ArrayLike,
    y_proba: ArrayLike,
    labels: ArrayLike | None = None,
    num_points: int = 100,
) -> dict[str, Any]:
    """An accuracy_table document from true labels and class probabilities
    (one column per label; for a binary task a 1-d array is the probability
    of the second label). `labels` defaults to the sorted labels of y_true,
    which must then match the number of columns."""
    true = np.asarray(y_true).ravel()
    proba = np.asarray(y_proba, dtype=np.float64)
    if proba.ndim == 1:
        proba = np.stack([1.0 - proba, proba], axis=1)
    if proba.ndim != 2 or proba.shape[0] != true.size:
        raise ValueError(f"y_proba must be [samples={true.size}, classes]; got {proba.shape}")
    _finite("y_proba", proba)
    if num_points < 2:
        raise ValueError("num_points must be at least 2")
    label_arr = np.unique(true) if labels is None else _labels(labels)
    if label_arr.size != proba.shape[1]:
        raise ValueError(
            f"{proba.shape[1]} probability columns for {label_arr.size} labels; pass labels="
        )
    probability_thresholds = np.linspace(0.0, 1.0, num_points)
    percentile_thresholds = np.percentile(proba.ravel(), probability_thresholds * 100)
    probability_tables = []
    percentile_tables = []
    for c, label in enumerate(label_arr.tolist()):
        positive = true == label
        probability_tables.append(
            _class_table(positive, proba[:, c], probability_thresholds).tolist()
        )
        percentile_tables.append(
            _class_table(positive, proba[:, c], percentile_thresholds).tolist()
        )
    return _document(
        "accuracy_table",
        ACCURACY_TABLE_VERSION,
        {
            "class_labels": [str(x) for x in label_arr.tolist()],
            "probability_tables": probability_tables,
            "percentile_tables": percentile_tables,
            "probability_thresholds": _floats(probability_thresholds),
            "percentile_thresholds": _floats(percentile_thresholds),
        },
    )


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[F64, F64]:
    true = _finite("y_true", np.asarray(y_true, dtype=np.float64).ravel())
    pred = _finite("y_pred", np.asarray(y_pred, dtype=np.float64).ravel())
    if true.size != pred.size or true.size == 0:
        raise ValueError(f"need as many predictions as targets (> 0): {true.size}, {pred.size}")
    return true, pred


def predictions(
    y_true: ArrayLike, y_pred: ArrayLike, bins: int | Sequence[float] = 10
) -> dict[str, Any]:
    """A predictions document: the true values binned (`bins` equal-width
    bins over their range, or explicit edges), and per bin the count, mean
    and standard deviation of the predictions (0 for an empty bin). As in
    Azure ML a bin holds the values above its lower edge up to its upper
    edge; the first bin also holds what lies below, and values above the last
    edge are left out."""
    true, pred = _pair(y_true, y_pred)
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError("bins must be at least 1")
        lo, hi = float(true.min()), float(true.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
    else:
        edges = _finite("bins", np.asarray(bins, dtype=np.float64))
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError("bin edges must be at least two increasing numbers")
    n_bins = edges.size - 1
    index = np.searchsorted(edges[1:], true, side="left")
    inside = index < n_bins  # above the last edge: left out, as in Azure ML
    index, pred = index[inside], pred[inside]
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=pred, minlength=n_bins)
    means = np.divide(sums, counts, out=np.zeros(n_bins), where=counts > 0)
    squares = np.bincount(index, weights=(pred - means[index]) ** 2, minlength=n_bins)
    stds = np.sqrt(np.divide(squares, counts, out=np.zeros(n_bins), where=counts > 0))
    return _document(
        "predictions",
        PREDICTIONS_VERSION,
        {
            "bin_averages": _floats(means),
            "bin_errors": _floats(stds),
            "bin_counts": _ints(counts),
            "bin_edges": _floats(edges),
        },
    )


def _residual_edges(bound: float, num_bins: int) -> F64:
    """Azure ML's inner edges: num_bins - 1 evenly spaced edges over
    [-bound, bound], rounded to a few significant decimals."""
    num_edges = num_bins - 1
    places = int(max(2, -np.log10(bound) + 3))
    bound = float(np.ceil(bound * 10**places) / 10**places)
    size = bound / num_edges
    edge_places = int(max(2, -np.log10(size) + 3))
    return np.around(np.linspace(-bound, bound, num_edges), decimals=edge_places)


def residuals(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    bins: int = 10,
    y_std: float | None = None,
) -> dict[str, Any]:
    """A residuals document: residuals (y_pred - y_true) counted in `bins`
    bins, evenly spaced over +-2 standard deviations of the targets (`y_std`,
    by default that of y_true) with an outlier bin at each end whose outer
    edge is the extreme residual (or one bin width out). Also the residuals'
    mean, standard deviation and count."""
    true, pred = _pair(y_true, y_pred)
    if bins < 3:
        raise ValueError("bins must be at least 3 (two outlier bins and one inside)")
    std = float(np.std(true)) if y_std is None else float(y_std)
    std = std if std != 0 else 1.0
    res = pred - true
    inner = _residual_edges(2 * abs(std), bins)
    counts = np.bincount(np.searchsorted(inner, res, side="right"), minlength=bins)
    low, high = float(res.min()), float(res.max())
    first = low if low < inner[0] else inner[0] - abs(inner[1] - inner[0])
    last = high if high >= inner[-1] else inner[-1] + abs(inner[-1] - inner[-2])
    edges = np.concatenate(([first], inner, [last]))
    return _document(
        "residuals",
        RESIDUALS_VERSION,
        {
            "bin_edges": _floats(edges),
            "bin_counts": _ints(counts),
            "mean": float(np.mean(res)),
            "stddev": float(np.std(res)),
            "res_count": int(res.size),
        },
    )
