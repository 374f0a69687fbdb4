"""Encoding, decoding and resizing images, and stable item ids — shared by every stage.

Decoding is where untrusted bytes meet the process (downloads, user datasets), so it enforces a
pixel cap before the full decode (decompression bombs) and verifies the data. Every PIL mode
becomes 8-bit RGB by :func:`to_rgb`: high-bit-depth and float images are scaled (not clipped),
transparent pixels are laid on white.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000
# Modes with an alpha band; P, L and RGB images may instead carry ``info["transparency"]``.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image. ``reason`` is a short tag for failure statistics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, refusing empty, truncated, non-image and over-sized data.

    Args:
        data: encoded bytes.
        max_pixels: refuse images with more pixels than this (checked before decoding).
        min_side: when set, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
            both sides >= ``min_side``: several times faster for callers that only want a small
            image (perceptual hashes, thumbnails). Other formats decode at full size.

    Raises:
        ImageDecodeError: with ``reason`` in {"empty", "not_an_image", "too_many_pixels",
            "corrupt"}.
    """
    if not data:
        raise ImageDecodeError("empty")
    try:
        probe = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own cap (2 x Image.MAX_IMAGE_PIXELS) came first
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    except Exception as exc:  # PIL raises several types for junk
        raise ImageDecodeError("not_an_image", type(exc).__name__) from None
    w, h = probe.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{w}x{h} = {w * h} pixels > {max_pixels}")
    try:
        probe.verify()  # catches truncation and checksum errors without a full decode
        img = Image.open(io.BytesIO(data))
        if min_side:
            img.draft(img.mode, (min_side, min_side))
        img.load()
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB that keeps what the image shows.

    ``I;16*`` (16-bit PNG/TIFF) is scaled by 255/65535. ``I`` and ``F`` have no fixed range: values
    already in 0..255 are kept, 0..65535 is taken as 16-bit, 0..1 (``F`` only) as unit floats,
    any other range is stretched from its minimum to its maximum. Transparent pixels (an alpha
    band or palette/colour-key transparency) are composited onto white. Other modes (1, L, P,
    CMYK, YCbCr, LAB ...) use PIL's conversions.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image -> mode L, scaled into 0..255."""
    a = np.asarray(img, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        a = a * (255 / 65535)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255 / (hi - lo))
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")


def resize_max_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale so the longer side is at most ``max_side`` (never upscale)."""
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def encode_image(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """PIL image -> encoded bytes."""
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt.upper(), **({"quality": quality} if fmt.upper() == "WEBP" else {}))
    return buf.getvalue()


def stable_id(*parts: object, length: int = 16) -> str:
    """A short id that depends only on ``parts`` (class, method, index, seed; or a URL)."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def item_id(prefix: str, *parts: object) -> str:
    """A readable stable id: ``prefix`` + hash, e.g. ``gen-simple-3fa2...``."""
    return f"{prefix}-{stable_id(*parts)}"


def sizes(images: Iterable[Image.Image]) -> tuple[list[int], list[int]]:
    """Widths and heights of ``images``."""
    ws, hs = [], []
    for im in images:
        ws.append(im.width)
        hs.append(im.height)
    return ws, hs
