"""Image points: what the bytes are, checked against what the client said. Pure.

The service stores an image only when Pillow decodes it completely as a PNG,
JPEG, GIF or WebP (no other Pillow plugin ever sees the bytes). In order,
cheapest first:

1. the header (Image.open reads no pixels): the format, the width and height,
   the mode, and that the decoded pixels fit MAX_DECODED_BYTES, so a small
   file that expands to gigabytes (a decompression bomb) is refused before
   anything is decoded;
2. whatever the client declared (content type, width, height) must agree
   with the header: a viewer trusts these fields, so a mismatch is an error,
   not something to fix up silently;
3. the structure: Pillow's verify() (PNG: every chunk's CRC, up to IEND),
   and a GIF must end with its trailer (a GIF cut between two frames decodes
   as a shorter animation);
4. a full decode of every frame (Image.load): truncated or corrupt data
   fails here. JPEG has no checksum, so a flipped bit in its entropy-coded
   data decodes to other pixels, as any viewer would show them.

Decoding is CPU work in proportion to the pixels (a few KB of lossless
WebP can legitimately decode to the 128 MiB bound): the ingest servicer runs
decode_batch, and so this, in its thread pool for any request that carries
images. Two more bounds keep a request of many small files that decode to
much from costing without limit:

- per request, a DecodeBudget (STEPLOG_MAX_IMAGE_DECODE_BYTES): the pixel
  bytes of the request's images, all together, in request order; an image
  whose header would take the sum past it is rejected LIMIT_EXCEEDED
  before it is decoded (resending the same request cannot succeed; the
  other points of the request are kept, as for every per-point problem);
- in memory, the servicer charges the largest image the request will decode
  (`peak_decoded_bytes`, headers only) to the service's in-flight bytes
  while the request decodes, so decoding waits for room like any request
  (RESOURCE_EXHAUSTED with RetryInfo when the bound stays full).

The SHA-256 is the image's blob address, and also its value for the step
rules: logging the same image at the same step again is a duplicate, another
image at that step a conflict, exactly as for a text metric.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ingest.core.batch import INVALID_IMAGE, LIMIT_EXCEEDED, Chunk, Outcome

PNG = "image/png"
JPEG = "image/jpeg"
GIF = "image/gif"
WEBP = "image/webp"
# Names clients send for the same formats.
_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG, "image/x-png": PNG}
# Pillow's format names, the only plugins Image.open may use.
_FORMATS = {"PNG": PNG, "JPEG": JPEG, "GIF": GIF, "WEBP": WEBP}
_NAMES = {PNG: "PNG", JPEG: "JPEG", GIF: "GIF", WEBP: "WebP"}
# Signatures, only to tell "not an image we take" from "a broken one" in messages.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", PNG), (b"\xff\xd8", JPEG), (b"GIF87a", GIF), (b"GIF89a", GIF))
# The most a decoded image may hold, all frames together: 128 MiB, e.g. 5792x5792
# RGBA, or 32 frames of 1024x1024. Pillow keeps a pixel in 4 bytes (1 for
# modes L, P, 1), so this also bounds the memory one decode takes.
MAX_DECODED_BYTES = 128 << 20
# Pillow warns about (and from twice as many refuses) images over 89M pixels:
# the bound above is lower, and our own refusal says what happened.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_OBJECT_REPR = re.compile(r" ?<[^>]* at 0x[0-9a-f]+>")


class ImageError(ValueError):
    """Bytes that are not a complete image of a supported format."""


class LimitError(ValueError):
    """An image over the configured size limit, or one that decodes to too much."""


class DecodeBudget:
    """The pixel bytes one request's images may still decode to."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, found: Sniffed) -> None:
        """Count one image about to be decoded; LimitError past the limit."""
        n = found.decoded_bytes
        if self.used + n > self.limit:
            raise LimitError(
                f"image decodes to {n} bytes, and this request's earlier images to {self.used}:"
                f" more than the {self.limit} bytes the images of one request may decode to"
                " (STEPLOG_MAX_IMAGE_DECODE_BYTES); send it in another request"
            )
        self.used += n


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the header says (nothing decoded yet)."""

    content_type: str
    width: int
    height: int
    mode: str
    frames: int

    @property
    def decoded_bytes(self) -> int:
        """What decoding every frame costs in memory (Pillow's pixel sizes)."""
        per_pixel = 1 if self.mode in ("1", "L", "P") else 4
        return self.width * self.height * per_pixel * self.frames


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


def _guess(data: bytes) -> str:
    """The format the first bytes claim ('' for none we take)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), "")


def _reason(exc: BaseException) -> str:
    """Pillow's message without object reprs (a memory address says nothing)."""
    text = _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__
    return text[:200]


def _open(data: bytes) -> Image.Image:
    """Image.open restricted to our four formats; ImageError when none reads it."""
    try:
        return Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except Image.DecompressionBombError as exc:
        raise LimitError(f"image is too large to decode: {_reason(exc)}") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        if not data:
            raise ImageError("the image is empty") from exc
        kind = _guess(data)
        if not kind:
            raise ImageError(
                f"unknown image format (starts with {data[:8].hex()}); use PNG, JPEG, GIF or WebP"
            ) from exc
        raise ImageError(f"{_NAMES[kind]} is truncated or corrupt ({_reason(exc)})") from exc


def _header(im: Image.Image) -> Sniffed:
    width, height = im.size
    content_type = _FORMATS[str(im.format)]
    if width <= 0 or height <= 0:
        raise ImageError(f"{_NAMES[content_type]} header gives an impossible size {width}x{height}")
    return Sniffed(content_type, width, height, im.mode, int(getattr(im, "n_frames", 1)))


def sniff(data: bytes) -> Sniffed:
    """The format, pixel size, mode and frame count from the header alone;
    ImageError says what is wrong. Decodes no pixels."""
    with _open(data) as im:
        try:
            return _header(im)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise LimitError(f"image is too large to decode: {_reason(exc)}") from exc
        except Exception as exc:  # counting the frames walks them (GIF): a broken one fails
            name = _NAMES[_FORMATS[str(im.format)]]
            raise ImageError(f"{name} is truncated or corrupt ({_reason(exc)})") from exc


def _bounded(found: Sniffed) -> None:
    if found.decoded_bytes > MAX_DECODED_BYTES:
        frames = f", {found.frames} frames" if found.frames > 1 else ""
        raise LimitError(
            f"image decodes to {found.decoded_bytes} bytes ({found.width}x{found.height} "
            f"{found.mode}{frames}); the limit is {MAX_DECODED_BYTES}"
        )


def decode(data: bytes, found: Sniffed) -> None:
    """Verify the structure and decode every frame; ImageError if any of it fails.

    `found` (from sniff) must already be within MAX_DECODED_BYTES."""
    name = _NAMES[found.content_type]
    if found.content_type == GIF and not data.rstrip(b"\x00").endswith(b"\x3b"):
        raise ImageError("GIF is truncated (no trailer)")
    try:
        if found.content_type == PNG:
            with _open(data) as im:
                im.verify()  # every chunk's CRC, up to IEND; the image is unusable after
        with _open(data) as im:
            for frame in range(found.frames):
                im.seek(frame)
                im.load()
    except (ImageError, LimitError):
        raise
    except Image.DecompressionBombError as exc:  # a later frame larger than the canvas
        raise LimitError(f"image is too large to decode: {_reason(exc)}") from exc
    except Exception as exc:  # OSError ("image file is truncated"), SyntaxError, EOFError...
        raise ImageError(f"{name} is truncated or corrupt ({_reason(exc)})") from exc


def check(
    data: bytes,
    content_type: str,
    width: int,
    height: int,
    sha256: str,
    max_bytes: int,
    budget: DecodeBudget | None = None,
) -> ImageInfo:
    """Read the header, compare it with the declared fields (empty or 0: not
    declared), then decode. Raises ImageError, or LimitError when over
    max_bytes, MAX_DECODED_BYTES or what is left of the request's budget."""
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
    _bounded(found)
    if budget is not None:
        budget.take(found)
    decode(data, found)
    return ImageInfo(data, digest, found.content_type, found.width, found.height, len(data))


def peak_decoded_bytes(batch: Any, max_bytes: int) -> int:
    """The most pixel memory decoding this batch (an ingest Batch message)
    takes at once: the largest image it may decode, from the headers alone.
    Images are decoded one at a time and freed; one the header already
    refuses is not decoded. An upper bound: validation may refuse more."""
    peak = 0
    for rs in batch.series:
        series = rs.series
        if series.WhichOneof("points") != "images":
            continue
        for image in series.images.images:
            if len(image.data) > max_bytes:
                continue
            try:
                n = sniff(image.data).decoded_bytes
            except (ImageError, LimitError):
                continue
            if n <= MAX_DECODED_BYTES:
                peak = max(peak, n)
    return peak


def validate_images(
    chunk: Chunk, outcome: Outcome, max_bytes: int, budget: DecodeBudget | None = None
) -> None:
    """Check every alive image of the chunk; reject the bad ones one by one.
    `budget`: the request's, shared by its image series (None: unbounded).

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
                image.data,
                image.content_type,
                image.width,
                image.height,
                image.sha256,
                max_bytes,
                budget,
            )
        except (ImageError, LimitError) as exc:
            reason = LIMIT_EXCEEDED if isinstance(exc, LimitError) else INVALID_IMAGE
            outcome.reject_one(chunk, i, reason, str(exc))
    chunk.payload = infos
    chunk.texts = [info.sha256 if info is not None else "" for info in infos]
