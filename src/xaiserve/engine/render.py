"""PNG heat-map overlays of attribution maps (numpy + Pillow, no plotting library)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered dark-to-bright map (black, purple, red, yellow).
_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)


def colorize(values: np.ndarray) -> np.ndarray:
    """values H x W in [0, 1] -> H x W x 3 uint8 colours."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - low)[..., None]
    rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
    return rgb.astype(np.uint8)


def overlay_png(attr_map: np.ndarray, image: np.ndarray, alpha: float = 0.6) -> bytes:
    """A PNG of ``attr_map`` blended over ``image``.

    attr_map: C' x H x W (any stage; its magnitude, summed over channels and scaled to
    [0, 1], is shown); image: C x H x W in [0, 1] (1 or 3 channels). 2-D maps only.
    """
    heat = np.abs(attr_map).sum(axis=0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    base = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    base = (np.clip(base.transpose(1, 2, 0), 0, 1) * 255.0).astype(np.float32)
    blended = (1 - alpha) * base + alpha * colorize(heat).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
