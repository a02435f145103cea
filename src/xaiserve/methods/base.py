"""The shared base of attribution methods.

A method is one class in one file. It declares its capabilities (needs gradients, needs the
CAM layer, forward-only so its batches can run on ONNX Runtime) and its parameters with
defaults and ranges; the base validates parameters and provides the batched, counted
gradient computation most methods are built from.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.backward_override import BackwardRule, overridden_backward
from xaiserve.runtime.execution.executor import (
    Executor,
    InlineExecutor,
    Pass,
    Result,
    per_row,
    single,
)
from xaiserve.runtime.forward.counted import Budget, CountedForward, batches
from xaiserve.runtime.model import ServedModel


@dataclass(frozen=True)
class Param:
    """A method parameter: type, default and inclusive range (``high=None``: unbounded).

    ``kind=str`` parameters (proto enums, which arrive as lower-case names) list their
    allowed values in ``choices``; ``low``/``high`` are then unused.
    """

    name: str
    kind: type
    default: float | int | str
    low: float
    high: float | None
    doc: str
    choices: tuple[str, ...] = ()

    def resolve(self, value: Any, field: str) -> float | int | str:
        """Checks one given value; ``field`` is the full request path for errors."""
        if self.kind is str:
            if value not in self.choices:
                raise InvalidArgument(
                    field, f"must be one of {', '.join(self.choices)}, got {value!r}"
                )
            return str(value)
        if self.kind is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise InvalidArgument(field, f"must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise InvalidArgument(field, f"must be a finite number, got {value!r}")
        if value < self.low or (self.high is not None and value > self.high):
            upper = "" if self.high is None else f" and {self.high:g}"
            rule = f"between {self.low:g}{upper}" if self.high is not None else f">= {self.low:g}"
            raise InvalidArgument(field, f"must be {rule}, got {value:g}")
        return value


@dataclass
class MethodContext:
    """What a method may use for one request.

    model: the pixel-space module, which a method runs only inside a pass it hands to
    ``executor`` (``on_device``): the executor runs the passes of every request in flight
    on the model, packed into shared calls, so a request never calls the module itself;
    forward: counted no-grad batches (torch or ONNX Runtime, through the executor too;
    forward-only work builds its inputs in chunks of ``forward.batch_size``, from the
    memory budget); cam_layer: the configured CAM layer or None; max_batch: images per
    gradient batch. Without an executor, passes run at once in the calling thread (a
    module no other request uses: GAD's support models, offline tools, tests).
    """

    served: ServedModel
    forward: CountedForward
    budget: Budget
    max_batch: int
    executor: Executor = field(default_factory=lambda: InlineExecutor("inline"))

    @property
    def model(self) -> nn.Module:
        return self.served.module

    @property
    def cam_layer(self) -> nn.Module | None:
        return self.served.cam_layer


class AttributionMethod:
    """Base of every attribution method.

    Subclasses set ``name`` (the registry key, the proto enum name lower-cased) and the
    capability flags, list their ``params``, and implement ``attribute``.
    """

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = True
    needs_layer: ClassVar[bool] = False
    forward_only: ClassVar[bool] = False
    composite: ClassVar[bool] = False  # expanded by the engine (AUTO), computes no map itself
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    """Numbers of spatial axes the method handles: 2 (images), 3 (volumes N x C x D x H x W)."""
    params: ClassVar[tuple[Param, ...]] = ()
    cost_advice: ClassVar[str] = ""
    """What to lower when the method's forward passes take a request over the limit."""

    def unsupported_reason(self, served: ServedModel) -> str | None:
        """Why this method cannot run on ``served``, or None when it can."""
        dims = len(served.config.spatial)
        if dims not in self.spatial_dims:
            handled = " or ".join(f"{d}-D" for d in self.spatial_dims)
            return f"{self.name} handles {handled} inputs; the model takes {dims}-D inputs"
        if self.needs_layer and served.cam_layer is None:
            return "the model configures no cam_layer"
        return None

    def resolve_params(
        self, given: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> dict[str, Any]:
        """Fills defaults and validates ``given``; ``field`` is e.g. ``methods[1].occlusion``."""
        known = {p.name: p for p in self.params}
        for key in given:
            if key not in known:
                raise InvalidArgument(f"{field}.{key}", f"unknown parameter of {self.name}")
        resolved = {
            p.name: p.resolve(given[p.name], f"{field}.{p.name}") if p.name in given else p.default
            for p in self.params
        }
        self.check_params(resolved, input_shape, field)
        return resolved

    def check_params(
        self, params: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> None:
        """Checks that depend on several parameters or the input shape (C x *spatial)."""

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """The most forward passes ``attribute`` charges per image with the resolved
        ``params`` on ``served``, counted as ``Budget.charge`` counts them (one per image
        the model evaluates; a forward with its backward counts once). The engine adds
        these up before any work and refuses a request that could exceed its limit.
        Default: one gradient pass. Overridden where the count depends on parameters."""
        return 1

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        """x: N x C x *spatial in [0, 1]; target: N class indices.

        Returns the raw attribution, N x C x *spatial (N x 1 x *spatial for CAM maps).
        """
        raise NotImplementedError


def target_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits N x K, target N -> the N target logits."""
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def on_device(
    ctx: MethodContext,
    key: Hashable,
    run: Callable[[torch.Tensor, torch.Tensor | None], Result],
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    stage: str = "attribute",
    passes_per_row: int = 1,
    packs: bool = True,
) -> list[Result]:
    """``run`` over the rows of x (and target), through the model's executor, in chunks of
    at most one gradient batch (``max_batch // passes_per_row`` rows), each charged
    ``passes_per_row`` forward passes per row to ``stage`` before it runs; the results of
    the chunks, in order. ``key`` must name everything ``run`` depends on besides its rows
    (the executor packs rows of passes with equal keys, from any request, into one call,
    unless ``packs`` is False).
    """
    size = max(1, ctx.max_batch // passes_per_row)
    work = Pass(key, run, size, packs)
    out = []
    for part in batches(x.shape[0], size):
        ctx.budget.charge(passes_per_row * (part.stop - part.start), stage)
        rows_target = None if target is None else target[part]
        out.append(ctx.executor.run(work, x[part], rows_target, ctx.budget))
    return out


def gradient_of_targets(
    module: nn.Module, rules: Mapping[type[nn.Module], BackwardRule] | None = None
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The pass (rows, targets) -> d logit[target] / d rows of ``module``, for every row
    (rows are independent in eval mode, so the gradient of the summed target logits is
    each row's own), with the backward ``rules`` of ``backward_override`` applied when
    given."""

    def run(rows: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        targets = per_row(targets, "gradient")
        xb = rows.detach().requires_grad_(True)
        with torch.enable_grad(), overridden_backward(module, rules or {}):
            logits = module(xb)
            (grad,) = torch.autograd.grad(target_logits(logits, targets).sum(), xb)
        return grad

    return run


def input_gradients(
    ctx: MethodContext,
    x: torch.Tensor,
    target: torch.Tensor,
    stage: str = "attribute",
    variant: str = "plain",
    rules: Mapping[type[nn.Module], BackwardRule] | None = None,
) -> torch.Tensor:
    """d logit[target] / d x for every row of x, in counted gradient batches through the
    executor. x: M x C x *spatial; target: M. ``variant`` names the backward ``rules``
    (None: the model's own backward), for the executor's packing key."""
    run = gradient_of_targets(ctx.model, rules)
    return torch.cat(
        [single(r) for r in on_device(ctx, ("gradient", variant), run, x, target, stage)]
    )
