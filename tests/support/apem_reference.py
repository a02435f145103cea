"""APEM code only tests and benchmarks use: the seed's step-by-step search (the reference
the batched search is checked against), a one-direction search, the loss gradient's sign
alone, and probes built from a test's forward."""

from __future__ import annotations

import torch
from torch import nn

from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.probe import STAGE, Forward, Probe, gradient_sign_and_logits
from xaiserve.reliability.search import SearchResult, search_first_flips
from xaiserve.runtime.forward.counted import Budget


def probe_of(
    forward: Forward,
    module: nn.Module | None,
    x: torch.Tensor,
    y: int,
    budget: Budget | None = None,
    *,
    batch: int | None = None,
) -> Probe:
    """A probe of x (C x *spatial) and y; ``module`` None: one whose searches never need the
    gradient (search tests with a stand-in forward); ``budget`` None: an ample one."""
    budget = budget if budget is not None else Budget(10**9)
    module = module if module is not None else nn.Identity()
    if batch is None:
        return Probe.of(forward, module, x, y, budget)
    return Probe.of(forward, module, x, y, budget, batch=batch)


def loss_gradient_sign(
    module: nn.Module, x: torch.Tensor, y: int, budget: Budget, stage: str = STAGE
) -> torch.Tensor:
    """sign(grad_x CE(f(x), y)), C x *spatial: one forward + backward, charged to ``budget``."""
    return gradient_sign_and_logits(module, x, y, budget, stage)[0]


def search_first_flip(
    probe: Probe, lattice: Lattice, direction: torch.Tensor, max_calls: int | None = None
) -> SearchResult:
    """``search_first_flips`` for one direction (C x *spatial)."""
    (result,) = search_first_flips(probe, lattice, direction.unsqueeze(0), max_calls=max_calls)
    return result


def reference_search(
    forward: Forward,
    x: torch.Tensor,
    direction: torch.Tensor,
    y: int,
    *,
    eps_max: float,
    step: float,
    clamp: bool = False,
    stage: str = STAGE,
) -> tuple[float, bool]:
    """The seed's procedure (seed 004, section 3.3): eps = step, 2 step, ... one forward each.

    x, direction: C x *spatial. Returns (the first eps that flips, False), or (eps_max, True)
    when none up to eps_max does; costs eps / step forward calls.
    """
    k = 1
    while k * step <= eps_max * (1 + 1e-12):
        image = x + (k * step) * direction
        if clamp:
            image = image.clamp(0.0, 1.0)
        if int(forward(image.unsqueeze(0), stage).argmax(dim=1)) != y:
            return k * step, False
        k += 1
    return eps_max, True


class CountingForward:
    """Wraps a forward, counting calls and images."""

    def __init__(self, forward: Forward) -> None:
        self.forward, self.calls, self.images = forward, 0, 0

    def __call__(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return self.forward(x, stage)
