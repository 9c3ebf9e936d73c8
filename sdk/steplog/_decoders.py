"""Turns non-scalar series (tables, evaluations, images, histograms) into Python values,
in the shapes Azure ML's `get_metrics` returned."""

from __future__ import annotations

import json
from typing import Any

from steplog.v1 import data_pb2


def decode(data: data_pb2.SeriesData) -> Any:
    which = data.WhichOneof("points")
    if which == "evaluations":
        docs = [json.loads(d) for d in data.evaluations.documents]
        return docs[0] if len(docs) == 1 else docs
    if which == "table":
        return table_columns(data.table)
    if which == "images":
        refs = image_refs(data.images)
        return refs[0] if len(refs) == 1 else refs
    if which == "histograms":
        from steplog._histograms import as_lists, decode

        points = as_lists(decode(data.histograms))
        return points[0] if len(points) == 1 else points
    return None


def image_refs(points: data_pb2.ImagePoints) -> list[dict[str, Any]]:
    """The logged images as references (step, sha256, size, content type,
    width, height); `run.download_file`-style byte access is by ReadSeries."""
    steps = list(points.steps)
    return [
        {
            "step": steps[i] if i < len(steps) else None,
            "sha256": img.sha256,
            "size": img.size,
            "content_type": img.content_type,
            "width": img.width,
            "height": img.height,
        }
        for i, img in enumerate(points.images)
    ]


def table_columns(table: data_pb2.TableColumns) -> dict[str, list[Any]]:
    """{column: [cells]} in row order; None where a row has no cell (a
    column added after the row was logged, or a missing value)."""
    out: dict[str, list[Any]] = {}
    for col in table.columns:
        which = _VALUES.get(col.type)
        values: list[Any] = list(getattr(col, which)) if which else [None] * table.row_count
        if len(col.present):
            values = [v if p else None for v, p in zip(values, col.present, strict=True)]
        have = out.get(col.name)
        if have is None:
            out[col.name] = values
        else:  # the same column in several typed parts: fill the gaps
            out[col.name] = [v if h is None else h for h, v in zip(have, values, strict=True)]
    return out


_VALUES = {
    data_pb2.COLUMN_TYPE_DOUBLE: "doubles",
    data_pb2.COLUMN_TYPE_INT64: "ints",
    data_pb2.COLUMN_TYPE_STRING: "strings",
    data_pb2.COLUMN_TYPE_BOOL: "bools",
}
