"""Turns non-scalar series (tables, evaluations, images) into Python values."""

from __future__ import annotations

from typing import Any

from steplog.v1 import data_pb2


def decode(data: data_pb2.SeriesData) -> Any:
    which = data.WhichOneof("points")
    if which == "evaluations":
        import json

        docs = [json.loads(d) for d in data.evaluations.documents]
        return docs[0] if len(docs) == 1 else docs
    return None
