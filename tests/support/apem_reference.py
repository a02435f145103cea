"""APEM code only tests and benchmarks use: the seed's step-by-step search (the reference
the batched search is checked against), a one-direction search, the loss gradient's sign
alone, probes built from a test's forward, a linear model with its flips in closed form, a
saliency map and the predicted class."""

from __future__ import annotations

import torch
from torch import nn

from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.probe import STAGE, Forward, Probe, gradient_sign_and_logits
from xaiserve.reliability.score import relevance_from_map
from xaiserve.reliability.search import SearchResult, search_first_flips
from xaiserve.runtime.forward.counted import Budget, TorchForward


def probe_of(
    forward: Forward,
    module: nn.Module | None,
    x: torch.Tensor,
    y: int,
    budget: Budget | None = None,
) -> Probe:
    """A probe of x (C x *spatial) and y; ``module`` None: one whose searches never need the
    gradient (search tests with a stand-in forward); ``budget`` None: an ample one."""
    budget = budget if budget is not None else Budget(10**9)
    module = module if module is not None else nn.Identity()
    return Probe.of(forward, module, x, y, budget)


def loss_gradient_sign(
    module: nn.Module, x: torch.Tensor, y: int, budget: Budget, stage: str = STAGE
) -> torch.Tensor:
    """sign(grad_x CE(f(x), y)), C x *spatial: one forward + backward, charged to ``budget``."""
    return gradient_sign_and_logits(module, x, y, budget, stage)[0]


def search_first_flip(probe: Probe, lattice: Lattice, direction: torch.Tensor) -> SearchResult:
    """``search_first_flips`` for one direction (C x *spatial)."""
    (result,) = search_first_flips(probe, lattice, direction.unsqueeze(0))
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


class Linear2:
    """f(x) = W x + b with 2 classes; the margin m(x) = logit_0 - logit_1 = u . x + c.

    Class 0 is predicted with margin ``margin``. sign(grad CE) = -sign(u), so along
    R_dir the margin falls at rate sum(R_norm * |u|): the first flip is at
    eps* = margin / sum(R_norm * |u|) (argmax keeps class 0 at a tie).
    """

    def __init__(self, u: torch.Tensor, x: torch.Tensor, margin: float) -> None:
        self.u, self.x, self.margin = u, x, margin
        n = u.numel()
        linear = nn.Linear(n, 2)
        with torch.no_grad():
            linear.weight.copy_(torch.stack([u.reshape(-1), torch.zeros(n)]))
            linear.bias.copy_(torch.tensor([margin - float((u * x).sum()), 0.0]))
        self.module = nn.Sequential(nn.Flatten(), linear).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def eps_star(self, relevance: torch.Tensor) -> float:
        full = relevance.expand_as(self.u)
        return self.margin / float((full / full.sum() * self.u.abs()).sum())

    def context(self, max_batch: int = 64) -> tuple[TorchForward, Budget]:
        budget = Budget(10**7)
        return TorchForward(self.module, budget, max_batch), budget


def linear_case(seed: int = 0, shape: tuple[int, ...] = (3, 4, 4)) -> Linear2:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    x = torch.rand(shape, generator=g)
    return Linear2(u, x, margin=1.0)


def saliency_map(module: nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    """|d logit_y / d x| summed over channels, scaled to [0, 1]: 1 x *spatial."""
    xb = x.unsqueeze(0).clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(module(xb)[0, y], xb)
    return relevance_from_map(grad[0].abs().sum(0, keepdim=True))


def predicted(forward, x: torch.Tensor) -> int:
    return int(forward(x.unsqueeze(0), "predict").argmax())


DENSE_STEP = 0.01
DENSE_SPAN = 1e-6


def dense_grid(eps_max: float, step: float = DENSE_STEP, span: float = DENSE_SPAN) -> list[float]:
    """The dense reference grid, ascending: eps_max * (1 - step)^k for k = 0, 1, ... while
    the value is >= eps_max * span (a ``step`` relative grid from eps_max * span to eps_max)."""
    values, k = [], 0
    while (value := eps_max * (1.0 - step) ** k) >= eps_max * span:
        values.append(value)
        k += 1
    return values[::-1]


def dense_first_flip(
    forward: Forward,
    x: torch.Tensor,
    direction: torch.Tensor,
    y: int,
    grid: list[float],
    *,
    clamp: bool = False,
    chunk: int = 128,
    stage: str = STAGE,
) -> float | None:
    """The smallest eps of ``grid`` (ascending) with argmax f(x + eps * direction) != y, or
    None when no eps of the grid flips: every grid value up to the first flip is evaluated
    (in ``chunk``-sized forward calls, stopping after the chunk that holds it).

    x, direction: C x *spatial. Independent of the batched search: its own grid and images.
    """
    for start in range(0, len(grid), chunk):
        eps = torch.tensor(grid[start : start + chunk], dtype=x.dtype)
        images = x.unsqueeze(0) + eps.view(-1, *([1] * x.dim())) * direction.unsqueeze(0)
        if clamp:
            images = images.clamp(0.0, 1.0)
        flipped = (forward(images, stage).argmax(dim=1) != y).tolist()
        if True in flipped:
            return grid[start + flipped.index(True)]
    return None
