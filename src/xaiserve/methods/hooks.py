"""Layer hooks scoped to the call that sets them.

A hook registered on a module runs for every forward of that module, in any thread. The
executor runs one pass at a time on a model, but other threads may run the same module
meanwhile (an incremental-occlusion plan being built, GAD's support models shared by
requests), so every hook a method sets acts only in the thread that set it: elsewhere it
does nothing, and another call's forward neither sees it nor feeds it.

A transformer block's output is tokens (N x T x D), not a feature map. Given the input's
spatial size, ``captured`` records such an output as the patch grid N x D x h x w (the
class token dropped) and hands the network the tokens rebuilt from that grid, so
gradients taken at the recorded grid are the tokens' gradients, reshaped: the CAM family
sees a feature map, whatever produced it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xaiserve.api.errors import FailedPrecondition


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, made to do nothing (return None: no change) outside the current thread."""
    owner = threading.get_ident()

    def scoped(*args: Any) -> Any:
        return hook(*args) if threading.get_ident() == owner else None

    return scoped


PREFIX_TOKENS = (1, 0, 2)
"""Tokens before the patches tried, in order: a class token (ViT), none (pooled
transformers), a class and a distillation token (DeiT)."""


def token_grid(tokens: int, spatial: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(prefix tokens, h, w) such that ``tokens`` = prefix + h * w patch tokens of an input
    H x W cut into square patches of some side p (h = H // p, w = W // p); None when no
    such split exists. The first prefix of ``PREFIX_TOKENS`` that fits wins."""
    if len(spatial) != 2:
        return None
    height, width = spatial
    for prefix in PREFIX_TOKENS:
        patches = tokens - prefix
        for side in range(1, max(height, width) + 1):
            h, w = height // side, width // side
            if h * w == patches and patches > 0:
                return prefix, h, w
    return None


def tokens_as_grid(out: torch.Tensor, spatial: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """N x T x D tokens -> (the patch tokens as a map N x D x h x w, the prefix length).

    Raises:
        FailedPrecondition: T tokens are no prefix and patch grid of the input.
    """
    grid = token_grid(out.shape[1], spatial)
    if grid is None:
        raise FailedPrecondition(
            None,
            f"the layer outputs {out.shape[1]} tokens, which are not a class token and a "
            f"patch grid of the {' x '.join(map(str, spatial))} input",
        )
    prefix, h, w = grid
    patches = out[:, prefix:].transpose(1, 2)
    return patches.reshape(out.shape[0], out.shape[2], h, w), prefix


@contextmanager
def captured(
    *layers: nn.Module, spatial: tuple[int, ...] | None = None
) -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """Within the block, (layer, output) of every call of ``layers`` in this thread's
    forwards, in call order (a layer applied twice appears twice).

    With ``spatial`` (the input's H x W), a token output N x T x D is recorded as its patch
    grid N x D x h x w (``tokens_as_grid``), and the network continues from the tokens
    rebuilt from the recorded grid (same values), so autograd reaches the recorded tensor.
    """
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def keep(module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor | None:
        if spatial is None or len(spatial) != 2 or out.dim() != 3:
            calls.append((module, out))
            return None
        grid, prefix = tokens_as_grid(out, spatial)
        calls.append((module, grid))
        return torch.cat([out[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)

    record = this_thread_only(keep)
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
