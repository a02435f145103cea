"""Where a transformer's attention probabilities are, and why a model has none to read.

The probabilities are read as the outputs of ``nn.Softmax`` modules that are N x heads x T x
T (square over the tokens); other softmax outputs (a classifier's N x K) are ignored.
``nn.MultiheadAttention`` computes its probabilities inside and returns them only when the
caller asks, so it does not count.
"""

from __future__ import annotations

import torch
from torch import nn


def attention_softmaxes(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``nn.Softmax`` module of ``net``, in module order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Softmax)]


def is_attention(out: torch.Tensor) -> bool:
    """Whether a softmax output is attention probabilities: N x heads x T x T."""
    return out.dim() == 4 and out.shape[-1] == out.shape[-2]


def no_attention_reason(net: nn.Module, method: str) -> str | None:
    """Why ``method``, which reads attention probabilities, cannot run on ``net``; None when
    ``net`` has ``nn.Softmax`` modules to read them from."""
    if attention_softmaxes(net):
        return None
    inside = [name for name, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)]
    where = (
        f"; its nn.MultiheadAttention ({inside[0]}) does not expose them per head" if inside else ""
    )
    return (
        f"{method} reads attention probabilities (N x heads x T x T) from nn.Softmax modules "
        f"and the network has none{where}"
    )


def attention_reason(net: nn.Module, method: str) -> str | None:
    """Why ``method``, which has no rules for self-attention, cannot run on ``net``; None
    when ``net`` has no attention module (``nn.Softmax`` or ``nn.MultiheadAttention``)."""
    found = [
        name
        for name, m in net.named_modules()
        if isinstance(m, (nn.Softmax, nn.MultiheadAttention))
    ]
    if not found:
        return None
    return (
        f"{method} has no rule set for self-attention ({found[0]}): relevance through the "
        "products of attention probabilities and values needs rules xaiserve does not "
        "implement"
    )
