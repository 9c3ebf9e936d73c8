"""The client's background writer: `run.log()` never blocks, never loses a
point. The design and its guarantees are in steplog._writer.writer; the
package's layout is listed there.

Importing a submodule (steplog._writer.transport, as the client does for
TransportError) must stay cheap, so the public names below are loaded on
first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steplog._writer.outcomes import (
        DeliveryError,
        DeliveryWarning,
        DroppedPointsWarning,
        PointsRejectedError,
        RejectedPointsWarning,
        SteplogWarning,
        WriterStats,
    )
    from steplog._writer.replay import ReplayReport, replay_spool
    from steplog._writer.settings import WriterSettings, default_spool_dir
    from steplog._writer.transport import (
        GrpcTransport,
        IngestStream,
        Rejection,
        Transport,
        TransportError,
    )
    from steplog._writer.writer import BatchWriter

_WHERE = {
    "BatchWriter": "writer",
    "DeliveryError": "outcomes",
    "DeliveryWarning": "outcomes",
    "DroppedPointsWarning": "outcomes",
    "PointsRejectedError": "outcomes",
    "RejectedPointsWarning": "outcomes",
    "SteplogWarning": "outcomes",
    "WriterStats": "outcomes",
    "ReplayReport": "replay",
    "replay_spool": "replay",
    "WriterSettings": "settings",
    "default_spool_dir": "settings",
    "GrpcTransport": "transport",
    "IngestStream": "transport",
    "Rejection": "transport",
    "Transport": "transport",
    "TransportError": "transport",
}

__all__ = [
    "BatchWriter",
    "DeliveryError",
    "DeliveryWarning",
    "DroppedPointsWarning",
    "GrpcTransport",
    "IngestStream",
    "PointsRejectedError",
    "RejectedPointsWarning",
    "Rejection",
    "ReplayReport",
    "SteplogWarning",
    "Transport",
    "TransportError",
    "WriterSettings",
    "WriterStats",
    "default_spool_dir",
    "replay_spool",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'steplog._writer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"steplog._writer.{module}"), name)
