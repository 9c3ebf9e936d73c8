"""The image decode budget: a request's images together, and the pixels of
its largest image charged to the service's in-flight bytes while it decodes.
Real images built by Pillow; the servicer without a pipeline (decoding only)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from ingest.api.ingest import IngestServicer
from ingest.core.images import (
    MAX_DECODED_BYTES,
    DecodeBudget,
    LimitError,
    check,
    peak_decoded_bytes,
)
from ingest.core.validate import Limits
from ingest.observe.metrics import Metrics
from ingest.write.backpressure import Overloaded
from steplog.v1 import data_pb2
from steplog.v1 import ingest_service_pb2 as pb
from tests import imagegen

MiB = 1 << 20
DATA = Path(__file__).resolve().parent.parent / "data" / "images"


def solid_webp(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (1, 2, 3, 255)).save(out, "WEBP", lossless=True)
    return out.getvalue()


def request(*images: bytes) -> pb.WriteRequest:
    series = data_pb2.SeriesData(
        name="img",
        images=data_pb2.ImagePoints(
            steps=list(range(len(images))), images=[data_pb2.Image(data=d) for d in images]
        ),
    )
    batch = pb.Batch(writer_id="w", sequence=1, series=[pb.RunSeries(run_id="r", series=series)])
    return pb.WriteRequest(workspace="default", batch=batch)


def test_the_budget_is_shared_and_counted_before_decoding() -> None:
    big = solid_webp(1024)  # 4 MiB of pixels
    budget = DecodeBudget(10 * MiB)
    for _ in range(2):
        check(big, "", 0, 0, "", 16 * MiB, budget)
    assert budget.used == 8 * MiB
    with pytest.raises(LimitError, match="earlier images to 8388608: more than the 10485760"):
        check(big, "", 0, 0, "", 16 * MiB, budget)
    assert budget.used == 8 * MiB  # the refused image is not counted
    check(imagegen.png(4, 3), "", 0, 0, "", 16 * MiB, budget)
    assert budget.used == 8 * MiB + 48


def test_peak_is_the_largest_image_a_request_decodes() -> None:
    bomb = (DATA / "decompression_bomb.gif").read_bytes()
    batch = request(imagegen.png(4, 3), solid_webp(1024), b"not an image", bomb, solid_webp(512))
    assert peak_decoded_bytes(batch.batch, 16 * MiB) == 4 * MiB
    # An image over the size limit is refused before its header is read: at
    # 80 bytes only the 58-byte WebP of 512 x 512 is left (1 MiB of pixels).
    sizes = [len(i.data) for i in batch.batch.series[0].series.images.images]
    assert sizes[1] > 80 and sizes[4] <= 80 and sizes[0] > 80
    assert peak_decoded_bytes(batch.batch, 80) == 1 * MiB
    assert peak_decoded_bytes(request().batch, 16 * MiB) == 0
    assert 4 * MiB < MAX_DECODED_BYTES


def test_decoding_waits_for_room_for_the_pixels_and_is_shed() -> None:
    async def main() -> None:
        servicer = IngestServicer(
            None,  # type: ignore[arg-type]  # decoding only: nothing is submitted
            Limits(),
            Metrics(process=False),
            inflight_bytes=8 * MiB,
            wait_s=0.2,
        )
        raw = request(solid_webp(1024)).SerializeToString()
        # Another request holds 5 MiB: 4 MiB of pixels do not fit beside it.
        servicer.inflight.force(5 * MiB)
        with pytest.raises(Overloaded, match="service in-flight bound") as err:
            await servicer._decode(raw, pb.WriteRequest, len(raw))
        assert err.value.bound == "service"
        servicer.inflight.release(5 * MiB)
        batch, _ = await servicer._decode(raw, pb.WriteRequest, len(raw))
        assert batch.outcome.rejected == 0 and batch.points == 1
        assert servicer.inflight.used == 0  # the pixels' charge ends with decoding

    asyncio.run(main())
