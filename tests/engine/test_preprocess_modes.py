"""Every Pillow image mode maps to [0, 1] by its rule, checked pixel by pixel.

Modes PNG can store (1, L, LA, P, RGB, RGBA, I;16, and transparent colours) and CMYK (JPEG)
go through ``decode_image`` from encoded bytes. Modes no allowed format decodes to (PA,
YCbCr, HSV, RGBX, I;16B/L/N, I, F) go through ``to_unit_range``, the conversion
``decode_image`` applies after decoding. Expected arrays are built by hand from the pixel
values; tolerances are one 8-bit step where Pillow rounds to 8 bits (alpha compositing,
colour conversions, luminance), float32 rounding elsewhere.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from support.tiny_models import model_config
from xaiserve.api.errors import InvalidArgument, ResourceExhausted
from xaiserve.api.types import EncodedImage
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.preprocess import decode_image, open_image, to_unit_range
from xaiserve.gateway.settings import parse_settings
from xaiserve.runtime.model import ModelConfig

H, W = 4, 6
STEP = 1.0 / 255  # one 8-bit step
FLOAT = 1e-6
RNG = np.random.default_rng(20)
GRAY = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = np.array([0, 255, 128, 64, 200, 1] * H, np.uint8).reshape(H, W)
WIDE = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
WIDE[0, :3] = (0, 1, 65535)  # the ends of the range and one step above black
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDEX = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def config(channels: int, h: int = H, w: int = W) -> ModelConfig:
    return model_config((channels, h, w))


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


DEFAULT_LIMITS = EngineLimits()


def decode(data: bytes, channels: int, limits: EngineLimits = DEFAULT_LIMITS) -> np.ndarray:
    """``decode_image`` at the image's own size (no resize): H x W x C."""
    x = decode_image(EncodedImage(data), config(channels), limits)
    assert tuple(x.shape) == (1, channels, H, W) and x.dtype == torch.float32
    return x[0].numpy().transpose(1, 2, 0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of H x W x 3 values in [0, 1]: H x W x 1."""
    return (rgb @ np.array([0.299, 0.587, 0.114]))[:, :, None]


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """H x W x C values in [0, 1] composited over white with H x W alpha in 0..255."""
    a = (alpha.astype(np.float64) / 255)[:, :, None]
    return color * a + (1 - a)


def palette_image(mode: str = "P") -> Image.Image:
    if mode == "PA":
        img = Image.frombytes("PA", (W, H), np.dstack([INDEX, ALPHA]).tobytes())
    else:
        img = Image.frombytes("P", (W, H), INDEX.tobytes())
    img.putpalette(PALETTE.tobytes())
    return img


def rgb_from(expected_rgb: np.ndarray, channels: int) -> np.ndarray:
    return expected_rgb if channels == 3 else luminance(expected_rgb)


def gray_to(expected_gray: np.ndarray, channels: int) -> np.ndarray:
    return np.repeat(expected_gray[:, :, None], channels, axis=2)


# ---- modes stored in PNG, decoded from bytes --------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_one_bit_png_is_zero_or_one(channels):
    bits = GRAY > 127
    img = Image.fromarray(bits)
    assert img.mode == "1"
    np.testing.assert_array_equal(decode(encode(img), channels), gray_to(bits * 1.0, channels))


@pytest.mark.parametrize("channels", [1, 3])
def test_gray_png_is_value_over_255(channels):
    got = decode(encode(Image.fromarray(GRAY, mode="L")), channels)
    np.testing.assert_allclose(got, gray_to(GRAY / 255, channels), atol=FLOAT)


@pytest.mark.parametrize("channels", [1, 3])
def test_rgb_png_is_value_over_255_and_luminance_for_one_channel(channels):
    got = decode(encode(Image.fromarray(RGB, mode="RGB")), channels)
    tolerance = FLOAT if channels == 3 else STEP
    np.testing.assert_allclose(got, rgb_from(RGB / 255, channels), atol=tolerance)


@pytest.mark.parametrize("channels", [1, 3])
def test_rgba_png_is_composited_on_white(channels):
    img = Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA")
    expected = on_white(RGB / 255, ALPHA)
    np.testing.assert_allclose(
        decode(encode(img), channels), rgb_from(expected, channels), atol=STEP
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_gray_alpha_png_is_composited_on_white(channels):
    img = Image.fromarray(np.dstack([GRAY, ALPHA]), mode="LA")
    expected = on_white(GRAY[:, :, None] / 255, ALPHA)[:, :, 0]
    np.testing.assert_allclose(
        decode(encode(img), channels), gray_to(expected, channels), atol=STEP
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_palette_png_is_its_palette_colours(channels):
    expected = PALETTE[INDEX] / 255
    got = decode(encode(palette_image()), channels)
    np.testing.assert_allclose(
        got, rgb_from(expected, channels), atol=FLOAT if channels == 3 else STEP
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_palette_png_transparent_index_is_white(channels):
    key = int(INDEX[1, 2])
    data = encode(palette_image(), transparency=key)
    expected = np.where((key == INDEX)[:, :, None], 1.0, PALETTE[INDEX] / 255)
    np.testing.assert_allclose(decode(data, channels), rgb_from(expected, channels), atol=STEP)
    assert (key == INDEX).sum() >= 1


@pytest.mark.parametrize("channels", [1, 3])
def test_rgb_and_gray_png_transparent_colour_is_white(channels):
    key = tuple(int(v) for v in RGB[2, 3])
    expected = np.where((key == RGB).all(-1)[:, :, None], 1.0, RGB / 255)
    got = decode(encode(Image.fromarray(RGB, mode="RGB"), transparency=key), channels)
    np.testing.assert_allclose(got, rgb_from(expected, channels), atol=STEP)
    assert got[2, 3].min() == pytest.approx(1.0) and expected[2, 3].min() == 1.0

    gray_key = int(GRAY[0, 0])
    expected_gray = np.where(gray_key == GRAY, 1.0, GRAY / 255)
    got = decode(encode(Image.fromarray(GRAY, mode="L"), transparency=gray_key), channels)
    np.testing.assert_allclose(got, gray_to(expected_gray, channels), atol=STEP)


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_gray_png_is_value_over_65535(channels):
    img = Image.fromarray(WIDE)
    data = encode(img)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = decode(data, channels)
    np.testing.assert_allclose(got, gray_to(WIDE / 65535, channels), rtol=FLOAT, atol=1e-9)
    assert got[0, 0, 0] == 0.0 and got[0, 2, 0] == 1.0 and 0 < got[0, 1, 0] < 1e-4
    assert len(np.unique(got)) > H * W // 2  # not all white, as 16-bit PNGs were once read


def test_sixteen_bit_gray_png_transparent_value_is_white():
    key = int(WIDE[1, 1])
    got = decode(encode(Image.fromarray(WIDE), transparency=key), 1)
    np.testing.assert_allclose(
        got[:, :, 0], np.where(key == WIDE, 1.0, WIDE / 65535), rtol=FLOAT, atol=1e-9
    )


def test_sixteen_bit_gray_png_is_resized_without_losing_depth():
    ramp = np.tile(np.arange(8, dtype=np.uint16) * 3, (8, 1))  # 0..21 of 65535: one 8-bit step
    x = decode_image(EncodedImage(encode(Image.fromarray(ramp))), config(1, 4, 4), EngineLimits())
    values = x[0, 0].numpy()
    assert values.shape == (4, 4)
    assert np.all(np.diff(values, axis=1) > 0)  # 8-bit rounding would make the row flat
    assert values.max() < 22 / 65535


@pytest.mark.parametrize("channels", [1, 3])
def test_cmyk_jpeg_converts_to_rgb(channels):
    """JPEG is lossy: flat 8 x 8 blocks at quality 100, compared within 3 steps."""
    cmyk = np.array([[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 0, 64], [30, 60, 90, 120]], np.uint8)
    blocks = np.kron(cmyk.reshape(2, 2, 4), np.ones((8, 8, 1), np.uint8))
    data = encode(Image.fromarray(blocks, mode="CMYK"), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    x = decode_image(EncodedImage(data), config(channels, 16, 16), EngineLimits())
    got = x[0].numpy().transpose(1, 2, 0)
    c, k = blocks[..., :3] / 255, blocks[..., 3:] / 255
    expected = (1 - c) * (1 - k)
    np.testing.assert_allclose(got, rgb_from(expected, channels), atol=3 * STEP)


# ---- modes no allowed format decodes to: the conversion after decoding ------------------


def convert(img: Image.Image, channels: int) -> np.ndarray:
    return to_unit_range(img, channels, img.size)


@pytest.mark.parametrize("channels", [1, 3])
def test_cmyk_image_converts_to_rgb(channels):
    cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    c, k = cmyk[..., :3] / 255, cmyk[..., 3:] / 255
    got = convert(Image.fromarray(cmyk, mode="CMYK"), channels)
    np.testing.assert_allclose(got, rgb_from((1 - c) * (1 - k), channels), atol=STEP)


@pytest.mark.parametrize("channels", [1, 3])
def test_ycbcr_image_converts_to_rgb_full_range_bt601(channels):
    ycc = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    expected = np.clip(rgb, 0, 255) / 255
    got = convert(Image.fromarray(ycc.astype(np.uint8), mode="YCbCr"), channels)
    np.testing.assert_allclose(got, rgb_from(expected, channels), atol=2 * STEP)


@pytest.mark.parametrize("channels", [1, 3])
def test_palette_alpha_image_is_composited_on_white(channels):
    expected = on_white(PALETTE[INDEX] / 255, ALPHA)
    got = convert(palette_image("PA"), channels)
    np.testing.assert_allclose(got, rgb_from(expected, channels), atol=STEP)


def test_rgbx_and_hsv_images_convert_to_rgb():
    rgbx = Image.fromarray(np.dstack([RGB, GRAY]), mode="RGBA").convert("RGBX")
    np.testing.assert_allclose(convert(rgbx, 3), RGB / 255, atol=FLOAT)
    hsv = Image.fromarray(
        np.array([[[0, 255, 255], [85, 255, 255], [0, 0, 128]]], np.uint8), mode="HSV"
    )
    expected = np.array([[[1, 0, 0], [0, 1, 0], [128 / 255] * 3]])
    np.testing.assert_allclose(convert(hsv, 3), expected, atol=STEP)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_modes_are_value_over_65535(mode, channels):
    dtype = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
    img = Image.frombytes(mode, (W, H), WIDE.astype(dtype).tobytes())
    assert img.mode == mode
    np.testing.assert_allclose(
        convert(img, channels), gray_to(WIDE / 65535, channels), rtol=FLOAT, atol=1e-9
    )


def test_int32_image_is_read_as_sixteen_bit_samples():
    img = Image.fromarray(WIDE.astype(np.int32))
    assert img.mode == "I"
    np.testing.assert_allclose(convert(img, 1)[:, :, 0], WIDE / 65535, rtol=FLOAT, atol=1e-9)


@pytest.mark.parametrize("value", [-1, 65536])
def test_int32_image_out_of_sixteen_bits_is_refused(value):
    values = WIDE.astype(np.int32)
    values[3, 5] = value
    with pytest.raises(InvalidArgument, match=f"0..65535; got .*{value}") as info:
        convert(Image.fromarray(values), 1)
    assert info.value.field == "image.encoded"


def test_float_image_in_unit_range_is_taken_as_is():
    values = RNG.random((H, W), dtype=np.float32)
    values[0, 0], values[0, 1] = 0.0, 1.0
    np.testing.assert_array_equal(convert(Image.fromarray(values), 3), gray_to(values, 3))


@pytest.mark.parametrize(
    "bad,message",
    [
        (1.5, r"\[0, 1\]; got"),
        (-0.1, r"\[0, 1\]; got"),
        (np.nan, "NaN or Inf"),
        (np.inf, "NaN or Inf"),
    ],
)
def test_float_image_out_of_unit_range_is_refused(bad, message):
    values = np.full((H, W), 0.5, np.float32)
    values[1, 1] = bad
    with pytest.raises(InvalidArgument, match=message) as info:
        convert(Image.fromarray(values), 1)
    assert info.value.field == "image.encoded"


def test_mode_without_a_rule_is_refused():
    with pytest.raises(InvalidArgument, match="mode LAB is not supported") as info:
        convert(Image.new("LAB", (W, H)), 3)
    assert info.value.field == "image.encoded"


# ---- animated images ---------------------------------------------------------------------


def animation(fmt: str, frames: int) -> bytes:
    images = [Image.new("RGB", (W, H), (60 * i, 0, 0)) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:])


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_are_refused(fmt):
    data = animation(fmt, 3)
    assert Image.open(io.BytesIO(data)).n_frames == 3  # really animated
    with pytest.raises(
        InvalidArgument, match=f"animated {fmt} image with 3 frames; send a single frame"
    ) as info:
        decode(data, 3)
    assert info.value.field == "image.encoded"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_single_frame_saved_as_animation_is_accepted(fmt):
    got = decode(animation(fmt, 1), 3)
    assert got.shape == (H, W, 3) and got.max() < 0.05  # the one frame is black


def test_gif_is_refused_as_a_format():
    with pytest.raises(InvalidArgument, match="not a PNG, JPEG, WEBP file") as info:
        decode(animation("GIF", 3), 3)
    assert info.value.field == "image.encoded"


# ---- the pixel limit is --max-image-pixels, not Pillow's ----------------------------------


def png(width: int, height: int, rows: bytes) -> bytes:
    """A 1-bit grayscale PNG of ``rows`` (filter byte + packed bits per row), built by hand."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def test_limit_above_pillows_refusal_is_accepted_and_pillow_global_is_untouched():
    pillow = Image.MAX_IMAGE_PIXELS
    assert pillow is not None
    width = 20_000
    height = math.ceil(2 * pillow / width) + 1  # past Pillow's hard refusal, 2 x its limit
    data = png(width, height, b"")  # the header is all that is read
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    img = open_image(data, EngineLimits(max_image_pixels=width * height))
    assert img.size == (width, height)
    assert pillow == Image.MAX_IMAGE_PIXELS


def test_refusal_quotes_the_configured_limit():
    pillow = Image.MAX_IMAGE_PIXELS
    width, height = 20_000, math.ceil(2 * pillow / 20_000) + 1
    limit = width * height - 1
    with pytest.raises(ResourceExhausted) as info:
        decode(png(width, height, b""), 1, EngineLimits(max_image_pixels=limit))
    assert info.value.field == "image.encoded" and info.value.code == "RESOURCE_EXHAUSTED"
    assert f"{width}x{height} = {width * height} pixels exceed the limit of {limit}" in str(
        info.value
    )
    assert str(pillow) not in str(info.value) and str(2 * pillow) not in str(info.value)


def test_image_between_pillows_warning_and_refusal_decodes():
    """Once refused with Pillow's number (its warning was made an error): now decoded when
    ``--max-image-pixels`` allows it."""
    pillow = Image.MAX_IMAGE_PIXELS
    width = 10_000
    height = pillow // width + 8  # just past Pillow's warning threshold
    half = width // 16  # bytes of the left, white half of each row
    row = b"\x00" + b"\xff" * half + b"\x00" * (width // 8 - half)
    data = png(width, height, row * height)
    assert len(data) < 200_000
    limits = parse_settings(["--max-image-pixels", str(width * height)], {}).engine_limits()
    x = decode_image(EncodedImage(data), config(1, 16, 16), limits)
    values = x[0, 0].numpy()
    np.testing.assert_allclose(values[:, :4], 1.0, atol=FLOAT)  # left quarter: white
    np.testing.assert_allclose(values[:, -4:], 0.0, atol=FLOAT)  # right quarter: black
    assert values.mean() == pytest.approx(0.5, abs=0.01)
