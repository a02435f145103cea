"""Limits the engine enforces on every request (configuration, not constants)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    """Per-request limits.

    max_image_bytes: size of the encoded image or raw tensor data.
    max_image_pixels: width x height of the decoded image (decompression bombs are refused
        before their pixels are decoded). The only pixel limit: Pillow's process-wide
        ``Image.MAX_IMAGE_PIXELS`` is not consulted (see ``preprocess.open_image``).
    max_methods: methods in one call.
    max_forward_passes: images the model may evaluate for one call, all methods included.
    max_batch: images per gradient batch inside a method, at most (fewer where the model's
        memory budget allows fewer: ``ModelForwards.gradient_batch``).
    """

    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_methods: int = 16
    max_forward_passes: int = 200_000
    max_batch: int = 64
