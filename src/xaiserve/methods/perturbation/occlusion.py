"""Occlusion (Zeiler and Fergus, 2014): the drop of the target logit when a window is
replaced by a baseline value.

Windows of side ``window`` slide with step ``stride`` over every spatial axis, all channels
at once; when (side - window) is not a multiple of stride a last window flush with the
border is added, so every pixel is covered. A pixel's attribution is the mean drop
f_y(x) - f_y(x with window occluded) over the windows covering it; all channels get the same
value. Forward-only: occluded copies go through the model in counted batches
(``ctx.forward``: torch or ONNX Runtime), built ``ctx.forward.batch_size`` at a time, and
incrementally where the forward offers an occluder
(:mod:`xaiserve.runtime.forward.incremental`): the early layers are recomputed only around
each window, exactly, one forward pass still counted per occluded image (ResNet-18 at
224 x 224, window 15: about half the arithmetic of a full pass).

Adaptive mode (``adaptive: {enabled: true, coarse_window, refine_fraction}``, see
:mod:`.occlusion_adaptive`): windows of the same side on a coarse grid of positions
``coarse_window`` pixels apart (default 2 x window, rounded to a multiple of the stride),
then positions of finer grids only where the interpolated coarse map is highest, until
``refine_fraction`` (default 0.15) of the positions off the coarse grid are evaluated; the
other positions' drops are interpolated and the map is accumulated as in full occlusion.
On the demo model at the default window and stride it costs 56 forward passes instead of
226 (4.0x fewer).

Captum's Occlusion uses the same definition but leaves the border remainder uncovered; the
two agree exactly when (side - window) is a multiple of stride.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
import torch

from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.base import AttributionMethod, MethodContext, Param, target_logits
from xaiserve.methods.perturbation.occlusion_adaptive import adaptive_drops, positions_evaluated
from xaiserve.runtime.forward.counted import batches
from xaiserve.runtime.forward.incremental.run import IncrementalOcclusion
from xaiserve.runtime.model import ServedModel

ADAPTIVE = "adaptive"
ADAPTIVE_PARAMS = (
    Param(
        "coarse_window",
        int,
        0,
        0,
        None,
        "spacing of the coarse grid of window positions in pixels (0: 2 x window), "
        "rounded to a multiple of the stride",
    ),
    Param(
        "refine_fraction",
        float,
        0.15,
        0.0,
        1.0,
        "fraction of the positions off the coarse grid evaluated, highest first",
    ),
)


def window_starts(side: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis, the last window flush with the border."""
    starts = list(range(0, side - window + 1, stride))
    if starts[-1] != side - window:
        starts.append(side - window)
    return starts


def coarse_step(params: dict[str, Any]) -> int:
    """The coarse grid's spacing in window positions (>= 1)."""
    spacing = params[ADAPTIVE]["coarse_window"] or 2 * params["window"]
    return max(1, round(spacing / params["stride"]))


def coverage(side: int, starts: list[int], window: int, device: torch.device) -> torch.Tensor:
    """len(starts) x side, float64 on ``device``: 1 where the window starting at starts[i]
    covers a pixel."""
    pixels = torch.arange(side, device=device)
    begin = torch.tensor(starts, device=device).unsqueeze(1)
    return ((pixels >= begin) & (pixels < begin + window)).double()


def accumulate(axes: list[list[int]], window: int, drops: torch.Tensor) -> torch.Tensor:
    """The occlusion map 1 x *spatial: each pixel's mean drop over the windows covering it.

    axes: window starts per spatial axis; drops: n_1 x ... x n_d, one per window (the
    windows are the product of the axes' starts). A window's box is separable, so the sums
    over covering windows are products with each axis's coverage matrix. On drops' device.
    """
    spatial = [max(starts) + window for starts in axes]
    device = drops.device
    total, count = drops.double(), torch.ones(drops.shape, dtype=torch.float64, device=device)
    for axis, (side, starts) in enumerate(zip(spatial, axes, strict=True)):
        cover = coverage(side, starts, window, device)
        total = torch.tensordot(total, cover, dims=([axis], [0])).movedim(-1, axis)
        count = torch.tensordot(count, cover, dims=([axis], [0])).movedim(-1, axis)
    return (total / count).float().unsqueeze(0)


class Occlusion(AttributionMethod):
    name = "occlusion"
    needs_gradients = False
    forward_only = True
    params = (
        Param("window", int, 8, 1, None, "side of the square window in pixels"),
        Param("stride", int, 4, 1, None, "step between windows in pixels"),
        Param("baseline", float, 0.5, 0.0, 1.0, "value replacing the occluded pixels"),
    )
    cost_advice = "use a larger window or stride, or adaptive occlusion"

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """The unoccluded image, then one occluded copy per window position evaluated:
        every position, or in adaptive mode the coarse lattice and the refined ones."""
        counts = [
            len(window_starts(side, params["window"], params["stride"]))
            for side in served.config.spatial
        ]
        if params.get(ADAPTIVE):
            fraction = params[ADAPTIVE]["refine_fraction"]
            return 1 + positions_evaluated(counts, coarse_step(params), fraction)
        return 1 + math.prod(counts)

    def resolve_params(
        self, given: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> dict[str, Any]:
        """The scalar parameters, and ``adaptive`` (a dict: ``enabled``, ``coarse_window``,
        ``refine_fraction``) resolved to its options, or None when not enabled."""
        given = dict(given)
        adaptive = given.pop(ADAPTIVE, None)
        resolved = super().resolve_params(given, input_shape, field)
        resolved[ADAPTIVE] = self._resolve_adaptive(adaptive, f"{field}.{ADAPTIVE}")
        return resolved

    @staticmethod
    def _resolve_adaptive(given: Any, field: str) -> dict[str, Any] | None:
        if given is None:
            return None
        if not isinstance(given, dict):
            raise InvalidArgument(field, f"must be a message of options, got {given!r}")
        known = {p.name: p for p in ADAPTIVE_PARAMS}
        for key in given:
            if key not in known and key != "enabled":
                raise InvalidArgument(f"{field}.{key}", "unknown option of adaptive occlusion")
        enabled = given.get("enabled", False)
        if not isinstance(enabled, bool):
            raise InvalidArgument(f"{field}.enabled", f"must be true or false, got {enabled!r}")
        options = {
            p.name: p.resolve(given[p.name], f"{field}.{p.name}") if p.name in given else p.default
            for p in ADAPTIVE_PARAMS
        }
        return options if enabled else None

    def check_params(
        self, params: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> None:
        smallest = min(input_shape[1:])
        if params["window"] > smallest:
            raise InvalidArgument(
                f"{field}.window",
                f"window {params['window']} is larger than the model input ({smallest} pixels)",
            )
        if params["stride"] > params["window"]:
            raise InvalidArgument(
                f"{field}.stride",
                f"stride {params['stride']} is larger than the window {params['window']} "
                "(pixels would be left out)",
            )

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        """x: N x C x *spatial -> N x C x *spatial (every channel the same map)."""
        w = params["window"]
        spatial = tuple(x.shape[2:])
        axes = [window_starts(d, w, params["stride"]) for d in spatial]
        occluder = ctx.forward.occluder(w, axes)
        base = None  # full forward passes: the originals' logits in one batch
        if occluder is None:
            base = target_logits(ctx.forward(x, "attribute"), target)
        counts = [len(a) for a in axes]
        maps = []
        for i in range(x.shape[0]):
            scores = _TargetScores(
                ctx,
                x[i : i + 1],
                target[i : i + 1],
                occluder,
                w,
                params["baseline"],
                None if base is None else base[i],
            )
            evaluate = functools.partial(scores.drops, axes)
            if params.get(ADAPTIVE):
                estimate, _ = adaptive_drops(
                    evaluate, counts, coarse_step(params), params[ADAPTIVE]["refine_fraction"]
                )
                drops = torch.from_numpy(estimate).to(x.device)
            else:
                drops = evaluate(list(itertools.product(*map(range, counts)))).view(counts)
            maps.append(accumulate(axes, w, drops))
        return torch.stack(maps).expand(-1, x.shape[1], *spatial).contiguous()


class _TargetScores:
    """The target logit of one image (``base``) and of its occluded copies, in counted
    batches: by the incremental ``occluder`` when there is one, else full forward passes.

    xi: 1 x C x *spatial; yi: its target, shape 1; base: the image's target logit when
    already computed (full forward passes only; the occluder computes its own, so the
    original and its occluded copies go through the same arithmetic).
    """

    def __init__(
        self,
        ctx: MethodContext,
        xi: torch.Tensor,
        yi: torch.Tensor,
        occluder: IncrementalOcclusion | None,
        window: int,
        baseline: float,
        base: torch.Tensor | None = None,
    ) -> None:
        self.ctx, self.xi, self.yi = ctx, xi, yi
        self.occluder, self.window, self.baseline = occluder, window, baseline
        if occluder is not None:
            self.activations, logits = ctx.forward.timed(
                1, "attribute", lambda: occluder.original(xi)
            )
            base = target_logits(logits, yi)[0]
        elif base is None:
            base = target_logits(ctx.forward(xi, "attribute"), yi)[0]
        self.base = base

    def drops(self, axes: list[list[int]], positions: list[tuple[int, ...]]) -> torch.Tensor:
        """base - the target logit with the window at each position occluded (shape
        len(positions)); a position indexes the window starts of each axis."""
        corners = [tuple(a[j] for a, j in zip(axes, p, strict=True)) for p in positions]
        return self.base - self.occluded(corners)

    def occluded(self, corners: list[tuple[int, ...]]) -> torch.Tensor:
        """Target logits (shape len(corners)) with the window at each corner occluded."""
        forward, occluder, scores = self.ctx.forward, self.occluder, []
        for part in batches(len(corners), forward.batch_size):
            chunk = corners[part]
            if occluder is None:
                logits = forward(self._occluded_images(chunk), "attribute")
                scores.append(target_logits(logits, self.yi.expand(len(chunk))))
            else:
                run = functools.partial(self._incremental, occluder, chunk)
                scores.append(forward.timed(len(chunk), "attribute", run))
        return torch.cat(scores)

    def _incremental(
        self, occluder: IncrementalOcclusion, corners: list[tuple[int, ...]]
    ) -> torch.Tensor:
        """Target logits by the occluder. A window already equal to the baseline changes
        nothing: it keeps the original's logit exactly (crops sum in another order than
        the whole image, so the occluder's logit would differ in the last digits, and a
        flat image's map would be noise instead of zero)."""
        changes = windows_that_change(self.xi[0], corners, self.window, self.baseline).tolist()
        scores = self.base.expand(len(corners)).clone()
        moved = [c for c, change in zip(corners, changes, strict=True) if change]
        if moved:
            logits = occluder.logits(self.activations, moved, self.baseline)
            changed = torch.tensor(changes, device=scores.device)
            scores[changed] = target_logits(logits, self.yi.expand(len(moved)))
        return scores

    def _box(self, corner: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(a, a + self.window) for a in corner)

    def _occluded_images(self, corners: list[tuple[int, ...]]) -> torch.Tensor:
        """Copies of xi with the window at each corner set to the baseline, built with
        numpy on one thread: torch's copy of a whole batch wakes its OpenMP threads,
        which then spin and slow the ONNX Runtime calls that follow
        (docs/performance.md)."""
        original = self.xi.detach().cpu().numpy()
        occluded = np.empty((len(corners), *original.shape[1:]), dtype=original.dtype)
        occluded[...] = original
        for j, corner in enumerate(corners):
            index: tuple[int | slice, ...] = (j, slice(None), *self._box(corner))
            occluded[index] = self.baseline
        return torch.from_numpy(occluded)  # the forward moves it to the model's device


def windows_that_change(
    xi: torch.Tensor, corners: list[tuple[int, ...]], window: int, baseline: float
) -> torch.Tensor:
    """Whether occluding the window at each corner changes xi (C x *spatial): some value in
    it differs from the baseline. Counted with a summed-area table of the differing
    positions (inclusion-exclusion over the box's 2^d corners), so each window costs O(1)."""
    differs = (xi != baseline).any(dim=0).to(torch.int64)
    table = torch.nn.functional.pad(differs, (1, 0) * differs.dim())
    for axis in range(differs.dim()):
        table = table.cumsum(axis)
    at = torch.tensor(corners, dtype=torch.int64, device=xi.device)
    at = at.view(len(corners), differs.dim())
    count = torch.zeros(len(corners), dtype=torch.int64, device=xi.device)
    for far in itertools.product((0, 1), repeat=differs.dim()):
        sign = (-1) ** (differs.dim() - sum(far))
        count += sign * table[tuple((at[:, i] + window * f) for i, f in enumerate(far))]
    return count > 0
