"""Decoding and preprocessing: encoded bytes or raw tensors to a pixel-space batch.

Output of both paths: a float32 tensor 1 x C x H x W in [0, 1] at the model's input size.
Limits are checked before any pixel is decoded (decompression bombs).

How each Pillow image mode maps to [0, 1] (one-channel models get the luminance
L = 0.299 R + 0.587 G + 0.114 B, three-channel models get gray repeated three times):

- ``1``: black 0, white 1. ``L``: value / 255.
- ``RGB``, ``RGBX``, ``P``: value / 255 per channel (``P`` through its palette).
- ``RGBA``, ``RGBa``, ``LA``, ``PA``, and ``1``/``L``/``RGB``/``P`` with a transparent
  colour (PNG ``tRNS``): composited on white, then as above.
- ``CMYK``, ``YCbCr``, ``HSV``: converted to RGB by Pillow (CMYK: R = (255 - C)(255 - K) /
  255, no ICC colour management; YCbCr: full-range BT.601 as in JPEG), then as RGB.
- ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grayscale PNG): value / 65535; a
  transparent gray value (``tRNS``) becomes white.
- ``I`` (32-bit integers): taken as 16-bit samples, value / 65535; values outside
  0..65535 are refused with INVALID_ARGUMENT.
- ``F`` (32-bit floats): taken as pixel-space values already; values outside [0, 1] or
  not finite are refused with INVALID_ARGUMENT, as for ``image.tensor``.
- Any other mode (``LAB``, ``La``) is refused with INVALID_ARGUMENT.

Animated images (APNG, animated WebP: more than one frame) are refused with
INVALID_ARGUMENT; GIF and every format other than PNG, JPEG and WebP are refused as such.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from xaiserve.api.errors import InvalidArgument, ResourceExhausted
from xaiserve.api.types import EncodedImage, RawTensor
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.model import ModelConfig

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")

#: Modes decoded through 8-bit Pillow conversions.
_EIGHT_BIT_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"}
)
#: One-channel modes with more than 8 bits per sample.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_WIDE_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}
_WHITE_16 = 65535.0


def decode_image(image: EncodedImage, cfg: ModelConfig, limits: EngineLimits) -> torch.Tensor:
    """Decodes PNG/JPEG/WebP bytes into 1 x C x H x W in [0, 1] at the model's size.

    Each mode maps to [0, 1] as the module docstring lists; the image is resized
    (bilinear) to the model's H x W after that mapping.

    Raises:
        InvalidArgument: empty, undecodable, animated or unsupported images, or a
            model that takes neither one nor three channels.
        ResourceExhausted: more bytes than ``limits.max_image_bytes`` or more pixels
            than ``limits.max_image_pixels`` (checked before any pixel is decoded).
    """
    field = "image.encoded"
    if len(cfg.input_shape) != 3:
        raise InvalidArgument(field, "this model takes volumetric input: send image.tensor")
    if cfg.channels not in (1, 3):
        raise InvalidArgument(field, f"a {cfg.channels}-channel model needs image.tensor")
    data = image.data
    if not data:
        raise InvalidArgument(field, "empty image bytes")
    if len(data) > limits.max_image_bytes:
        raise ResourceExhausted(
            field, f"{len(data)} bytes exceed the limit of {limits.max_image_bytes}"
        )
    img = open_image(data, limits)
    try:
        img.load()
    except Exception as err:
        raise InvalidArgument(field, f"truncated or corrupt {img.format} data") from err
    c, h, w = cfg.input_shape
    arr = to_unit_range(img, c, (w, h))
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).unsqueeze(0)


def open_image(data: bytes, limits: EngineLimits) -> ImageFile.ImageFile:
    """Reads the header of PNG, JPEG or WebP bytes and checks it; decodes no pixel.

    The three formats' Pillow classes open the bytes directly instead of ``Image.open``,
    whose check against Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` would refuse
    images that ``limits.max_image_pixels`` allows (and quote Pillow's number). Here the
    configured limit is the only one; no global is changed, so concurrent requests with
    different limits need no lock. A JPEG carrying extra MPF pictures is read as its
    primary picture, the one every JPEG viewer shows.

    Raises:
        InvalidArgument: not PNG, JPEG or WebP; a corrupt header; more than one frame.
        ResourceExhausted: width x height above ``limits.max_image_pixels``.
    """
    field = "image.encoded"
    opener = _opener(data)
    if opener is None:
        raise InvalidArgument(
            field, f"cannot decode image (not a {', '.join(ALLOWED_FORMATS)} file)"
        )
    try:
        img = opener(io.BytesIO(data))
    except Exception as err:
        raise InvalidArgument(field, "cannot decode image (corrupt header)") from err
    width, height = img.size
    if width * height > limits.max_image_pixels:
        raise ResourceExhausted(
            field,
            f"{width}x{height} = {width * height} pixels exceed the limit of "
            f"{limits.max_image_pixels}",
        )
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise InvalidArgument(
            field, f"animated {img.format} image with {frames} frames; send a single frame"
        )
    return img


def _opener(data: bytes) -> type[ImageFile.ImageFile] | None:
    """The Pillow class of the allowed format whose signature starts ``data``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PngImagePlugin.PngImageFile
    if data.startswith(b"\xff\xd8\xff"):
        return JpegImagePlugin.JpegImageFile
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WebPImagePlugin.WebPImageFile
    return None


def to_unit_range(img: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A decoded image as H x W x ``channels`` float32 in [0, 1], resized to ``size``.

    ``size`` is (W, H), Pillow's order; ``channels`` is 1 or 3. The rule of each mode is
    in the module docstring.

    Raises:
        InvalidArgument: a mode without a rule, or ``I``/``F`` values out of range.
    """
    if img.mode in _WIDE_MODES:
        plane = Image.fromarray(_wide_to_unit(img))  # float32: mode F
        if plane.size != size:
            plane = plane.resize(size, Image.Resampling.BILINEAR)
        gray = np.clip(np.asarray(plane, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[:, :, None], channels, axis=2)
    img = _to_model_mode(img, channels)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[:, :, None] if arr.ndim == 2 else arr


def _wide_to_unit(img: Image.Image) -> np.ndarray:
    """A 16-bit, ``I`` or ``F`` image as H x W float32 in [0, 1] (transparent: white)."""
    field = "image.encoded"
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all():
            raise InvalidArgument(field, "a float (mode F) image contains NaN or Inf values")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise InvalidArgument(
                field,
                f"a float (mode F) image must hold values in [0, 1]; got "
                f"[{values.min():.4g}, {values.max():.4g}]",
            )
        unit = values.astype(np.float32)
    else:
        if img.mode == "I" and values.size and (values.min() < 0 or values.max() > _WHITE_16):
            raise InvalidArgument(
                field,
                f"a 32-bit integer (mode I) image is read as 16-bit samples, 0..65535; got "
                f"[{values.min()}, {values.max()}]",
            )
        unit = (values.astype(np.float64) / _WHITE_16).astype(np.float32)
    key = img.info.get("transparency")
    if isinstance(key, (int, float)):
        unit = np.where(values == key, np.float32(1.0), unit)
    return unit


def _to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """An 8-bit-per-sample image as ``L`` (one channel) or ``RGB`` (three channels)."""
    if img.mode not in _EIGHT_BIT_MODES:
        raise InvalidArgument(
            "image.encoded", f"image mode {img.mode} is not supported; send RGB or grayscale"
        )
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode not in ("1", "L", "RGB"):
        img = img.convert("RGB")
    return img.convert("L" if channels == 1 else "RGB")


def tensor_from_raw(raw: RawTensor, cfg: ModelConfig, limits: EngineLimits) -> torch.Tensor:
    """Validates a raw float32 tensor and returns 1 x C x *spatial at the model's size.

    Accepted shapes: C x *spatial, 1 x C x *spatial, or H x W for one-channel 2-D models.
    Values must be finite and within [0, 1] (pixel space).
    """
    field = "image.tensor"
    shape = tuple(int(d) for d in raw.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"dimensions must be positive, got {list(shape)}")
    if len(raw.data) > limits.max_image_bytes:
        raise ResourceExhausted(
            f"{field}.data", f"{len(raw.data)} bytes exceed the limit of {limits.max_image_bytes}"
        )
    count = math.prod(shape)
    if count * 4 != len(raw.data):
        raise InvalidArgument(
            f"{field}.data",
            f"{len(raw.data)} bytes do not match shape {list(shape)} "
            f"({count} float32 values = {count * 4} bytes)",
        )
    nd = len(cfg.input_shape)  # 3 for images, 4 for volumes
    if len(shape) == nd + 1 and shape[0] == 1:
        shape = shape[1:]
    elif len(shape) == nd - 1 and cfg.channels == 1:
        shape = (1, *shape)
    if len(shape) != nd or shape[0] != cfg.channels:
        raise InvalidArgument(
            f"{field}.shape",
            f"expected {cfg.channels} x {' x '.join(['N'] * (nd - 1))} "
            f"(model input {list(cfg.input_shape)}), got {list(raw.shape)}",
        )
    if math.prod(shape[1:]) > limits.max_image_pixels:
        raise ResourceExhausted(f"{field}.shape", "too many pixels for the configured limit")
    arr = np.frombuffer(raw.data, dtype="<f4").reshape(shape)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{field}.data", "contains NaN or Inf values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InvalidArgument(
            f"{field}.data",
            f"values must lie in [0, 1] (pixel space, before normalization); "
            f"got [{arr.min():.4g}, {arr.max():.4g}]",
        )
    x = torch.from_numpy(arr.astype(np.float32)).unsqueeze(0)
    if tuple(x.shape[2:]) != cfg.spatial:
        mode = "bilinear" if nd == 3 else "trilinear"
        x = F.interpolate(x, size=cfg.spatial, mode=mode, align_corners=False, antialias=nd == 3)
        x = x.clamp(0.0, 1.0)
    return x
