"""What a log call hands the writer for a non-scalar kind, and the contract.

THE INTERFACE (stable; a new kind such as histograms plugs in here):

    writer.log_item(run_id, name, labels, kind, item, bound=0)

- `kind` is the name of a `SeriesData.points` oneof field ("table",
  "evaluations", "images", ...). "images" goes to the image stream
  (`<writer id>.img`); every other kind to the main stream, in order with the
  other messages of its series (run, name, labels, kind).
- `item` implements `Encodable`: `points` (how many points it carries, as
  the service counts them), `cost` (the bytes it holds in memory, counted
  against max_buffered_bytes) and `encode(name, labels, max_bytes)`, which
  returns the SeriesData messages, each at most max_bytes when it can be
  split. The log call builds the item on the caller's thread by CHECKING and
  COPYING values only (the error names the field); `encode` runs later on
  the writer's one background thread. An item whose encode raises is
  rejected on the client alone (INVALID_VALUE, in rejections()).
- `bound`: an upper bound of the encoded size, when the caller knows one;
  log_item raises ValueError at once when that cannot fit in any batch.

Implementations: ImageItem and Encoded here, RowsItem / TableItem /
EvaluationItem in steplog._tables.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from steplog._writer.transport import Labels
from steplog._writer.wire import labels_overhead
from steplog.v1 import data_pb2

# A queued message: its encoded size plus this (the Python object).
MESSAGE_OVERHEAD_BYTES = 200


class Encodable(Protocol):
    """Values a log call copied, encoded later on the sender thread."""

    points: int
    cost: int  # the bytes it holds in memory

    def encode(self, name: str, labels: Labels, max_bytes: int) -> list[data_pb2.SeriesData]:
        """The SeriesData messages (each at most max_bytes, when it can be split)."""
        ...


class ImageItem:
    """One image's bytes (copied by the caller), time and step; its SHA-256
    and message are made on the sender thread."""

    __slots__ = ("cost", "data", "description", "points", "step", "time")

    def __init__(self, data: bytes, time: float, step: int | None, description: str) -> None:
        self.data = data
        self.time = time
        self.step = step
        self.description = description
        self.points = 1
        self.cost = len(data) + len(description) + MESSAGE_OVERHEAD_BYTES

    def encoded_bound(self, name: str, labels: Labels) -> int:
        """An upper bound of the encoded size (checked before it is queued)."""
        return (
            len(self.data)
            + 128
            + len(name.encode())
            + len(self.description.encode())
            + labels_overhead(labels)
        )

    def encode(self, name: str, labels: Labels, max_bytes: int) -> list[data_pb2.SeriesData]:
        image = data_pb2.Image(data=self.data, sha256=hashlib.sha256(self.data).hexdigest())
        points = data_pb2.ImagePoints(times=[self.time], images=[image])
        if self.step is not None:
            points.steps.append(self.step)
        return [
            data_pb2.SeriesData(
                name=name, labels=dict(labels), description=self.description, images=points
            )
        ]


class Encoded:
    """A pre-built message queued behind raw items (already encoded)."""

    __slots__ = ("cost", "points", "series", "size")

    def __init__(self, series: data_pb2.SeriesData, points: int, size: int) -> None:
        self.series = series
        self.points = points
        self.size = size
        self.cost = size + MESSAGE_OVERHEAD_BYTES

    def encode(self, name: str, labels: Labels, max_bytes: int) -> list[data_pb2.SeriesData]:
        return [self.series]
