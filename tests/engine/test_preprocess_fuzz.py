"""Fuzz tests of the image decoder (xaiserve.engine.preprocess) on arbitrary bytes.

Random bytes, bytes behind a real file's magic number, and real PNG, JPEG and WebP files
with bytes flipped, inserted, deleted or cut off, for a one- and a three-channel model:
``decode_image`` returns a 1 x C x H x W tensor in [0, 1] at the model's size or raises a
domain error; ``tensor_from_raw`` the same on arbitrary shapes and data. Deterministic:
derandomized, bounded example counts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from support.fuzz import fuzz_settings, image_bytes, tensors
from support.tiny_models import model_config
from xaiserve.api.errors import InvalidArgument, ResourceExhausted
from xaiserve.api.types import EncodedImage, RawTensor
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.preprocess import decode_image, tensor_from_raw

FUZZ = fuzz_settings(max_examples=300)
# A pixel limit well above the seed files (12 x 10) and well below what a corrupted header
# may claim, so both sides of the check are reached without decoding huge images.
LIMITS = EngineLimits(max_image_bytes=1 << 20, max_image_pixels=256 * 256)


CONFIGS = {c: model_config((c, 8, 6), 0.5, 0.25, name="fuzz") for c in (1, 3)}
DOMAIN_ERRORS = (InvalidArgument, ResourceExhausted)


def _check_pixels(x: torch.Tensor, channels: int) -> None:
    assert x.shape == (1, channels, 8, 6) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("channels", [1, 3])
@FUZZ
@given(data=image_bytes())
def test_decoder_returns_pixels_or_a_domain_error(channels: int, data: bytes) -> None:
    try:
        x = decode_image(EncodedImage(data), CONFIGS[channels], LIMITS)
    except DOMAIN_ERRORS as error:
        assert error.field == "image.encoded", error.field
        return
    _check_pixels(x, channels)


@pytest.mark.parametrize("channels", [1, 3])
@FUZZ
@given(tensor=tensors(max_values=200))
def test_raw_tensor_returns_pixels_or_a_domain_error(channels: int, tensor: pb.Tensor) -> None:
    raw = RawTensor(shape=tuple(tensor.shape), data=tensor.data)
    try:
        x = tensor_from_raw(raw, CONFIGS[channels], LIMITS)
    except DOMAIN_ERRORS as error:
        assert error.field.startswith("image.tensor."), error.field
        return
    _check_pixels(x, channels)
