"""The image decode budget against a real service: solid-colour lossless
WebPs of a few hundred bytes that each decode to 4 MiB of pixels, built by
Pillow, in one request with scalars; a service whose request budget is
10 MiB of pixels and whose in-flight bound (2 MiB) is smaller than one
image's pixels."""

from __future__ import annotations

import io
import urllib.request
from collections.abc import Iterator

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from steplog import Experiment
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from tests import imagegen
from tests.support import ProtoClient, ServiceProcess, free_port

MiB = 1 << 20
BUDGET = 10 * MiB
SIDE = 1024  # 1024 x 1024 x 4 bytes: 4 MiB of pixels each


def solid_webp(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (SIDE, SIDE), (seed, 2 * seed, 3, 255)).save(out, "WEBP", lossless=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def svc(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    extra = {
        "STEPLOG_MAX_IMAGE_DECODE_BYTES": str(BUDGET),
        "STEPLOG_SERVICE_INFLIGHT_BYTES": str(2 * MiB),
        # A request that waited for room (for itself) would be shed after 5 s.
        "STEPLOG_BACKPRESSURE_TIMEOUT_S": "5",
    }
    log = tmp_path_factory.mktemp("decode-budget") / "service.log"
    proc = ServiceProcess(service_env, metrics_port=free_port(), log_path=log, extra_env=extra)
    yield proc.start()
    proc.stop()


def images(name: str, data: list[bytes], steps: list[int]) -> data_pb2.SeriesData:
    return data_pb2.SeriesData(
        name=name,
        images=data_pb2.ImagePoints(steps=steps, images=[data_pb2.Image(data=d) for d in data]),
    )


def inflight_bytes(svc: ServiceProcess) -> float:
    url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "steplog_ingest_inflight_bytes":
                return s.value
    raise AssertionError("no steplog_ingest_inflight_bytes")


def test_images_past_the_request_budget_are_rejected_and_the_rest_is_kept(
    svc: ServiceProcess, experiment_name: str
) -> None:
    webps = [solid_webp(i) for i in range(5)]
    assert all(len(w) < 4096 for w in webps)  # tiny files, 4 MiB of pixels each
    small = imagegen.png(4, 3)
    run = Experiment(experiment_name, url=svc.address).start_logging()
    raw = ProtoClient(svc.address)
    loss = data_pb2.SeriesData(
        name="loss", scalars=data_pb2.ScalarColumns(values=[0.5, 0.4, 0.3], steps=[0, 1, 2])
    )
    # 4 + 4 MiB fit the 10 MiB budget; the third and fourth would pass it;
    # the small PNG after them still fits; the next series shares the budget.
    reply = raw.write(
        run.id,
        loss,
        images("big", [webps[0], webps[1], webps[2], webps[3], small], [0, 1, 2, 3, 4]),
        images("more", [webps[4]], [0]),
    )
    result = reply.result
    assert result.accepted == 6 and result.rejected == 3
    assert [(c.reason, c.count) for c in result.reject_counts] == [
        (pb.REJECT_REASON_LIMIT_EXCEEDED, 3)
    ]
    assert [(p.name, p.index, p.step) for p in result.rejected_points] == [
        ("big", 2, 2),
        ("big", 3, 3),
        ("more", 0, 0),
    ]
    first = result.rejected_points[0].message
    assert f"decodes to {4 * MiB} bytes" in first and f"earlier images to {8 * MiB}" in first
    assert f"the {BUDGET} bytes" in first and "STEPLOG_MAX_IMAGE_DECODE_BYTES" in first
    assert "send it in another request" in first
    # Everything valid of the request is stored.
    assert list(raw.read(run.id, "loss").series.scalars.values) == [0.5, 0.4, 0.3]
    stored = raw.read(run.id, "big", include_bytes=True).series.images
    assert list(stored.steps) == [0, 1, 4]
    assert [i.data for i in stored.images] == [webps[0], webps[1], small]
    assert [(i.width, i.height) for i in stored.images] == [(SIDE, SIDE)] * 2 + [(4, 3)]

    # Sent in a request of their own, the rejected images fit its budget.
    again = raw.write(run.id, images("more", [webps[2], webps[3]], [0, 1])).result
    assert again.accepted == 2 and again.rejected == 0
    assert list(raw.read(run.id, "more").series.images.steps) == [0, 1]
    # Each image's pixels (4 MiB) were charged while it decoded, capped to
    # the 2 MiB bound (else the request would have waited for itself and
    # been shed), and released: nothing stays in flight.
    assert inflight_bytes(svc) == 0
