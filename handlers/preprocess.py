"""Decoding and preprocessing: encoded bytes or raw tensors to a pixel-space batch.

Output of both paths: a float32 tensor 1 x C x H x W in [0, 1] at the model's input size.
Limits are checked before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidArgument, ResourceExhausted
from .limits import EngineLimits
from .model import ModelConfig
from .types import EncodedImage, RawTensor

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(image: EncodedImage, cfg: ModelConfig, limits: EngineLimits) -> torch.Tensor:
    """Decodes PNG/JPEG/WebP bytes into 1 x C x H x W in [0, 1] at the model's size.

    RGBA and palette images with transparency are composited on white; grayscale is
    repeated to three channels for RGB models and RGB is converted to luminance for
    one-channel models.
    """
    field = "image.encoded"
    if len(cfg.input_shape) != 3:
        raise InvalidArgument(field, "this model takes volumetric input: send image.tensor")
    data = image.data
    if not data:
        raise InvalidArgument(field, "empty image bytes")
    if len(data) > limits.max_image_bytes:
        raise ResourceExhausted(
            field, f"{len(data)} bytes exceed the limit of {limits.max_image_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ResourceExhausted(field, f"image too large: {err}") from err
    except Exception as err:
        raise InvalidArgument(field, "cannot decode image (not a PNG, JPEG or WebP file)") from err
    if img.format not in ALLOWED_FORMATS:
        raise InvalidArgument(
            field, f"unsupported format {img.format}; use one of {', '.join(ALLOWED_FORMATS)}"
        )
    width, height = img.size
    if width * height > limits.max_image_pixels:
        raise ResourceExhausted(
            field,
            f"{width}x{height} = {width * height} pixels exceed the limit of "
            f"{limits.max_image_pixels}",
        )
    try:
        img.load()
    except Exception as err:
        raise InvalidArgument(field, f"truncated or corrupt {img.format} data") from err
    img = _to_model_mode(img, cfg.channels)
    c, h, w = cfg.input_shape
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).unsqueeze(0)


def _to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    raise InvalidArgument("image.encoded", f"a {channels}-channel model needs image.tensor")


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
