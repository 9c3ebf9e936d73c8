"""Image points: what the bytes are, checked against what the client said. Pure.

The service stores an image only when its bytes are a complete PNG, JPEG, GIF
or WebP: the format, width and height are read from the headers (no pixel
decoding, so no Pillow), and the structure is walked far enough to catch
truncation and most corruption (PNG chunk CRCs, the JPEG end marker, the GIF
trailer, the RIFF size of a WebP). Whatever the client declared (content
type, width, height, SHA-256) must agree with the bytes: a viewer trusts
these fields, so a mismatch is an error, not something to fix up silently.

The SHA-256 is the image's blob address, and also its value for the step
rules: logging the same image at the same step again is a duplicate, another
image at that step a conflict, exactly as for a text metric.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from ingest.core.batch import INVALID_IMAGE, LIMIT_EXCEEDED, Chunk, Outcome

PNG = "image/png"
JPEG = "image/jpeg"
GIF = "image/gif"
WEBP = "image/webp"
CONTENT_TYPES = (PNG, JPEG, GIF, WEBP)
# Names clients send for the same formats.
_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG, "image/x-png": PNG}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are not frames.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM, RST0..7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
# Formats allow larger, but nothing a training job logs comes near this.
MAX_SIDE = 1 << 24


class ImageError(ValueError):
    """Bytes that are not a complete image of a supported format."""


class LimitError(ValueError):
    """An image over the configured size limit."""


@dataclass(frozen=True, slots=True)
class Sniffed:
    content_type: str
    width: int
    height: int


@dataclass(slots=True)
class ImageInfo:
    """A validated image point: its bytes until they are stored, and its row."""

    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int
    size: int
    stored: bool = False


def normalize_content_type(value: str) -> str:
    """'Image/JPG; q=1' -> 'image/jpeg'; '' stays '' (take it from the bytes)."""
    base = value.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff(data: bytes) -> Sniffed:
    """The format and pixel size of `data`; ImageError says what is wrong."""
    if data.startswith(_PNG_SIGNATURE):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    if not data:
        raise ImageError("the image is empty")
    raise ImageError(
        f"unknown image format (starts with {data[:8].hex()}); use PNG, JPEG, GIF or WebP"
    )


def _size_ok(kind: str, width: int, height: int) -> Sniffed:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ImageError(f"{kind} header gives an impossible size {width}x{height}")
    return Sniffed({"PNG": PNG, "JPEG": JPEG, "GIF": GIF, "WebP": WEBP}[kind], width, height)


def _png(data: bytes) -> Sniffed:
    """Walk every chunk: IHDR first, CRCs right, at least one IDAT, IEND last."""
    pos, n = 8, len(data)
    width = height = 0
    seen_idat = False
    first = True
    while True:
        if pos + 12 > n:
            raise ImageError("PNG is truncated (no IEND chunk)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            raise ImageError(f"PNG is truncated inside its {ctype.decode('latin-1')!r} chunk")
        crc = struct.unpack_from(">I", data, end - 4)[0]
        if zlib.crc32(memoryview(data)[pos + 4 : end - 4]) != crc:
            raise ImageError(f"PNG {ctype.decode('latin-1')!r} chunk fails its CRC check")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise ImageError("PNG does not start with an IHDR chunk")
            width, height = struct.unpack_from(">II", data, pos + 8)
            first = False
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            if not seen_idat:
                raise ImageError("PNG has no image data (IDAT)")
            return _size_ok("PNG", width, height)
        pos = end


def _jpeg(data: bytes) -> Sniffed:
    """Walk the marker segments up to the scan; the frame gives the size;
    the file must end with the EOI marker (a truncated JPEG does not)."""
    pos, n = 2, len(data)
    size: tuple[int, int] | None = None
    while True:
        if pos + 2 > n or data[pos] != 0xFF:
            raise ImageError("JPEG is truncated or corrupt before its image data")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise ImageError("JPEG is truncated before its image data")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            if marker == 0xD9:
                raise ImageError("JPEG ends before its image data")
            continue
        if pos + 2 > n:
            raise ImageError("JPEG is truncated inside a marker segment")
        length = struct.unpack_from(">H", data, pos)[0]
        if length < 2 or pos + length > n:
            raise ImageError("JPEG marker segment runs past the end of the data")
        if marker in _SOF:
            if length < 7:
                raise ImageError("JPEG frame header is too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (width, height)
        elif marker == 0xDA:  # start of scan: the entropy-coded data follows
            if size is None:
                raise ImageError("JPEG has no frame header before its image data")
            if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise ImageError("JPEG is truncated (no end-of-image marker)")
            return _size_ok("JPEG", *size)
        pos += length


def _gif(data: bytes) -> Sniffed:
    if len(data) < 14:
        raise ImageError("GIF is truncated")
    if data[-1] != 0x3B:
        raise ImageError("GIF is truncated (no trailer)")
    width, height = struct.unpack_from("<HH", data, 6)
    return _size_ok("GIF", width, height)


def _webp(data: bytes) -> Sniffed:
    riff_size = struct.unpack_from("<I", data, 4)[0]
    if riff_size + 8 != len(data):
        raise ImageError(f"WebP RIFF size says {riff_size + 8} bytes; there are {len(data)}")
    if len(data) < 30:
        raise ImageError("WebP is truncated")
    fourcc, chunk_size = struct.unpack_from("<4sI", data, 12)
    if 20 + chunk_size > len(data):
        raise ImageError("WebP first chunk runs past the end of the data")
    if fourcc == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("WebP VP8 frame has no start code")
        w, h = struct.unpack_from("<HH", data, 26)
        return _size_ok("WebP", w & 0x3FFF, h & 0x3FFF)
    if fourcc == b"VP8L":
        if data[20] != 0x2F:
            raise ImageError("WebP lossless stream has a bad signature")
        bits = struct.unpack_from("<I", data, 21)[0]
        return _size_ok("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if fourcc == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return _size_ok("WebP", w, h)
    raise ImageError(f"WebP starts with an unknown chunk {fourcc!r}")


def check(
    data: bytes, content_type: str, width: int, height: int, sha256: str, max_bytes: int
) -> ImageInfo:
    """Sniff the bytes and compare them with the declared fields (empty or 0:
    not declared). Raises ImageError, or LimitError when over max_bytes."""
    if len(data) > max_bytes:
        raise LimitError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    found = sniff(data)
    declared = normalize_content_type(content_type)
    if declared and declared != found.content_type:
        raise ImageError(
            f"content type says {declared[:70]!r} but the bytes are {found.content_type}"
        )
    if (width and width != found.width) or (height and height != found.height):
        raise ImageError(
            f"declared size {width}x{height} but the image is {found.width}x{found.height}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and sha256.lower() != digest:
        raise ImageError(f"sha256 {sha256[:70]!r} does not match the bytes (they hash to {digest})")
    return ImageInfo(data, digest, found.content_type, found.width, found.height, len(data))


def validate_images(chunk: Chunk, outcome: Outcome, max_bytes: int) -> None:
    """Check every alive image of the chunk; reject the bad ones one by one.

    The payload (the request's repeated Image field, read one image at a
    time) becomes ImageInfo (None for rejected points), so the proto
    messages, and the request they share memory with, can be released; the
    texts become the hashes, the points' values for the step rules."""
    items: Any = chunk.payload if chunk.payload is not None else []
    infos: list[ImageInfo | None] = [None] * len(chunk)
    alive = chunk.alive
    for i, image in enumerate(items):
        if i >= len(infos):
            break
        if not alive[i]:
            continue
        try:
            infos[i] = check(
                image.data, image.content_type, image.width, image.height, image.sha256, max_bytes
            )
        except (ImageError, LimitError) as exc:
            reason = LIMIT_EXCEEDED if isinstance(exc, LimitError) else INVALID_IMAGE
            outcome.reject_one(chunk, i, reason, str(exc))
    chunk.payload = infos
    chunk.texts = [info.sha256 if info is not None else "" for info in infos]
