"""Small valid images of each supported format, written by Pillow, for the
image tests. Random pixels from a seed: the same arguments give the same
bytes (the tests compare what they read back with a fresh copy)."""

from __future__ import annotations

import io
import random
from typing import Any

from PIL import Image


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels of `mode` (L, RGB, RGBA, or P: a random L image quantised)."""
    rng = random.Random(seed)
    base = "L" if mode == "P" else mode
    bands = len(Image.new(base, (1, 1)).getbands())
    image = Image.frombytes(base, (width, height), rng.randbytes(width * height * bands))
    return image.convert("P") if mode == "P" else image


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png(width: int = 4, height: int = 3, seed: int = 0, level: int = 1) -> bytes:
    """An RGB PNG of random pixels: they do not compress, so a 148x148 image
    is about 64 KiB."""
    return encode(picture(width, height, seed), "PNG", compress_level=level)


def png_of_size(nbytes: int, seed: int = 0) -> bytes:
    """A PNG of about nbytes (random pixels, a square)."""
    side = max(1, int((nbytes / 3) ** 0.5))
    return png(side, side, seed)


def jpeg(width: int = 5, height: int = 7, seed: int = 0) -> bytes:
    return encode(picture(width, height, seed), "JPEG", quality=90)


def gif(width: int = 6, height: int = 2, seed: int = 0) -> bytes:
    return encode(picture(width, height, seed, "P"), "GIF")


def webp(width: int = 9, height: int = 3, seed: int = 0, lossless: bool = True) -> bytes:
    return encode(picture(width, height, seed), "WEBP", lossless=lossless)


def animated(fmt: str, width: int = 8, height: int = 6, frames: int = 3) -> bytes:
    """An animation of `frames` random frames (GIF, PNG as APNG, or WEBP)."""
    pictures = [
        picture(width, height, seed, "P" if fmt == "GIF" else "RGB") for seed in range(frames)
    ]
    return encode(pictures[0], fmt, save_all=True, append_images=pictures[1:], duration=100)
