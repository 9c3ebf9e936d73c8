"""Test support: the service as a real subprocess on a free loopback port,
and a client written from the proto alone.

The benchmarks' helper serves the tests too (bench/ may not import tests/;
tests may import bench/), so there is one way to run the service as a process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ServiceProcess, free_port
from steplog.client import Client
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from steplog.v1 import query_service_pb2 as qs

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "ProtoClient", "ServiceProcess", "free_port", "scalar_series"]


def scalar_series(
    name: str,
    steps: list[int],
    values: list[float],
    times: list[float] | None = None,
    **kw: Any,
) -> data_pb2.SeriesData:
    """A numeric series' columns as SeriesData, for ProtoClient.write."""
    scalars = data_pb2.ScalarColumns(steps=steps, values=values, times=times or [])
    return data_pb2.SeriesData(name=name, scalars=scalars, **kw)


class ProtoClient:
    """A client written from the proto alone, for what the Python client would
    not send: unary Write with a writer id of its own (sequence 1, 2, ...),
    and reads through the raw query stubs.

    strict: every write must come back without a rejected point."""

    def __init__(
        self, url: str, prefix: str = "raw", strict: bool = False, workspace: str = "default"
    ) -> None:
        self.client = Client(url, workspace)
        self.workspace = workspace
        self.writer_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.sequence = 0
        self.strict = strict

    def write(self, run_id: str, *series: data_pb2.SeriesData) -> pb.WriteResponse:
        """One batch of the given series of one run, as the next sequence."""
        self.sequence += 1
        batch = pb.Batch(
            writer_id=self.writer_id,
            sequence=self.sequence,
            series=[pb.RunSeries(run_id=run_id, series=s) for s in series],
        )
        # The stub itself, not Client.call: sent once, a failure raises grpc.RpcError.
        reply = self.client.ingest.Write(pb.WriteRequest(workspace=self.workspace, batch=batch))
        if self.strict:
            assert not reply.result.reject_counts, reply.result
        return reply

    def read(self, run_id: str, name: str, **kw: Any) -> qs.ReadSeriesResponse:
        """One page of ReadSeries."""
        return self.client.call(
            self.client.queries.ReadSeries,
            qs.ReadSeriesRequest(workspace=self.workspace, run_id=run_id, name=name, **kw),
        )

    def read_all(self, run_id: str, name: str, **kw: Any) -> list[qs.ReadSeriesResponse]:
        """Every page of ReadSeries."""
        request = qs.ReadSeriesRequest(workspace=self.workspace, run_id=run_id, name=name, **kw)
        return list(self.pages("ReadSeries", request))

    def pages(self, method: str, request: Any) -> Iterator[Any]:
        """Every page of a paged query (following next_page_token)."""
        stub = getattr(self.client.queries, method)
        for _ in range(10_000):
            reply = self.client.call(stub, request)
            yield reply
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token
        raise AssertionError("a read that never ends")
