"""The probe: what every APEM search of one image perturbs and asks.

A ``Probe`` holds the model (a counted no-grad forward, and the module for the loss
gradient), the input x (C x *spatial, in [0, 1]), the explained class y, the forward-pass
budget, the stage the passes are charged to, whether perturbed images are clamped to
[0, 1], and how many images one forward call may take. It replaces the argument lists
that travelled through every call of the search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.runtime.execution.executor import per_row
from xaiserve.runtime.forward.counted import Budget

Forward = Callable[[torch.Tensor, str], torch.Tensor]
"""A counted no-grad forward: (N x C x *spatial, stage) -> logits N x K (``TorchForward``)."""

STAGE = "apem"
MAX_IMAGES_PER_CALL = 512
"""Perturbed images built at once (memory bound); a round with more takes several calls."""


SignAndLogits = Callable[[torch.Tensor, int, Budget, str], tuple[torch.Tensor, torch.Tensor]]
"""(x C x *spatial, y, budget, stage) -> (sign(grad_x CE(f(x), y)), logits K), charged."""


def loss_gradient_pass(
    module: nn.Module,
) -> Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """The pass (rows N x C x *spatial, classes N) -> (grad of CE(f(row), class) per row,
    logits N x K): the summed loss's gradient is each row's own (eval mode)."""

    def run(rows: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        classes = per_row(classes, "loss gradient")
        xb = rows.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = module(xb)
            loss = F.cross_entropy(logits, classes, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
        return grad, logits.detach()

    return run


def gradient_sign_and_logits(
    module: nn.Module, x: torch.Tensor, y: int, budget: Budget, stage: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign(grad_x CE(f(x), y)) C x *spatial, logits K) of the unperturbed x: one forward
    + backward of ``module`` in this thread, charged to ``budget`` at ``stage``."""
    budget.charge(1, stage)
    grad, logits = loss_gradient_pass(module)(x[None], torch.tensor([y], device=x.device))
    return grad[0].sign(), logits[0]


@dataclass
class SharedGradient:
    """The loss gradient's sign and the logits of one (x, y), computed on first use and
    charged then to ``stage`` (None: the stage of the probe that first needs it). Every
    probe derived from one (``dataclasses.replace``) shares it: a request's maps and
    filters all perturb the same image along the same gradient sign, so one pass serves
    them all."""

    compute: SignAndLogits
    stage: str | None = None
    value: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Probe:
    """One image, its explained class and the means to ask the model about it.

    forward: counted no-grad batches on ``budget``; x: C x *spatial in [0, 1]; y: the
    explained class; gradient: the shared loss gradient (``Probe.of`` makes one); stage:
    the stage the searches' passes are charged to; clamp: clamp perturbed images to
    [0, 1]; max_images: images per forward call.
    """

    forward: Forward
    x: torch.Tensor
    y: int
    budget: Budget
    gradient: SharedGradient
    stage: str = STAGE
    clamp: bool = False
    max_images: int = MAX_IMAGES_PER_CALL

    @classmethod
    def of(
        cls,
        forward: Forward,
        module: nn.Module,
        x: torch.Tensor,
        y: int,
        budget: Budget,
        *,
        stage: str = STAGE,
        gradient_stage: str | None = None,
        sign_and_logits: SignAndLogits | None = None,
    ) -> Probe:
        """A probe with its own gradient, charged when first needed to ``gradient_stage``
        (None: the stage of the probe that needs it, ``stage`` or a derived probe's), and
        computed by ``sign_and_logits`` (None: ``module`` in the calling thread)."""
        compute = sign_and_logits or functools.partial(gradient_sign_and_logits, module)
        gradient = SharedGradient(compute, gradient_stage)
        return cls(forward, x, y, budget, gradient, stage)

    @property
    def gradient_computed(self) -> bool:
        return self.gradient.value is not None

    def sign_and_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign of the CE gradient C x *spatial, logits K) of the unperturbed x, computed
        once for all probes sharing ``gradient``."""
        shared = self.gradient
        if shared.value is None:
            shared.value = shared.compute(self.x, self.y, self.budget, shared.stage or self.stage)
        return shared.value

    def flips(
        self, directions: torch.Tensor, rows: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """argmax f(x + eps_i * directions[rows_i]) != y for every i (bool, len(rows)).

        directions: K x C x *spatial; rows: len(rows) indices into them; eps: float64,
        len(rows). At most ``max_images`` images per forward call.
        """
        out = []
        for start in range(0, len(rows), self.max_images):
            part = slice(start, start + self.max_images)
            images = self.perturbed(directions, rows[part], eps[part])
            out.append(self.forward(images, self.stage).argmax(dim=1) != self.y)
        return torch.cat(out)

    def perturbed(
        self, directions: torch.Tensor, rows: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """x + eps_i * directions[rows_i] (clamped to [0, 1] when asked), len(rows) x C x
        *spatial, built run by run of equal rows (rounds list each direction's values
        together) with numpy on one thread, into one preallocated array (``docs/apem.md``,
        "Building the perturbed images", says why)."""
        x = self.x
        base = x.detach().cpu().numpy()
        every = directions.detach().cpu().numpy()
        scale = eps.to(x.dtype).cpu().numpy().reshape((-1,) + (1,) * x.dim())
        images = np.empty((len(rows), *x.shape), dtype=base.dtype)
        values, counts = torch.unique_consecutive(rows.cpu(), return_counts=True)
        start = 0
        for k, count in zip(values.tolist(), counts.tolist(), strict=True):
            run = images[start : start + count]
            np.multiply(scale[start : start + count], every[k], out=run)
            np.add(run, base, out=run)
            if self.clamp:
                np.clip(run, 0.0, 1.0, out=run)
            start += count
        return torch.from_numpy(images)
