"""Occluded images' logits by incremental inference: a stage plan (:mod:`.incremental`)
run on crops, on torch or on ONNX Runtime.

For one image, ``original`` runs the stages once on the whole image and keeps the
activations at every cut. For a batch of windows, stage k gets, per window, a crop of the
original's activations at cut k with the window's region from stage k - 1 pasted in
(stage 0: the pixels, the window set to the baseline), all crops of one size so the batch
is one call (:func:`.incremental.place` says where each crop and region go, worked out
for every window when the occluder is built); from each output it keeps a fixed-size
region holding every position the window changed. A stage of one layer of windows runs
them valid (unpadded) on a crop of the activation padded once per image instead
(:mod:`.incremental_valid`): its output is that region, with no ring around it computed
and cut away (ResNet-18 at 224, window 15, all 12 stages: incremental occlusion 4-7%
faster on ONNX Runtime, the demo model's 12-17%; same logits). The head runs on the
original's last activations with those regions pasted in, and returns the logits. Crops
and regions are numpy arrays, copied for the whole batch at once through strided views of
every box.

``build_occluder`` makes the plan for a model, window side and window positions, the
stage modules (``torch.fx`` graph modules, exported to ONNX for the onnxruntime backend)
and checks the result against full forward passes of occluded images; a model the plan
cannot handle (not traceable, no cut point, no saving, a failed check) gets None and the
reason, and its occlusion runs full forward passes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
from torch import nn

from xaiserve.runtime.forward.incremental.plan import (
    JOINS_WORTH_IT,
    StagePlan,
    activation_shape,
    join_shortcuts,
    place,
    plan_stages,
    stage_module,
    trace,
)
from xaiserve.runtime.forward.incremental.rewrite import ValidStage, make_valid
from xaiserve.runtime.forward.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxUnavailable,
    export_onnx,
    new_session,
)
from xaiserve.runtime.model import PixelSpaceModel

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]
WholeRunner = Callable[[np.ndarray], list[np.ndarray]]
"""One pass of every stage over the whole image: pixels 1 x C x *spatial -> each stage's
output, in order."""
CHECK_SEED = 0
CHECK_WINDOWS = 6


class _Normalize(nn.Module):
    """(x - mean) / std per channel: the pixel-space wrapper's first step."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class IncrementalOcclusion:
    """Logits of occluded copies of an image, by stage plan (module docstring).

    plan: the stages; runners: one per stage (on crops), then the head (float32 arrays
    B x ... -> B x ...); whole: every stage on the whole image, in one call (``original``);
    window, starts: the windows it serves (side, and start offsets per axis; every
    combination is a window); valid: per stage, its rewrite with valid windows
    (:mod:`.incremental_valid`: crops of the padded activation, no ring, the output is the
    kept region) or None (the network's padding on crops, the kept box cut out); fills:
    per stage, the padding's value per input channel (valid stages). Where each window's
    crops, pasted regions and kept boxes lie is worked out once, here (``_Layout``), so a
    batch only gathers rows of it. Activations, crops and boxes are numpy arrays (ONNX
    Runtime's input and output; torch stages wrap them without copying).
    """

    def __init__(
        self,
        plan: StagePlan,
        runners: Sequence[Runner],
        window: int,
        starts: Sequence[Sequence[int]],
        whole: WholeRunner,
        valid: Sequence[ValidStage | None] = (),
        fills: Sequence[np.ndarray | None] = (),
    ) -> None:
        self.plan = plan
        self.runners = list(runners)
        self.whole = whole
        self.window = window
        self.valid = list(valid) or [None] * len(plan.stages)
        self.fills = list(fills) or [None] * len(plan.stages)
        self.layout = _Layout(plan, window, starts, self.valid)

    @property
    def cost_fraction(self) -> float:
        """The plan's estimated cost per occluded image / a full forward pass."""
        return self.plan.cost_fraction

    @property
    def valid_stages(self) -> int:
        """Stages that run valid windows (no ring)."""
        return sum(v is not None for v in self.valid)

    def original(self, x: torch.Tensor) -> tuple[list[np.ndarray], torch.Tensor]:
        """x: 1 x C x *spatial (pixels) -> (the activations at the input and every cut,
        each 1 x ..., padded where a valid stage reads them, and the logits 1 x K), from
        one pass over the whole image."""
        pixels = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        outputs = [pixels, *self.whole(pixels)]
        logits = torch.from_numpy(self.runners[-1](outputs[-1]))
        for k, (valid, fill) in enumerate(zip(self.valid, self.fills)):
            if valid is not None:
                outputs[k] = _padded(outputs[k], valid.front, valid.back, fill)
        return outputs, logits

    def logits(
        self,
        activations: list[np.ndarray],
        corners: Sequence[tuple[int, ...]],
        baseline: float,
    ) -> torch.Tensor:
        """Logits B x K of the image (``activations`` from :meth:`original`) with the
        window at each corner (one of the windows it serves) set to ``baseline``."""
        rows = self.layout.rows(corners)
        length: tuple[int, ...] = (self.window,) * len(corners[0])
        values: np.ndarray | float = baseline
        for k, (stage, run, valid) in enumerate(zip(self.plan.stages, self.runners, self.valid)):
            crop = stage.crop if valid is None else valid.length
            crops = _crops(activations[k], self.layout.crops[k][rows], crop)
            _paste(crops, self.layout.pastes[k][rows], length, values)
            values = run(crops)
            if valid is None:
                values = boxes_at(values, self.layout.boxes[k][rows], stage.rect)
            length = stage.rect
        inputs = np.repeat(activations[-1], len(rows), axis=0)
        _paste(inputs, self.layout.pastes[-1][rows], length, values)
        return torch.from_numpy(self.runners[-1](inputs))


class _Layout:
    """Per window (rows in the order of ``itertools.product(*starts)``), B x d integer
    arrays: ``crops[k]``, where stage k's crop starts in its input grid (padded, for a
    valid stage: the kept region's start x stride); ``pastes[k]``, where the previous
    region goes in that crop (``pastes[-1]``: in the head's input); ``boxes[k]``, where
    the region kept starts in stage k's output (None for a valid stage, whose output is
    that region; see :func:`.incremental.place`). ``fits[k]``: every window's previous
    region lies inside its crop (always for padded stages, whose crops are made to hold
    it)."""

    def __init__(
        self,
        plan: StagePlan,
        window: int,
        starts: Sequence[Sequence[int]],
        valid: Sequence[ValidStage | None],
    ) -> None:
        corners = list(itertools.product(*starts))
        self.index = {corner: row for row, corner in enumerate(corners)}
        at = torch.tensor(corners, dtype=torch.long).view(len(corners), len(starts))
        previous, length = at, (window,) * len(starts)
        self.crops, self.pastes, self.boxes, self.fits = [], [], [], []
        for stage, rewritten in zip(plan.stages, valid):
            placement = place(stage, at, window, previous, length)
            strides = torch.tensor([s.stride for s in stage.span])
            if rewritten is None:
                offsets = placement.offsets(stage)
                self.boxes.append((placement.rect - offsets // strides).numpy())
                paste = previous - offsets
                self.fits.append(True)
            else:
                offsets = placement.rect * strides
                self.boxes.append(None)
                paste = previous + torch.tensor(rewritten.front) - offsets
                inside = (paste >= 0) & (
                    paste + torch.tensor(length) <= torch.tensor(rewritten.length)
                )
                self.fits.append(bool(inside.all()))
            self.crops.append(offsets.numpy())
            self.pastes.append(paste.numpy())
            previous, length = placement.rect, stage.rect
        self.pastes.append(previous.numpy())

    def rows(self, corners: Sequence[tuple[int, ...]]) -> np.ndarray:
        """The rows of these window corners."""
        return np.fromiter(
            (self.index[tuple(c)] for c in corners), dtype=np.intp, count=len(corners)
        )


def _windows(source: np.ndarray, lengths: Sequence[int], writeable: bool = False) -> np.ndarray:
    """A view of every box of ``lengths`` in source (... x *grid): ... x *positions x
    *lengths (no copy; indexing it with per-box positions copies whole boxes at once)."""
    grid = source.shape[source.ndim - len(lengths) :]
    positions = tuple(n - length + 1 for n, length in zip(grid, lengths))
    shape = source.shape[: source.ndim - len(lengths)] + positions + tuple(lengths)
    strides = source.strides + source.strides[source.ndim - len(lengths) :]
    return as_strided(source, shape, strides, writeable=writeable)


def _crops(source: np.ndarray, starts: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """source: 1 x C x *grid -> B x C x *lengths, the boxes at ``starts`` (B x d)."""
    windows = np.moveaxis(_windows(source[0], lengths), 0, len(lengths))  # *pos x C x *len
    return windows[tuple(starts.T)]


def boxes_at(source: np.ndarray, starts: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """source: B x C x *grid -> B x C x *lengths, image b's box at ``starts[b]`` (B x d),
    copied for all B at once (also RISE's masks: each upsampled grid cut at its shift)."""
    return _windows(source, lengths)[(np.arange(len(starts)), slice(None), *starts.T)]


def _padded(
    source: np.ndarray, front: Sequence[int], back: Sequence[int], fill: np.ndarray
) -> np.ndarray:
    """source (1 x C x *grid) with ``front`` and ``back`` positions per spatial axis
    around its grid, holding ``fill`` (per channel, C)."""
    grid = source.shape[-len(front) :]
    shape = source.shape[: -len(front)] + tuple(n + a + b for n, a, b in zip(grid, front, back))
    out = np.empty(shape, dtype=np.float32)
    out[...] = fill.reshape((1, -1) + (1,) * (source.ndim - 2))
    out[(..., *(slice(a, a + n) for a, n in zip(front, grid)))] = source
    return out


def _paste(
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


# ------------------------------------------------------------------------------ building


def _split(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(normalization, network) of a pixel-space model; (identity, module) otherwise."""
    if isinstance(module, PixelSpaceModel):
        return _Normalize(module.mean, module.std), module.net
    return nn.Identity(), module


def _torch_runner(module: nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _onnx_runner(
    module: nn.Module, shape: Sequence[int], session_options: dict[str, Any]
) -> Runner:
    """An ONNX Runtime session of ``module`` for inputs B x ``shape`` (a stage's crops, the
    head's whole activation, or the whole image through every stage: ``_AllStages``)."""
    session = new_session(export_onnx(module, shape), **session_options)

    def run(x: np.ndarray) -> np.ndarray:
        (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return y

    return run


class _AllStages(nn.Module):
    """Every stage on the whole image, each output flattened per image and all of them
    concatenated (B x total): one graph with one output, so ONNX Runtime runs
    ``original`` in one call (the demo model: 0.5 ms against 1.0 ms for its six stages as
    torch modules, and its adaptive occlusion about 10% faster)."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x.flatten(1))
        return torch.cat(outputs, dim=1)


def _torch_whole(stages: Sequence[nn.Module]) -> WholeRunner:
    runners = [_torch_runner(stage) for stage in stages]

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        outputs = [pixels]
        for stage in runners:
            outputs.append(stage(outputs[-1]))
        return outputs[1:]

    return run


def _onnx_whole(
    stages: Sequence[nn.Module],
    input_shape: Sequence[int],
    shapes: Sequence[tuple[int, ...]],
    session_options: dict[str, Any],
) -> WholeRunner:
    """``_AllStages`` on ONNX Runtime, its output split back into the stages' outputs
    (``shapes``: each one image's, C x *grid; for one image, views of the output: no copy).
    Raises OnnxUnavailable when the export fails."""
    ends = np.cumsum([math.prod(shape) for shape in shapes])
    run_all = _onnx_runner(_AllStages(stages).eval(), input_shape, session_options)

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        flat = run_all(pixels)
        return [
            part.reshape(len(pixels), *shape)
            for part, shape in zip(np.split(flat, ends[:-1], axis=1), shapes)
        ]

    return run


def build_occluder(
    module: nn.Module,
    input_shape: Sequence[int],
    window: int,
    starts: Sequence[Sequence[int]],
    backend: str,
    session_options: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
    joins_worth_it: float = JOINS_WORTH_IT,
    valid_windows: bool = True,
) -> tuple[IncrementalOcclusion | None, str]:
    """(occluder, "") or (None, why not) for the pixel-space ``module``, input C x
    *spatial, windows of side ``window`` starting at every combination of ``starts`` (per
    axis), stages on ``backend`` ("torch" or "onnxruntime", its sessions made with
    ``session_options``: ``onnx_export.new_session``'s keywords). Cuts inside residual
    blocks when that plan's estimate is at most ``joins_worth_it`` of the plan without.
    Stages that allow it run valid windows on padded activations (no ring,
    :mod:`.incremental_valid`) unless ``valid_windows`` is off. Checked on a random image:
    the logits of occluded copies (the grid's corners, centre and a few more) within
    ``tolerance`` of full forward passes."""
    normalize, net = _split(module)
    example = torch.rand(1, *input_shape, generator=torch.Generator().manual_seed(CHECK_SEED))
    try:
        gm = trace(net, normalize(example))
        joined = trace(net, normalize(example))
    except Exception as err:  # torch.fx raises many types for untraceable code
        return None, f"not traceable by torch.fx: {type(err).__name__}: {err}"[:300]
    plan = plan_stages(gm, window, starts)
    if join_shortcuts(joined, normalize(example)):  # cuts inside residual blocks too
        finer = plan_stages(joined, window, starts)
        cheaper = not plan.stages or finer.cost_fraction <= joins_worth_it * plan.cost_fraction
        if finer.stages and cheaper:
            gm, plan = joined, finer
    if not plan.stages:
        return None, plan.reason
    bodies = [stage_module(gm, stage.start, stage.end) for stage in plan.stages]
    valid = [None] * len(bodies)
    if valid_windows:
        valid = [make_valid(body, stage)[0] for body, stage in zip(bodies, plan.stages)]
        fits = _Layout(plan, window, starts, valid).fits  # previous regions inside the crops
        valid = [v if fit else None for v, fit in zip(valid, fits)]

    def first(k: int, body: nn.Module) -> nn.Module:  # stage 0 starts from pixels
        return nn.Sequential(normalize, body).eval() if k == 0 else body

    whole = [first(k, body) for k, body in enumerate(bodies)]
    modules = [whole[k] if v is None else first(k, v.module) for k, v in enumerate(valid)]
    modules.append(stage_module(gm, plan.head_start, None))
    runners = [_torch_runner(m) for m in modules]
    if backend == "onnxruntime":
        options = session_options or {}
        dims = len(input_shape) - 1  # stage inputs: the cut's channels, the crop's sides
        shapes = [
            (*activation_shape(gm, s.start)[:-dims], *(s.crop if v is None else v.length))
            for s, v in zip(plan.stages, valid)
        ]
        shapes.append(activation_shape(gm, plan.head_start))
        try:
            runners = [_onnx_runner(m, shape, options) for m, shape in zip(modules, shapes)]
        except OnnxUnavailable as err:
            return None, f"stage export to ONNX failed: {err}"
    fills = [
        None
        if v is None
        else _fill(v.fill, activation_shape(gm, s.start)[0], normalize if k == 0 else None)
        for k, (s, v) in enumerate(zip(plan.stages, valid))
    ]
    whole_runner = _torch_whole(whole)
    if backend == "onnxruntime":
        try:
            outputs = [activation_shape(gm, stage.end) for stage in plan.stages]
            whole_runner = _onnx_whole(whole, input_shape, outputs, options)
        except OnnxUnavailable as err:  # the stages on crops exported: keep them
            log.warning("whole-image stages run on torch: export to ONNX failed: %s", err)
    occluder = IncrementalOcclusion(plan, runners, window, starts, whole_runner, valid, fills)
    error = _check(occluder, module, example, window, starts)
    if error > tolerance:
        return None, f"check failed: max |logit difference| {error:.2e} > {tolerance:g}"
    return occluder, ""


def _fill(value: float, channels: int, normalize: nn.Module | None) -> np.ndarray:
    """The padding of a valid stage's input, per channel: ``value`` (what the windows'
    padding stands for), in pixels for the first stage (normalization maps it to
    ``value``: mean + value x std)."""
    fill = np.full(channels, value, dtype=np.float32)
    if isinstance(normalize, _Normalize) and math.isfinite(value):
        fill = (normalize.mean + value * normalize.std).reshape(-1).numpy().astype(np.float32)
    return fill


def _check(
    occluder: IncrementalOcclusion,
    module: nn.Module,
    x: torch.Tensor,
    window: int,
    starts: Sequence[Sequence[int]],
) -> float:
    """Max |logit difference| between the occluder and full forward passes of occluded
    copies of ``x``: every window when there are at most CHECK_WINDOWS, else windows
    spread evenly over the grid (its first and last included), its centre and the corner
    first on one axis and last on the others."""
    every = list(itertools.product(*starts))
    picks = torch.linspace(0, len(every) - 1, min(CHECK_WINDOWS, len(every))).round().long()
    corners = {every[int(i)] for i in picks}
    corners |= {
        tuple(a[len(a) // 2] for a in starts),
        tuple(a[0] if i else a[-1] for i, a in enumerate(starts)),
    }
    corners = sorted(corners)
    occluded = x.expand(len(corners), *x.shape[1:]).clone()
    for j, corner in enumerate(corners):
        occluded[(j, slice(None), *(slice(c, c + window) for c in corner))] = 0.5
    with torch.no_grad():
        expected = module(occluded)
    got = occluder.logits(occluder.original(x)[0], corners, 0.5)
    return float((got - expected).abs().max())


def describe(plan: StagePlan) -> str:
    """One line: the stages' crops over their grids, the estimated cost fraction and the
    share a window changes (the least an exact plan computes)."""
    crops = ", ".join(
        f"{'x'.join(map(str, s.crop))} of {'x'.join(map(str, s.grid_in))}" for s in plan.stages
    )
    return (
        f"{len(plan.stages)} stages (crops {crops}), about {plan.cost_fraction:.0%} "
        f"of a forward pass per occluded image (a window changes "
        f"{plan.changed_fraction:.0%} of it)"
    )
