"""Occluded images' logits by incremental inference: a stage plan (:mod:`.plan`) run on
crops, on torch or on ONNX Runtime.

For one image, ``original`` runs the stages once on the whole image and keeps the
activations at every cut. For a batch of windows, stage k gets, per window, a crop of the
original's activations at cut k with the window's region from stage k - 1 pasted in
(stage 0: the pixels, the window set to the baseline), all crops of one size so the batch
is one call (:func:`.plan.place` says where each crop and region go, worked out for every
window when the occluder is built: :class:`Layout`); from each output it keeps a
fixed-size region holding every position the window changed. A stage of one layer of
windows runs them valid (unpadded) on a crop of the activation padded once per image
instead (:mod:`.rewrite`): its output is that region, with no ring around it computed and
cut away (same logits, less arithmetic; figures: docs/performance.md). The head
runs on the original's last activations with those regions pasted in, and returns the
logits. Crops and regions are numpy arrays, copied for the whole batch at once
(:mod:`.boxes`). :mod:`.build` makes the occluder of a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from xaiserve.runtime.forward.incremental import boxes
from xaiserve.runtime.forward.incremental.plan import StagePlan, place
from xaiserve.runtime.forward.incremental.rewrite import ValidStage

Runner = Callable[[np.ndarray], np.ndarray]
"""One stage (or the head) on a batch: float32 B x ... -> B x ..."""
WholeRunner = Callable[[np.ndarray], list[np.ndarray]]
"""One pass of every stage over the whole image: pixels 1 x C x *spatial -> each stage's
output, in order."""


class IncrementalOcclusion:
    """Logits of occluded copies of an image, by stage plan (module docstring).

    plan: the stages; runners: one per stage (on crops), then the head (float32 arrays
    B x ... -> B x ...); whole: every stage on the whole image, in one call (``original``);
    window, starts: the windows it serves (side, and start offsets per axis; every
    combination is a window); valid: per stage, its rewrite with valid windows
    (:mod:`.rewrite`: crops of the padded activation, no ring, the output is the
    kept region) or None (the network's padding on crops, the kept box cut out); fills:
    per stage, the padding's value per input channel (valid stages). Where each window's
    crops, pasted regions and kept boxes lie is worked out once, here (``Layout``), so a
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
        self.layout = Layout(plan, window, starts, self.valid)

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
        for k, (valid, fill) in enumerate(zip(self.valid, self.fills, strict=True)):
            if valid is not None:
                if fill is None:
                    raise ValueError(f"stage {k} runs valid windows but has no padding value")
                outputs[k] = boxes.padded(outputs[k], valid.front, valid.back, fill)
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
        for k, (stage, run, valid) in enumerate(
            zip(self.plan.stages, self.runners, self.valid, strict=False)
        ):
            crop = stage.crop if valid is None else valid.length
            crops = boxes.crops(activations[k], self.layout.crops[k][rows], crop)
            boxes.paste(crops, self.layout.pastes[k][rows], length, values)
            values = run(crops)
            kept = self.layout.boxes[k]  # None for a valid stage: its output is the region
            if kept is not None:
                values = boxes.boxes_at(values, kept[rows], stage.rect)
            length = stage.rect
        inputs = np.repeat(activations[-1], len(rows), axis=0)
        boxes.paste(inputs, self.layout.pastes[-1][rows], length, values)
        return torch.from_numpy(self.runners[-1](inputs))


class Layout:
    """Per window (rows in the order of ``itertools.product(*starts)``), B x d integer
    arrays: ``crops[k]``, where stage k's crop starts in its input grid (padded, for a
    valid stage: the kept region's start x stride); ``pastes[k]``, where the previous
    region goes in that crop (``pastes[-1]``: in the head's input); ``boxes[k]``, where
    the region kept starts in stage k's output (None for a valid stage, whose output is
    that region; see :func:`.plan.place`). ``fits[k]``: every window's previous
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
        self.crops: list[np.ndarray] = []
        self.pastes: list[np.ndarray] = []
        self.boxes: list[np.ndarray | None] = []
        self.fits: list[bool] = []
        for stage, rewritten in zip(plan.stages, valid, strict=True):
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
