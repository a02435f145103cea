"""Replacing the backward pass of chosen modules (guided backpropagation, deconvolution,
DeepLIFT's rescale rule).

Inside ``overridden_backward(model, rules)`` every module whose type has a rule computes
its forward as usual, but its output is re-attached to its input z through a function
whose backward is ``rule(module, z, out, grad_out) -> grad_z``. The module's own backward
is bypassed, in the calling thread only (``hooks.this_thread_only``: a forward of the
same module in another thread is untouched). In-place modules (``nn.ReLU(inplace=True)``)
work on a copy of z, so the rule sees the input they received. The hook sees each call
separately, so a module applied twice (one ReLU reused in a block) gets the right z both
times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xaiserve.methods.hooks import this_thread_only

BackwardRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(module, z: its input, out: its output, grad: d/d out) -> d/d z, all the same batch."""


class _Reattach(torch.autograd.Function):
    """Forward: a copy of ``out``. Backward: ``rule(module, z, out, grad)`` for z."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, out: torch.Tensor, module: nn.Module, rule: BackwardRule
    ):
        ctx.module, ctx.rule = module, rule
        ctx.save_for_backward(z, out)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        z, out = ctx.saved_tensors
        return ctx.rule(ctx.module, z, out, grad), None, None, None


@contextmanager
def overridden_backward(
    model: nn.Module, rules: Mapping[type[nn.Module], BackwardRule]
) -> Iterator[int]:
    """Hooks every module of ``model`` whose type is in ``rules``; yields how many."""
    handles = []
    pending: dict[int, list[torch.Tensor]] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        z = args[0]
        pending.setdefault(id(module), []).append(z)
        if getattr(module, "inplace", False):
            return (z.clone(), *args[1:])
        return None

    def make_hook(rule: BackwardRule) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            z = pending[id(module)].pop()
            return _Reattach.apply(z, out.detach(), module, rule)

        return hook

    try:
        for module in model.modules():
            rule = next((r for t, r in rules.items() if isinstance(module, t)), None)
            if rule is not None:
                handles.append(module.register_forward_pre_hook(this_thread_only(pre_hook)))
                handles.append(module.register_forward_hook(this_thread_only(make_hook(rule))))
        yield len(handles) // 2
    finally:
        for handle in handles:
            handle.remove()
