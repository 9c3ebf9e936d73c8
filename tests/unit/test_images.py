"""Image checks, file names and blob keys: pure code, no I/O."""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.api.artifacts import artifact_path, path_prefix, sha256_field
from ingest.core import images
from ingest.core.batch import (
    INVALID_IMAGE,
    KIND_IMAGE,
    LIMIT_EXCEEDED,
    VALUE_NUMERIC,
    Chunk,
    DecodedBatch,
    Outcome,
)
from ingest.core.errors import ApiError, StoreUnavailable
from ingest.core.images import ImageError, ImageInfo, check, normalize_content_type, sniff
from ingest.store.blobs import MIN_PART_BYTES, blob_key, part_size
from ingest.store.image_blobs import store_image_blobs
from steplog._uploads import check_name, image_bytes, inside, source_of
from steplog.errors import InvalidArgumentError
from steplog.v1 import data_pb2
from tests import imagegen

# -- format, size and corruption (images Pillow writes, and Pillow's own broken files) --------

DATA = Path(__file__).resolve().parents[1] / "data" / "images"


@pytest.mark.parametrize(
    ("data", "content_type", "size"),
    [
        (imagegen.png(4, 3), "image/png", (4, 3)),
        (imagegen.png(148, 148, seed=2), "image/png", (148, 148)),
        (imagegen.encode(imagegen.picture(7, 5, mode="L"), "PNG"), "image/png", (7, 5)),
        (imagegen.encode(imagegen.picture(7, 5, mode="RGBA"), "PNG"), "image/png", (7, 5)),
        (imagegen.encode(imagegen.picture(7, 5, mode="P"), "PNG"), "image/png", (7, 5)),
        (imagegen.jpeg(5, 7), "image/jpeg", (5, 7)),
        (imagegen.encode(imagegen.picture(9, 4, mode="L"), "JPEG"), "image/jpeg", (9, 4)),
        (imagegen.gif(6, 2), "image/gif", (6, 2)),
        (imagegen.webp(9, 3), "image/webp", (9, 3)),
        (imagegen.webp(10, 12, lossless=False), "image/webp", (10, 12)),
        (imagegen.encode(imagegen.picture(30, 20, mode="RGBA"), "WEBP"), "image/webp", (30, 20)),
        (imagegen.animated("GIF"), "image/gif", (8, 6)),
        (imagegen.animated("PNG"), "image/png", (8, 6)),
        (imagegen.animated("WEBP"), "image/webp", (8, 6)),
        ((DATA / "dispose_prev.gif").read_bytes(), "image/gif", (100, 100)),
        ((DATA / "hopper.webp").read_bytes(), "image/webp", (128, 128)),
    ],
)
def test_whole_images_are_taken(data: bytes, content_type: str, size: tuple[int, int]) -> None:
    found = sniff(data)
    assert (found.content_type, found.width, found.height) == (content_type, *size)
    info = check(data, "", 0, 0, "", 1 << 20)
    assert (info.content_type, info.width, info.height) == (content_type, *size)


def test_animations_count_every_frame() -> None:
    assert sniff(imagegen.animated("GIF", frames=4)).frames == 4
    assert sniff(imagegen.animated("PNG", frames=3)).frames == 3


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


_PNG = imagegen.png(16, 12, seed=5)
_JPEG = imagegen.jpeg(16, 12)
_GIF = imagegen.gif(16, 12)
_WEBP = imagegen.webp(16, 12)
_APNG = imagegen.animated("PNG", frames=3)
_AGIF = imagegen.animated("GIF", frames=3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"GIF90a" + b"\x00" * 20, "unknown image format"),
        (b"%PDF-1.7 not an image", "unknown image format"),
        (imagegen.encode(imagegen.picture(4, 4), "BMP"), "unknown image format"),
        (_PNG[:-12], "PNG is truncated"),  # IEND cut off
        (_PNG[:-20], "PNG is truncated"),  # the last IDAT's CRC and some data
        (_PNG[: len(_PNG) // 2], "PNG is truncated"),
        (_PNG[:40], "PNG is truncated"),
        (_flip(_PNG, 20), "PNG is truncated or corrupt"),  # a byte of IHDR
        (_flip(_PNG, 45), "PNG is truncated or corrupt"),  # a byte of the pixel data
        (_flip(_PNG, len(_PNG) - 30), "PNG is truncated or corrupt"),
        (_APNG[: len(_APNG) * 2 // 3], "PNG is truncated"),  # a frame lost
        (_JPEG[:-2], "JPEG is truncated"),  # no end-of-image marker
        (_JPEG[: len(_JPEG) // 2], "JPEG is truncated"),
        (_JPEG[:20], "JPEG"),
        (_flip(_JPEG, 20), "JPEG"),  # a quantisation table
        (_GIF[:-1], "GIF is truncated"),  # the trailer
        (_GIF[: len(_GIF) // 2], "GIF is truncated"),
        (_AGIF[: len(_AGIF) * 2 // 3], "GIF is truncated"),  # cut between frames
        (_WEBP[:-1], "WebP is truncated"),
        (_WEBP[: len(_WEBP) // 2], "WebP is truncated"),
        (_flip(_WEBP, 20), "WebP is truncated or corrupt"),
        # from Pillow's own test corpus (tests/data/images/README.md)
        ((DATA / "broken.png").read_bytes(), "PNG is truncated or corrupt"),
        ((DATA / "truncated_end_chunk.png").read_bytes(), "PNG is truncated"),
        ((DATA / "truncated_jpeg.jpg").read_bytes(), "JPEG is truncated"),
    ],
)
def test_corrupt_and_unknown_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        check(data, "", 0, 0, "", 1 << 20)


@pytest.mark.parametrize("name", ["decompression_bomb.gif", "decompression_bomb_extents.gif"])
def test_pillows_decompression_bombs_are_over_the_limit(name: str) -> None:
    with pytest.raises(images.LimitError, match="too large to decode"):
        check((DATA / name).read_bytes(), "", 0, 0, "", 1 << 20)


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "L"), ("PNG", "RGB"), ("WEBP", "RGB"), ("GIF", "P")]
)
def test_a_small_file_of_too_many_pixels_is_refused_before_decoding(
    fmt: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One colour compresses to almost nothing: a few KiB that would decode to
    more than MAX_DECODED_BYTES. The header says so; nothing is decoded."""
    side = 6000 if mode in ("L", "P") else 3000  # 36 MB either way
    data = imagegen.encode(
        Image.new(mode, (side, side)), fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    assert len(data) < 100_000
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 32 << 20)
    decoded: list[bytes] = []
    monkeypatch.setattr(images, "decode", lambda data, found: decoded.append(data))
    with pytest.raises(images.LimitError, match=f"{side}x{side} {mode}.*limit is 33554432"):
        check(data, "", 0, 0, "", 1 << 20)
    assert not decoded


def test_animation_frames_count_against_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    data = imagegen.animated("PNG", 64, 64, frames=8)  # 8 x 64 x 64 x 4 = 131072 bytes
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 131_072)
    assert check(data, "", 0, 0, "", 1 << 20).width == 64
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 131_071)
    with pytest.raises(images.LimitError, match="8 frames"):
        check(data, "", 0, 0, "", 1 << 20)


def test_declared_fields_must_match_the_bytes() -> None:
    data = imagegen.png(4, 3)
    digest = hashlib.sha256(data).hexdigest()
    info = check(data, "image/PNG; charset=binary", 4, 3, digest.upper(), 1 << 20)
    assert (info.sha256, info.size, info.width, info.height) == (digest, len(data), 4, 3)
    assert check(data, "", 0, 0, "", 1 << 20).content_type == "image/png"
    with pytest.raises(ImageError, match="content type says 'image/jpeg'"):
        check(data, "image/jpeg", 0, 0, "", 1 << 20)
    with pytest.raises(ImageError, match="declared size 5x3"):
        check(data, "", 5, 3, "", 1 << 20)
    with pytest.raises(ImageError, match="does not match the bytes"):
        check(data, "", 0, 0, "0" * 64, 1 << 20)
    with pytest.raises(images.LimitError, match="limit is 10"):
        check(data, "", 0, 0, "", 10)


def test_content_type_aliases() -> None:
    assert normalize_content_type("image/jpg") == "image/jpeg"
    assert normalize_content_type(" Image/X-PNG ") == "image/png"
    assert normalize_content_type("") == ""


# -- validation of a chunk ------------------------------------------------------------------


def _chunk(images_: list[data_pb2.Image]) -> Chunk:
    n = len(images_)
    return Chunk(
        run_id="r",
        name="samples",
        labels={},
        labels_key="",
        kind=KIND_IMAGE,
        value_type=VALUE_NUMERIC,
        stepped=True,
        out_of_order=None,
        description="",
        steps=np.arange(n, dtype=np.int64),
        times=np.full(n, 1.7e9),
        values=None,
        texts=None,
        payload=list(images_),
    )


def test_validate_images_rejects_point_by_point() -> None:
    good = imagegen.png(4, 3)
    chunk = _chunk(
        [
            data_pb2.Image(data=good),
            data_pb2.Image(data=b"junk"),
            data_pb2.Image(data=imagegen.png(64, 64)),
            data_pb2.Image(data=imagegen.gif(), width=7),
        ]
    )
    outcome = Outcome()
    images.validate_images(chunk, outcome, max_bytes=1000)
    assert chunk.alive.tolist() == [True, False, False, False]
    assert outcome.by_reason == {INVALID_IMAGE: 2, LIMIT_EXCEEDED: 1}
    assert [e[3] for e in outcome.examples] == [1, 2, 3]
    info = chunk.payload[0] if chunk.payload else None
    assert isinstance(info, ImageInfo) and not info.stored
    assert chunk.payload is not None and chunk.payload[1:] == [None, None, None]
    # The hash is the point's value for the step rules (duplicate vs conflict).
    assert chunk.texts == [hashlib.sha256(good).hexdigest(), "", "", ""]


def test_many_bad_images_are_rejected_in_linear_time() -> None:
    """Each rejection used to build a mask of the chunk's length: n bad
    images cost O(n^2) (minutes for 100,000). They now take well under a
    second of this process's CPU (CPU time, not wall time: other work on the
    machine does not count)."""
    chunk = _chunk([data_pb2.Image()] * 100_000)
    outcome = Outcome()
    started = time.process_time()
    images.validate_images(chunk, outcome, max_bytes=1000)
    assert time.process_time() - started < 5
    assert outcome.by_reason == {INVALID_IMAGE: 100_000} and not chunk.alive.any()
    assert len(outcome.examples) <= 20


def test_a_huge_declared_content_type_is_not_echoed_whole() -> None:
    chunk = _chunk([data_pb2.Image(data=imagegen.png(2, 2), content_type="x" * 1_000_000)])
    outcome = Outcome()
    images.validate_images(chunk, outcome, max_bytes=10_000)
    assert outcome.by_reason == {INVALID_IMAGE: 1}
    assert len(outcome.examples[0][6]) < 400


# -- file names, hashes and blob keys ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../b", "/etc/passwd", "a\\b", "a\x00b", "a//b", "./a", "a/", "C:/x", "", "a\nb"],
)
def test_unsafe_file_names_are_refused_by_service_and_client(name: str) -> None:
    with pytest.raises(ApiError) as err:
        artifact_path(name)
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgumentError):
        check_name(name)


@pytest.mark.parametrize("name", ["model.pt", "outputs/ckpt/epoch-3.pt", "a b/ü.txt", "x..y"])
def test_ordinary_file_names_pass(name: str) -> None:
    assert artifact_path(name) == name == check_name(name)


def test_prefixes_and_hashes() -> None:
    assert path_prefix("") == "" and path_prefix("outputs/") == "outputs/"
    with pytest.raises(ApiError):
        path_prefix("/")
    with pytest.raises(ApiError):
        path_prefix("../")
    assert sha256_field("AB" * 32) == "ab" * 32
    with pytest.raises(ApiError):
        sha256_field("xyz")


def test_blob_keys_are_content_addresses() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert blob_key(digest) == f"blobs/sha256/{digest[:2]}/{digest[2:]}"
    for bad in ("", "../../etc", digest.upper(), digest[:-1]):
        with pytest.raises(ValueError):
            blob_key(bad)


def test_part_sizes_fit_any_file_in_10000_parts() -> None:
    assert part_size(1, 0) == MIN_PART_BYTES
    assert part_size(16 << 20, 100 << 20) == 16 << 20
    huge = 5 * 1024**4
    assert part_size(16 << 20, huge) * 10_000 >= huge
    # Unknown size: parts double every 1000, so 10,000 parts hold over 4 TiB.
    total = sum(part_size(16 << 20, 0, n) for n in range(1, 10_001))
    assert total > 4 * 1024**4


def test_downloads_stay_inside_their_directory(tmp_path: Path) -> None:
    assert inside(tmp_path, "a/b.txt") == (tmp_path / "a" / "b.txt").resolve()
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(InvalidArgumentError):
        inside(tmp_path, "link/etc/passwd")


# -- client-side sources ------------------------------------------------------------------------


class _Figure:
    def savefig(self, out: io.BytesIO, format: str) -> None:
        assert format == "png"
        out.write(imagegen.png())


def test_image_bytes_from_every_kind_of_argument(tmp_path: Path) -> None:
    data = imagegen.png()
    f = tmp_path / "x.png"
    f.write_bytes(data)
    assert image_bytes(str(f)) == image_bytes(f) == image_bytes(data) == data
    assert image_bytes(io.BytesIO(data)) == data
    assert image_bytes(plot=_Figure()) == data
    with pytest.raises(InvalidArgumentError):
        image_bytes()
    with pytest.raises(InvalidArgumentError):
        image_bytes(data, plot=_Figure())
    with pytest.raises(InvalidArgumentError):
        image_bytes(plot=object())
    with pytest.raises(InvalidArgumentError):
        image_bytes(io.StringIO("text"))


def test_sources_read_again_for_every_attempt(tmp_path: Path) -> None:
    payload = b"head" + struct.pack(">Q", 7) * 1000
    stream = io.BytesIO(b"skip" + payload)
    stream.seek(4)
    src = source_of(stream)
    assert src.digest() == (hashlib.sha256(payload).hexdigest(), len(payload))
    assert src.digest()[1] == len(payload) == src.size()
    snap = source_of(io.BytesIO(payload), snapshot=True)
    assert snap.digest()[1] == len(payload)
    snap.discard()
    with pytest.raises(FileNotFoundError):
        source_of(tmp_path / "missing")


# -- blobs before rows ------------------------------------------------------------------------


class _FakeBlobs:
    """BlobStore's put, recording calls; fails for the hashes in `down`."""

    def __init__(self, down: set[str] | None = None) -> None:
        self.puts: list[str] = []
        self.down = down or set()

    async def put(self, sha256: str, data: bytes, content_type: str = "") -> None:
        if sha256 in self.down:
            raise StoreUnavailable("object store unavailable (put_object): refused")
        assert data and content_type == "image/png"
        self.puts.append(sha256)


def _batch(pictures: list[bytes]) -> DecodedBatch:
    chunk = _chunk([data_pb2.Image(data=p) for p in pictures])
    outcome = Outcome()
    images.validate_images(chunk, outcome, max_bytes=1 << 20)
    return DecodedBatch("default", "w", 1, 0.0, 0.0, [chunk], outcome, len(chunk))


def test_blobs_are_stored_once_per_content_then_released() -> None:
    a, b = imagegen.png(3, 3, seed=1), imagegen.png(3, 3, seed=2)
    batch = _batch([a, b"junk", b, a])
    fake = _FakeBlobs()
    stored = asyncio.run(store_image_blobs(fake, batch))  # type: ignore[arg-type]
    assert stored == 2 and sorted(fake.puts) == sorted(
        {hashlib.sha256(x).hexdigest() for x in (a, b)}
    )
    infos = [i for i in batch.chunks[0].payload or [] if i is not None]
    assert len(infos) == 3 and all(i.stored and i.data == b"" for i in infos)
    # Nothing is left to store (a retried transaction, a second submit).
    assert asyncio.run(store_image_blobs(fake, batch)) == 0  # type: ignore[arg-type]


def test_a_failed_blob_fails_the_batch_and_marks_nothing_stored() -> None:
    a, b = imagegen.png(3, 3, seed=1), imagegen.png(3, 3, seed=2)
    batch = _batch([a, b])
    fake = _FakeBlobs(down={hashlib.sha256(b).hexdigest()})
    with pytest.raises(StoreUnavailable):
        asyncio.run(store_image_blobs(fake, batch))  # type: ignore[arg-type]
    assert not any(i.stored for i in batch.chunks[0].payload or [] if i is not None)
