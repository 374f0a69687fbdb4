"""Decoding untrusted bytes: every PIL mode to a faithful RGB image, and the pixel cap's reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from raugment.core.imageio import ImageDecodeError, decode_image

W, H = 64, 8
RAMP = np.tile(np.linspace(0.0, 1.0, W), (H, 1))  # dark on the left, bright on the right


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def _rgb() -> Image.Image:
    return Image.fromarray(np.stack([_u8(RAMP)] * 3, axis=-1))


def _with_alpha(mode: str, base: Image.Image) -> Image.Image:
    """``base`` (L or RGB) plus an opaque alpha band."""
    return Image.merge(mode, [*base.split(), Image.new("L", base.size, 255)])


# (name, a maker of the image in that mode, the formats that store the mode)
MODES = [
    ("1", lambda: Image.fromarray(RAMP > 0.5).convert("1"), ["PNG", "TIFF", "BMP"]),
    ("L", lambda: Image.fromarray(_u8(RAMP)), ["PNG", "TIFF", "JPEG", "BMP"]),
    ("P", lambda: _rgb().convert("P", palette=Image.Palette.ADAPTIVE), ["PNG", "TIFF", "GIF", "BMP"]),
    ("LA", lambda: _with_alpha("LA", Image.fromarray(_u8(RAMP))), ["PNG", "TIFF"]),
    ("PA", lambda: _with_alpha("PA", _rgb().convert("P", palette=Image.Palette.ADAPTIVE)), ["TIFF"]),
    ("RGB", _rgb, ["PNG", "TIFF", "JPEG", "WEBP"]),
    ("RGBA", lambda: _with_alpha("RGBA", _rgb()), ["PNG", "TIFF", "WEBP"]),
    ("CMYK", lambda: _rgb().convert("CMYK"), ["JPEG", "TIFF"]),
    ("YCbCr", lambda: _rgb().convert("YCbCr"), ["TIFF"]),
    ("LAB", lambda: _rgb().convert("LAB"), ["TIFF"]),
    ("I;16", lambda: Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)), ["PNG", "TIFF"]),
    ("I;16B", lambda: Image.frombytes("I;16B", (W, H), np.round(RAMP * 65535).astype(">u2").tobytes()), ["TIFF"]),
    ("I 16-bit values", lambda: Image.fromarray(np.round(RAMP * 65535).astype(np.int32)), ["TIFF"]),
    ("I 8-bit values", lambda: Image.fromarray(_u8(RAMP).astype(np.int32)), ["TIFF"]),
    ("I any range", lambda: Image.fromarray(np.round(RAMP * 2e6 - 1e6).astype(np.int32)), ["TIFF"]),
    ("F 0..1", lambda: Image.fromarray(RAMP.astype(np.float32)), ["TIFF"]),
    ("F 0..255", lambda: Image.fromarray((RAMP * 255).astype(np.float32)), ["TIFF"]),
    ("F any range", lambda: Image.fromarray((RAMP * 8 - 3).astype(np.float32)), ["TIFF"]),
]
CASES = [pytest.param(make, fmt, id=f"{name}-{fmt}") for name, make, fmts in MODES for fmt in fmts]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _profile(img: Image.Image) -> np.ndarray:
    """Mean brightness of each column of an RGB image (0..255)."""
    assert img.mode == "RGB" and img.size == (W, H)
    return np.asarray(img, dtype=float).mean(axis=(0, 2))


@pytest.mark.parametrize("make, fmt", CASES)
def test_every_mode_decodes_to_rgb_that_keeps_the_ramp(make, fmt):
    img = make()
    data = _encode(img, fmt)
    profile = _profile(decode_image(data))
    assert profile[0] <= 8 and profile[-1] >= 247, f"{img.mode} -> {profile[[0, W // 2, -1]]}"  # full range
    assert np.all(np.diff(profile) >= -3), "the ramp's order is lost"
    if img.mode != "1":  # not two levels only: the steps in between survive (16-bit -> 8-bit is a scale, not a clip)
        assert len(np.unique(np.round(profile))) >= W // 2


@pytest.mark.parametrize("make, fmt", [c for c in CASES if c.id.split("-")[0] in ("I;16", "F 0..1", "LA", "CMYK")])
def test_the_training_loader_reads_stored_bytes_as_decode_image_does(make, fmt):
    # stages keep the original bytes when they need no resize; the loader must read them alike
    from raugment.lib.loader import decode_rgb

    data = _encode(make(), fmt)
    assert np.array_equal(np.asarray(decode_rgb(data)), np.asarray(decode_image(data)))


def test_rgb_bytes_decode_unchanged():
    img = _rgb()
    assert np.array_equal(np.asarray(decode_image(_encode(img, "PNG"))), np.asarray(img))


@pytest.mark.parametrize("make, fmt", [
    pytest.param(lambda: Image.merge("LA", [Image.new("L", (W, H), 0), Image.fromarray(_u8(RAMP))]), "PNG", id="LA"),
    pytest.param(lambda: Image.merge("RGBA", [*Image.new("RGB", (W, H), 0).split(), Image.fromarray(_u8(RAMP))]),
                 "PNG", id="RGBA"),
])
def test_transparent_pixels_become_white_not_the_colour_under_them(make, fmt):
    # black everywhere, transparent on the left and opaque on the right: white fading to black
    profile = _profile(decode_image(_encode(make(), fmt)))
    assert profile[0] >= 250 and profile[-1] <= 5 and np.all(np.diff(profile) <= 3)


def test_palette_transparency_becomes_white():
    pal = Image.fromarray(np.where(RAMP < 0.5, 0, 1).astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 - 2) * 3)   # index 0 black, 1 red
    pal.info["transparency"] = 0                                   # black is transparent
    rgb = np.asarray(decode_image(_encode(pal, "PNG")))
    assert (rgb[:, 0] == 255).all() and (rgb[:, -1] == (200, 0, 0)).all()


def png_header(width: int, height: int) -> bytes:
    """A small PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")   # PIL's note at 89-179 Mpx
@pytest.mark.parametrize("width, height", [(8000, 6000), (12000, 9000), (20000, 10000), (60000, 60000)])
def test_over_the_cap_is_too_many_pixels_whoever_notices(width, height):
    # 48 Mpx and 108 Mpx are refused by our cap; 200 Mpx and 3.6 Gpx by PIL's own bomb check first
    with pytest.raises(ImageDecodeError) as err:
        decode_image(png_header(width, height), max_pixels=40_000_000)
    assert err.value.reason == "too_many_pixels" and f"{width * height} pixels" in str(err.value)
