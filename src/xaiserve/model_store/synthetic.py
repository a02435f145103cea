"""A synthetic shape data set whose ground truth is known pixel by pixel.

Each image is 3 x H x W float32 in [0, 1]: one flat-coloured shape (circle, square,
triangle or cross) at a random position, scale and rotation, on a textured random
background (a mix of smooth noise, stripes and a linear gradient between two random
colours, plus a little pixel noise). The shape's pixels, and only those, are in the mask,
and every one of them holds exactly the shape's colour.

Image ``i`` of a set with seed ``s`` is drawn from ``numpy.random.default_rng([s, i])``,
so any index can be regenerated on its own. The label of image ``i`` is
``i % len(LABELS)``, which balances the classes.

Splits: the demo model trains on seed ``TRAIN_SEED`` and is evaluated on a held-out set
drawn with seed ``TEST_SEED``.
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

LABELS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 64

TRAIN_SEED = 1
"""Seed of the training split."""
TEST_SEED = 2
"""Seed of the held-out split (a different seed, hence disjoint draws)."""

# Shape half-extent (circumradius) as a fraction of the image size.
_MIN_SCALE = 0.11
_MAX_SCALE = 0.25
# Smallest RGB distance between the shape colour and the background's colour segment.
_MIN_CONTRAST = 0.35
_PIXEL_NOISE = 0.03


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth.

    Attributes:
        image: float32, 3 x H x W, values in [0, 1].
        mask: bool, H x W; True on the shape's pixels.
        label: index into ``LABELS``.
    """

    image: np.ndarray
    mask: np.ndarray
    label: int


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, each H x W float64: (ys, xs)."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


@functools.lru_cache(maxsize=16)
def _upsample_matrix(low: int, size: int) -> np.ndarray:
    """Linear-interpolation matrix, size x low, from ``low`` control points to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) * (low - 1) / size
    left = np.clip(np.floor(pos).astype(int), 0, low - 2)
    frac = pos - left
    matrix = np.zeros((size, low))
    matrix[np.arange(size), left] = 1.0 - frac
    matrix[np.arange(size), left + 1] = frac
    matrix.setflags(write=False)
    return matrix


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bilinearly upsampled random grid, H x W in [0, 1]."""
    low = int(rng.integers(3, 8))
    up = _upsample_matrix(low, size)
    return up @ rng.random((low, low)) @ up.T


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sinusoidal stripes of random orientation, period and phase, H x W in [0, 1]."""
    ys, xs = _grid(size)
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(0.12, 0.5) * size
    phase = rng.uniform(0.0, 2.0 * np.pi)
    proj = xs * np.cos(theta) + ys * np.sin(theta)
    return 0.5 + 0.5 * np.sin(2.0 * np.pi * proj / period + phase)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """Linear ramp in a random direction, H x W in [0, 1]."""
    ys, xs = _grid(size)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    proj = (xs - size / 2) * np.cos(theta) + (ys - size / 2) * np.sin(theta)
    return np.clip(proj / size + 0.5, 0.0, 1.0)


def _segment_distance(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance from ``point`` to the segment a-b (all shape 3)."""
    ab = b - a
    t = float(np.clip(np.dot(point - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(point - (a + t * ab)))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape colour and two background colours, each shape 3, far enough apart.

    The background blends the two background colours, so the shape colour is kept at
    least ``_MIN_CONTRAST`` away from the whole segment between them.
    """
    shape_colour = rng.random(3)
    for _ in range(100):
        c1, c2 = rng.random(3), rng.random(3)
        if _segment_distance(shape_colour, c1, c2) >= _MIN_CONTRAST:
            return shape_colour, c1, c2
    # Fallback (practically unreachable): a flat background in the shape colour's complement.
    complement = 1.0 - shape_colour
    return shape_colour, complement, complement


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Texture weights, H x W in [0, 1]: a random convex mix of noise, stripes, gradient."""
    weights = rng.dirichlet(np.ones(3))
    texture = (
        weights[0] * _smooth_noise(rng, size)
        + weights[1] * _stripes(rng, size)
        + weights[2] * _gradient(rng, size)
    )
    lo, hi = texture.min(), texture.max()
    return (texture - lo) / max(hi - lo, 1e-6)


def _shape_mask(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Rasterise shape ``label`` at a random position, scale and rotation; H x W bool."""
    ys, xs = _grid(size)
    r = rng.uniform(_MIN_SCALE, _MAX_SCALE) * size
    margin = r + 1.0
    cy, cx = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    name = LABELS[label]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        half = r / np.sqrt(2.0)  # corners on the circumcircle
        return np.maximum(np.abs(u), np.abs(v)) <= half
    if name == "triangle":
        # Equilateral: inside all three half-planes whose normals are 120 degrees apart.
        inside = np.ones((size, size), dtype=bool)
        for k in range(3):
            angle = np.pi / 2 + k * 2.0 * np.pi / 3.0
            inside &= u * np.cos(angle) + v * np.sin(angle) <= r / 2.0
        return inside
    if name == "cross":
        arm = 0.3 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= r)) | ((av <= arm) & (au <= r))
    raise ValueError(f"unknown label {label}")


def make_sample(seed: int, index: int, size: int = IMAGE_SIZE) -> Sample:
    """Image ``index`` of the set drawn with ``seed``; its label is ``index % len(LABELS)``.

    Returns:
        A Sample with image 3 x size x size float32 in [0, 1] and mask size x size bool.
    """
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    rng = np.random.default_rng([seed, index])
    label = index % len(LABELS)
    shape_colour, c1, c2 = _colours(rng)
    texture = _background(rng, size).astype(np.float32)  # H x W
    c1, c2 = c1.astype(np.float32), c2.astype(np.float32)
    image = c1[:, None, None] + (c2 - c1)[:, None, None] * texture
    image += _PIXEL_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    mask = _shape_mask(label, rng, size)
    image[:, mask] = shape_colour.astype(np.float32)[:, None]
    return Sample(image=image, mask=mask, label=label)


def make_dataset(
    n: int, seed: int, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images 0..n-1 of the set drawn with ``seed``.

    Returns:
        images: N x 3 x H x W float32 in [0, 1].
        masks: N x H x W bool.
        labels: N int64, balanced (label = index % len(LABELS)).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        sample = make_sample(seed, i, size)
        images[i] = sample.image
        masks[i] = sample.mask
        labels[i] = sample.label
    return images, masks, labels


def save_png(sample_image: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a 3 x H x W image with values in [0, 1] as an 8-bit RGB PNG."""
    if sample_image.ndim != 3 or sample_image.shape[0] != 3:
        raise ValueError(f"expected a 3 x H x W image, got shape {sample_image.shape}")
    pixels = np.clip(np.rint(np.asarray(sample_image, dtype=np.float64) * 255.0), 0, 255)
    Image.fromarray(pixels.astype(np.uint8).transpose(1, 2, 0)).save(path, format="PNG")


EXAMPLE_SEED = 99
"""Seed of the example images written by ``main`` (neither training nor held-out)."""


def write_examples(out: Path, per_class: int = 1) -> list[Path]:
    """Writes ``per_class`` PNGs of every class into ``out`` as ``<label>.png`` (then
    ``<label>-2.png``, ...) and each object mask as ``<name>.mask.png``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(per_class * len(LABELS)):
        sample = make_sample(EXAMPLE_SEED, i)
        rank = i // len(LABELS)
        stem = LABELS[sample.label] + (f"-{rank + 1}" if rank else "")
        save_png(sample.image, out / f"{stem}.png")
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(out / f"{stem}.mask.png")
        written.append(out / f"{stem}.png")
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m xaiserve.model_store.synthetic --out examples/``: sample images."""
    parser = argparse.ArgumentParser(description="Write example images of the demo data set.")
    parser.add_argument("--out", type=Path, default=Path("examples"))
    parser.add_argument("--per-class", type=int, default=1)
    args = parser.parse_args(argv)
    for path in write_examples(args.out, args.per_class):
        print(path)


if __name__ == "__main__":
    main()
