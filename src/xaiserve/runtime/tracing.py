"""torch.fx tracing that other threads can live with.

While ``torch.fx`` traces a module it replaces ``nn.Module.__call__`` and
``nn.Module.__getattr__`` for the whole process. The engine traces in the background (plans
for incremental occlusion, the graph checks of LRP, DeepLift and Guided Backprop) while
requests run other models on other threads: without care, their module calls would be
recorded into the graph being traced and get proxies back instead of tensors. Here the
tracer records only the calls of the thread that traces (others run their modules as
usual), and traces run one at a time (two at once would each restore the other's patch
when they finish).
"""

from __future__ import annotations

import threading
from typing import Any

from torch import fx, nn

_ONE_AT_A_TIME = threading.Lock()


class _OwnThreadTracer(fx.Tracer):
    """An ``fx.Tracer`` that lets other threads' module calls through untouched."""

    def __init__(self) -> None:
        super().__init__()
        self._owner = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)  # the module's own __call__
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def symbolic_trace(root: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(root)``, safe while other threads run modules."""
    with _ONE_AT_A_TIME:
        tracer = _OwnThreadTracer()
        graph = tracer.trace(root)
    return fx.GraphModule(tracer.root, graph, root.__class__.__name__)
