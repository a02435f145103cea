"""Boxes of numpy arrays copied for a whole batch at once, through strided views.

Incremental occlusion (:mod:`.run`) cuts crops out of activations and pastes regions into
them, one box per window; RISE cuts each upsampled mask grid at its shift. A strided view
holds every box of one size of an array (no copy), and indexing it with per-box positions
copies all the boxes of a batch at once. Arrays are B x C x *grid; positions B x d (d
spatial axes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided


def _windows(source: np.ndarray, lengths: Sequence[int], writeable: bool = False) -> np.ndarray:
    """A view of every box of ``lengths`` in source (... x *grid): ... x *positions x
    *lengths (no copy; indexing it with per-box positions copies whole boxes at once)."""
    grid = source.shape[source.ndim - len(lengths) :]
    positions = tuple(n - length + 1 for n, length in zip(grid, lengths, strict=True))
    shape = source.shape[: source.ndim - len(lengths)] + positions + tuple(lengths)
    strides = source.strides + source.strides[source.ndim - len(lengths) :]
    return as_strided(source, shape, strides, writeable=writeable)


def crops(source: np.ndarray, starts: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """source: 1 x C x *grid -> B x C x *lengths, the boxes at ``starts`` (B x d)."""
    windows = np.moveaxis(_windows(source[0], lengths), 0, len(lengths))  # *pos x C x *len
    return windows[tuple(starts.T)]


def boxes_at(source: np.ndarray, starts: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """source: B x C x *grid -> B x C x *lengths, image b's box at ``starts[b]`` (B x d),
    copied for all B at once (also RISE's masks: each upsampled grid cut at its shift)."""
    return _windows(source, lengths)[(np.arange(len(starts)), slice(None), *starts.T)]


def padded(
    source: np.ndarray, front: Sequence[int], back: Sequence[int], fill: np.ndarray
) -> np.ndarray:
    """source (1 x C x *grid) with ``front`` and ``back`` positions per spatial axis
    around its grid, holding ``fill`` (per channel, C)."""
    grid = source.shape[-len(front) :]
    shape = source.shape[: -len(front)] + tuple(
        n + a + b for n, a, b in zip(grid, front, back, strict=True)
    )
    out = np.empty(shape, dtype=np.float32)
    out[...] = fill.reshape((1, -1) + (1,) * (source.ndim - 2))
    inside: Any = (..., *(slice(a, a + n) for a, n in zip(front, grid, strict=True)))
    out[inside] = source
    return out


def paste(
    target: np.ndarray,
    starts: np.ndarray,
    lengths: Sequence[int],
    values: np.ndarray | float,
) -> None:
    """Writes ``values`` (B x C x *lengths, or a number) into the boxes of ``target``
    (B x C x *grid) at ``starts`` (B x d), in place (through the boxes' view: one box of
    each image, so no element is written twice)."""
    view = _windows(target, lengths, writeable=True)
    view[(np.arange(len(starts)), slice(None), *starts.T)] = values
