"""Layer hooks scoped to the call that sets them.

A hook registered on a module runs for every forward of that module, in any thread. The
executor runs one pass at a time on a model, but other threads may run the same module
meanwhile (an incremental-occlusion plan being built, GAD's support models shared by
requests), so every hook a method sets acts only in the thread that set it: elsewhere it
does nothing, and another call's forward neither sees it nor feeds it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, made to do nothing (return None: no change) outside the current thread."""
    owner = threading.get_ident()

    def scoped(*args: Any) -> Any:
        return hook(*args) if threading.get_ident() == owner else None

    return scoped


@contextmanager
def captured(*layers: nn.Module) -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """Within the block, (layer, output) of every call of ``layers`` in this thread's
    forwards, in call order (a layer applied twice appears twice)."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    record = this_thread_only(lambda m, _i, out: calls.append((m, out)))
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
