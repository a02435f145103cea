"""Builds the incremental occluder of a model (:class:`.run.IncrementalOcclusion`).

``build_occluder`` traces the network (``torch.fx``), plans its stages (:mod:`.plan`, with
and without cuts inside residual blocks), cuts out the stage modules and rewrites those
that allow it with valid windows (:mod:`.rewrite`), makes their runners (torch, or ONNX
Runtime sessions of the exported stages) and checks the result against full forward
passes of occluded images. A model the plan cannot handle (not traceable, no cut point,
no saving, a failed check) gets None and the reason, and its occlusion runs full forward
passes. Images are 1 x C x *spatial pixels; a pixel-space model's normalization runs as
part of the first stage.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from xaiserve.runtime.forward.config import SessionOptions
from xaiserve.runtime.forward.incremental.geometry import (
    activation_shape,
    join_shortcuts,
    trace,
)
from xaiserve.runtime.forward.incremental.plan import JOINS_WORTH_IT, plan_stages
from xaiserve.runtime.forward.incremental.rewrite import ValidStage, make_valid, stage_module
from xaiserve.runtime.forward.incremental.run import (
    IncrementalOcclusion,
    Layout,
    Runner,
    WholeRunner,
)
from xaiserve.runtime.forward.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxUnavailable,
    export_onnx,
    new_session,
)
from xaiserve.runtime.model import PixelSpaceModel

log = logging.getLogger(__name__)

CHECK_SEED = 0
CHECK_WINDOWS = 6


class _Normalize(nn.Module):
    """(x - mean) / std per channel: the pixel-space wrapper's first step."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _split(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(normalization, network) of a pixel-space model; (identity, module) otherwise."""
    if isinstance(module, PixelSpaceModel):
        return _Normalize(torch.as_tensor(module.mean), torch.as_tensor(module.std)), module.net
    return nn.Identity(), module


def _torch_runner(module: nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _onnx_runner(
    module: nn.Module, shape: Sequence[int], session_options: SessionOptions
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
    ``original`` in one call instead of one per stage (figures:
    docs/performance.md)."""

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
    session_options: SessionOptions,
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
            for part, shape in zip(np.split(flat, ends[:-1], axis=1), shapes, strict=True)
        ]

    return run


def build_occluder(
    module: nn.Module,
    input_shape: Sequence[int],
    window: int,
    starts: Sequence[Sequence[int]],
    backend: str,
    session_options: SessionOptions | None = None,
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
    :mod:`.rewrite`) unless ``valid_windows`` is off. Checked on a random image:
    the logits of occluded copies (the grid's corners, centre and a few more) within
    ``tolerance`` of full forward passes."""
    normalize, net = _split(module)
    generator = torch.Generator(device="cpu").manual_seed(CHECK_SEED)
    example = torch.rand(1, *input_shape, generator=generator, device="cpu")
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
    valid: list[ValidStage | None] = [None] * len(bodies)
    if valid_windows:
        valid = [
            make_valid(body, stage)[0] for body, stage in zip(bodies, plan.stages, strict=True)
        ]
        fits = Layout(plan, window, starts, valid).fits  # previous regions inside the crops
        valid = [v if fit else None for v, fit in zip(valid, fits, strict=True)]

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
            for s, v in zip(plan.stages, valid, strict=True)
        ]
        shapes.append(activation_shape(gm, plan.head_start))
        try:
            runners = [
                _onnx_runner(m, shape, options) for m, shape in zip(modules, shapes, strict=True)
            ]
        except OnnxUnavailable as err:
            return None, f"stage export to ONNX failed: {err}"
    fills = [
        None
        if v is None
        else _fill(v.fill, activation_shape(gm, s.start)[0], normalize if k == 0 else None)
        for k, (s, v) in enumerate(zip(plan.stages, valid, strict=True))
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
    picked = {every[int(i)] for i in picks}
    picked |= {
        tuple(a[len(a) // 2] for a in starts),
        tuple(a[0] if i else a[-1] for i, a in enumerate(starts)),
    }
    corners = sorted(picked)
    occluded = x.expand(len(corners), *x.shape[1:]).clone()
    for j, corner in enumerate(corners):
        box: Any = (j, slice(None), *(slice(c, c + window) for c in corner))
        occluded[box] = 0.5
    with torch.no_grad():
        expected = module(occluded)
    got = occluder.logits(occluder.original(x)[0], corners, 0.5)
    return float((got - expected).abs().max())
