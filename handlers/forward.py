"""Forward passes: batching, counting, and the per-request budget.

Every image the model evaluates is counted (the machine-independent cost figure). The
``Budget`` also carries the caller's deadline, checked between batches, so a long method
stops with DEADLINE_EXCEEDED instead of running past it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DeadlineExceeded, ResourceExhausted


@dataclass
class Budget:
    """Forward passes spent and allowed for one request, and its deadline.

    deadline: ``time.monotonic()`` seconds, or None for no deadline.
    """

    max_forward_passes: int
    deadline: float | None = None
    spent: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)

    def charge(self, images: int, stage: str) -> None:
        """Records ``images`` forward passes; raises when over the budget or the deadline."""
        self.check_deadline()
        if self.spent + images > self.max_forward_passes:
            raise ResourceExhausted(
                "methods",
                f"the request needs more than the {self.max_forward_passes} forward passes "
                "allowed per call; ask for fewer methods, steps or samples",
            )
        self.spent += images
        self.by_stage[stage] = self.by_stage.get(stage, 0) + images

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(None, "the deadline passed before the explanation finished")


def batches(total: int, size: int) -> Iterator[slice]:
    """Slices of at most ``size`` covering range(total)."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class TorchForward:
    """Batched, counted, gradient-free forward passes of a pixel-space model.

    ``__call__(x)``: x is N x C x H x W (any N); returns logits N x K. Batches of at most
    ``max_batch`` images; each image is charged to ``budget`` under ``stage``.
    """

    def __init__(self, module: nn.Module, budget: Budget, max_batch: int) -> None:
        self.module = module
        self.budget = budget
        self.max_batch = max_batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        outputs = []
        for part in batches(x.shape[0], self.max_batch):
            self.budget.charge(part.stop - part.start, stage)
            outputs.append(self.module(x[part]))
        return torch.cat(outputs)
