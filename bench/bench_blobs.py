"""Images and files against the raw S3 throughput of the same server.

IMAGES: one client logs distinct 64 KiB PNGs (random pixels, built with zlib
and struct) with `run.log_image(..., step=i)` in a plain loop, timed until
every image is acknowledged (stored in S3 and committed). The ceiling: the
same number of 64 KiB objects PUT straight to the same S3 server with
aiobotocore, 16, 64 (the service's s3_concurrency) and 256 in flight, each
printed; the best is the ceiling.

FILES: `run.upload_file` of a file of --file-mb MiB (1 GiB by default), from
the client's first read to the answer. The ceiling: aiobotocore multipart
upload of the same file to the same server, parts of the service's size,
4 (what the service keeps in flight per upload), 8 and 16 parts in flight,
each printed; the best is the ceiling.

Both use the S3 client settings the service uses. Each measurement is
repeated (--repeats), each time followed by its ceiling; the rates are
medians, and the ratio is the median of the per-repeat ratios, which holds
up better than a ratio of medians on a machine whose load drifts:

    python -m bench.bench_blobs [--images 2000] [--file-mb 1024] [--repeats 3]

Prints `IMAGES images_per_s=... ceiling=... ratio=...` and
`FILES mb_per_s=... ceiling_mb_per_s=... ratio=... hash_mb_per_s=...
hash_then_ceiling_mb_per_s=...`: the last two are one SHA-256 pass over the
file (the client hashes before it uploads) and what a hash pass followed by
the ceiling's upload would reach, which bounds the client's upload.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from bench.common import bench_stack, median, png, service, sql
from ingest.config import Config
from ingest.devstack import StackInfo

MiB = 1024 * 1024
CONCURRENCY = Config.s3_concurrency
PART_BYTES = Config.s3_part_bytes
IMAGE_IN_FLIGHT = (16, CONCURRENCY, 256)  # the images ceiling's counts of PUTs in flight
# Parts of one file upload the service keeps in flight (a constant of
# ingest/store/blobs.py, not a setting): the first of the file ceiling's counts.
PARTS_IN_FLIGHT = 4
FILE_PARTS_IN_FLIGHT = (PARTS_IN_FLIGHT, 8, 16)  # the file ceiling's counts


def images(n: int, seed: int) -> list[bytes]:
    """n distinct PNGs of about 64 KiB (148x148 random RGB pixels)."""
    return [png(148, 148, seed=seed + i, level=1) for i in range(n)]


def s3_client(info: StackInfo, connections: int = CONCURRENCY) -> Any:
    config = AioConfig(
        max_pool_connections=connections,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path", "payload_signing_enabled": False},
    )
    return get_session().create_client(
        "s3",
        endpoint_url=info.s3_endpoint,
        region_name=info.s3_region,
        aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=info.s3_secret_key,
        config=config,
    )


async def ceiling_images(info: StackInfo, blobs: list[bytes], in_flight: int) -> float:
    prefix = f"bench/ceiling/{uuid.uuid4().hex}"
    async with s3_client(info, in_flight) as c:
        slots = asyncio.Semaphore(in_flight)

        async def put(i: int, body: bytes) -> None:
            async with slots:
                await c.put_object(Bucket=info.s3_bucket, Key=f"{prefix}/{i}", Body=body)

        start = time.perf_counter()
        await asyncio.gather(*(put(i, b) for i, b in enumerate(blobs)))
        return len(blobs) / (time.perf_counter() - start)


def parts_of(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while body := f.read(PART_BYTES):
            yield body


async def ceiling_file(info: StackInfo, path: Path, size: int, in_flight: int) -> float:
    key = f"bench/ceiling/{uuid.uuid4().hex}"
    async with s3_client(info, max(in_flight, 10)) as c:
        start = time.perf_counter()
        created = await c.create_multipart_upload(Bucket=info.s3_bucket, Key=key)
        upload_id = created["UploadId"]
        room = asyncio.Semaphore(in_flight)
        parts: list[asyncio.Task[dict[str, Any]]] = []

        async def part(number: int, body: bytes) -> dict[str, Any]:
            try:
                r = await c.upload_part(
                    Bucket=info.s3_bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                return {"PartNumber": number, "ETag": r["ETag"]}
            finally:
                room.release()

        for number, body in enumerate(parts_of(path), start=1):
            await room.acquire()
            parts.append(asyncio.create_task(part(number, body)))
        done = await asyncio.gather(*parts)
        await c.complete_multipart_upload(
            Bucket=info.s3_bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": list(done)},
        )
        elapsed = time.perf_counter() - start
        await c.delete_object(Bucket=info.s3_bucket, Key=key)
    return size / MiB / elapsed


def log_images(url: str, blobs: list[bytes]) -> tuple[float, str]:
    from steplog import Experiment

    run = Experiment("bench-blobs", url=url).start_logging()
    start = time.perf_counter()
    for step, data in enumerate(blobs):
        run.log_image("samples", data, step=step)
    if not run.flush(600):
        raise SystemExit("images were not all acknowledged")
    elapsed = time.perf_counter() - start
    run.complete()
    return len(blobs) / elapsed, run.id


def upload(url: str, path: Path) -> float:
    from steplog import Experiment

    run = Experiment("bench-blobs", url=url).start_logging()
    size = path.stat().st_size
    start = time.perf_counter()
    info = run.upload_file("outputs/big.bin", path, show_progress=False).result()
    elapsed = time.perf_counter() - start
    run.complete()
    assert info.size == size
    return size / MiB / elapsed


def hash_rate(path: Path) -> float:
    """MB/s of one SHA-256 pass over the file, as the client makes before an
    upload (the upload's header carries the hash, so that pass cannot
    overlap the upload)."""
    h = hashlib.sha256()
    start = time.perf_counter()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return path.stat().st_size / MiB / (time.perf_counter() - start)


def serial(a: float, b: float) -> float:
    """The rate of two passes over the same bytes one after the other."""
    return 1.0 / (1.0 / a + 1.0 / b)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--file-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    ns = p.parse_args()
    ours_i: list[float] = []
    ceil_i: list[float] = []
    ours_f: list[float] = []
    ceil_f: list[float] = []
    hash_f: list[float] = []
    best_i: list[int] = []
    best_f: list[int] = []
    with (
        bench_stack() as (_stack, info, db),
        service(info, db) as svc,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for r in range(ns.repeats):
            batch = images(ns.images, seed=r * 1_000_000 + 1)
            rate, run_id = log_images(svc.address, batch)
            stored = sql(
                db,
                "SELECT count(*) FROM image_points p JOIN series s USING (series_id)"
                f" WHERE s.run_id = '{run_id}'",
            )
            if stored != ns.images:
                raise SystemExit(f"stored {stored} images, logged {ns.images}")
            ours_i.append(rate)
            found = {
                k: asyncio.run(
                    ceiling_images(info, images(ns.images, seed=r * 1_000_000 + 5 + k), k)
                )
                for k in IMAGE_IN_FLIGHT
            }
            best = max(found, key=found.__getitem__)
            ceil_i.append(found[best])
            best_i.append(best)
            print(
                f"  images run {r + 1}: {ours_i[-1]:.0f}/s, ceiling {ceil_i[-1]:.0f}/s"
                f" ({best} in flight; "
                + ", ".join(f"{k}: {v:.0f}" for k, v in found.items())
                + ")",
                flush=True,
            )
        path = Path(tmp) / "big.bin"
        with open(path, "wb") as f:
            for _ in range(ns.file_mb):
                f.write(os.urandom(MiB))
        for r in range(ns.repeats):
            with open(path, "r+b") as f:  # other content each time: nothing to deduplicate
                f.write(os.urandom(64))
            ours_f.append(upload(svc.address, path))
            found = {
                k: asyncio.run(ceiling_file(info, path, ns.file_mb * MiB, k))
                for k in FILE_PARTS_IN_FLIGHT
            }
            best = max(found, key=found.__getitem__)
            ceil_f.append(found[best])
            best_f.append(best)
            hash_f.append(hash_rate(path))
            print(
                f"  file run {r + 1}: {ours_f[-1]:.0f} MB/s, ceiling {ceil_f[-1]:.0f} MB/s"
                f" ({best} parts in flight; "
                + ", ".join(f"{k}: {v:.0f}" for k, v in found.items())
                + "),"
                f" sha256 {hash_f[-1]:.0f} MB/s, hash then ceiling"
                f" {serial(hash_f[-1], ceil_f[-1]):.0f} MB/s",
                flush=True,
            )
    ratio_i = median([a / b for a, b in zip(ours_i, ceil_i, strict=True)])
    ratio_f = median([a / b for a, b in zip(ours_f, ceil_f, strict=True)])
    print(
        f"IMAGES images_per_s={median(ours_i):.0f} ceiling={median(ceil_i):.0f}"
        f" ratio={ratio_i:.2f} ceiling_in_flight={max(IMAGE_IN_FLIGHT, key=best_i.count)}"
        f" images={ns.images} repeats={ns.repeats} cpus={os.cpu_count()}"
    )
    print(
        f"FILES mb_per_s={median(ours_f):.0f} ceiling_mb_per_s={median(ceil_f):.0f}"
        f" ratio={ratio_f:.2f}"
        f" ceiling_parts_in_flight={max(FILE_PARTS_IN_FLIGHT, key=best_f.count)}"
        f" hash_mb_per_s={median(hash_f):.0f}"
        f" hash_then_ceiling_mb_per_s={median(list(map(serial, hash_f, ceil_f))):.0f}"
        f" file_mb={ns.file_mb} repeats={ns.repeats}"
    )


if __name__ == "__main__":
    main()
