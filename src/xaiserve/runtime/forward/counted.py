"""Forward passes: batching, counting, and the per-request budget.

Every image the model evaluates is counted (the machine-independent cost figure). The
``Budget`` also carries the caller's deadline, checked between batches, so a long method
stops with DEADLINE_EXCEEDED instead of running past it.

Forward-only work (occlusion, APEM searches, filtering, Score-CAM, RISE, LIME/KernelSHAP)
calls one interface, :class:`CountedForward`: ``forward(x, stage) -> logits``, batched and
counted the same way whatever runs the batches. Two implementations: :class:`TorchForward`
(torch eager, no grad) and ``OnnxForward`` (an ONNX Runtime session, in
:mod:`.backends`, which also chooses between them per model and request). The batch size
comes from a memory budget and a count cap (:func:`memory_batch_size`): bytes per image x
batch <= budget and batch <= ``ForwardConfig.max_batch``; methods build at most that many
images at once, and gradient batches take no more than it either. Each backend call takes
at most ``call_batch`` of them: the batch size with the best measured throughput
(:func:`fastest_batch`, at load), often smaller than what memory allows, since a large
batch's activations no longer stay in the CPU's caches (figures: docs/performance.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from xaiserve.api.errors import DeadlineExceeded, ResourceExhausted
from xaiserve.runtime.device import module_device
from xaiserve.runtime.execution.executor import Executor, Pass, single

PROBE_SECONDS = 1.0
"""Time ``fastest_batch`` spends per backend, roughly: past it, no smaller batch is tried."""
PROBE_CALLS = 3
"""Timed calls per batch size in ``fastest_batch`` (the fastest counts), after a warm-up."""

OccluderSource = Callable[[str, int, Sequence[Sequence[int]]], Any]
"""(backend, window, starts) -> an incremental occluder or None; see
``CountedForward.occluder``."""
T = TypeVar("T")


@dataclass
class Budget:
    """Forward passes spent and allowed for one request, and its deadline.

    deadline: ``time.monotonic()`` seconds, or None for no deadline.
    """

    max_forward_passes: int
    deadline: float | None = None
    spent: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)
    device_calls: float = 0.0
    """The request's share of the device calls that ran its work: each call counts 1/k
    for each of the k requests whose rows it ran (:mod:`..execution.executor`)."""

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


class CountedForward:
    """Batched, counted, gradient-free forward passes of a pixel-space model.

    ``__call__(x, stage)``: x is N x C x *spatial (any N), float32 in pixel space, on any
    device; returns logits N x K (float32) on x's device, wherever the backend ran them.
    ``batch_size``: the images a caller should build at once (the memory budget's batch);
    each backend call takes at most ``call_batch`` of them (default ``batch_size``); each
    image is charged to ``budget`` under ``stage`` before its call runs. ``seconds`` adds
    up the wall time spent inside calls (batching included); ``label`` names what ran them
    in timings (the backend, or ``torch_fallback``). Subclasses implement ``_logits``.
    """

    backend: ClassVar[str] = ""

    def __init__(self, budget: Budget, batch_size: int, call_batch: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if call_batch is not None and call_batch < 1:
            raise ValueError(f"call_batch must be >= 1, got {call_batch}")
        self.budget = budget
        self.batch_size = batch_size
        self.call_batch = batch_size if call_batch is None else min(call_batch, batch_size)
        self.seconds = 0.0
        self.label = self.backend
        self.occluders: OccluderSource | None = None
        self.executor: Executor | None = None

    def occluder(self, window: int, starts: Sequence[Sequence[int]]) -> Any | None:
        """The incremental occluder (:class:`~.incremental.run.IncrementalOcclusion`) of
        this forward's model and backend for windows of side ``window`` at every
        combination of ``starts`` (per spatial axis), or None: occluded images then run
        full forward passes."""
        return None if self.occluders is None else self.occluders(self.backend, window, starts)

    def timed(self, images: int, stage: str, run: Callable[[], T]) -> T:
        """``run()``'s result, its time added to ``seconds`` and ``images`` forward passes
        charged to the budget first (work that does not go through ``__call__``: an
        incremental occluder's stages); with an executor, on one of its streams, alone."""
        start = time.perf_counter()
        try:
            self.budget.charge(images, stage)
            if self.executor is None:
                return run()
            return self.executor.call("incremental", run, self.budget)
        finally:
            self.seconds += time.perf_counter() - start

    def __call__(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        start = time.perf_counter()
        try:
            outputs = []
            work = Pass(("forward", self.backend), self._packed_logits, self.call_batch)
            for part in batches(x.shape[0], self.call_batch):
                self.budget.charge(part.stop - part.start, stage)
                if self.executor is None:
                    outputs.append(self._logits(x[part]))
                else:
                    outputs.append(single(self.executor.run(work, x[part], None, self.budget)))
            return torch.cat(outputs)
        finally:
            self.seconds += time.perf_counter() - start

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one batch (B x C x *spatial -> B x K), no gradients."""
        raise NotImplementedError

    def _packed_logits(self, x: torch.Tensor, _targets: torch.Tensor | None) -> torch.Tensor:
        return self._logits(x)


class TorchForward(CountedForward):
    """``CountedForward`` on torch eager: ``module(x)`` under ``torch.no_grad()``, on the
    module's device (x is moved there, the logits back to x's device)."""

    backend = "torch"

    def __init__(
        self, module: nn.Module, budget: Budget, batch_size: int, call_batch: int | None = None
    ) -> None:
        super().__init__(budget, batch_size, call_batch)
        self.module = module
        self.device = module_device(module)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x.to(self.device)).to(x.device)


# ----------------------------------------------------------------------- memory budget


class _NewStorageBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor storage an operator creates (views and in-place
    results, whose storage is one of the operator's inputs, add nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.total += storage.nbytes()
        return out


def _tensors(tree: object) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def image_bytes(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes one image occupies in a forward pass: the float32 input plus every tensor an
    operator creates during the pass (module outputs, and the functional operations between
    them: normalization, residual additions, poolings' indices), each counted once, as if
    all were alive at the same time: an upper bound for torch eager and ONNX Runtime
    forward passes, which free or reuse activations as they go, and about what a gradient
    pass keeps for its backward pass. Measured with one forward of a 1 x ``input_shape``
    zero image (no gradients, on the module's device) under a dispatch mode that sees
    every ATen operator.
    """
    x = torch.zeros(1, *input_shape, device=module_device(module))
    counter = _NewStorageBytes()
    with torch.no_grad(), counter:
        module(x)
    return x.numel() * x.element_size() + counter.total


def memory_batch_size(bytes_per_image: int, memory_budget: int, cap: int | None = None) -> int:
    """The largest batch with bytes_per_image x batch <= memory_budget (at least 1, at most
    ``cap`` when given)."""
    size = max(1, memory_budget // max(1, bytes_per_image))
    return size if cap is None else max(1, min(size, cap))


def fastest_batch(
    run: Callable[[torch.Tensor], object],
    input_shape: Sequence[int],
    limit: int,
    seconds: float = PROBE_SECONDS,
) -> tuple[int, dict[int, float]]:
    """(images per call, images/s of every batch size tried) of ``run``, one backend call
    on B x ``input_shape`` images: the size with the best images/s. Tries ``limit``, then
    the powers of two below it, largest first, until ``seconds`` have passed; each size is
    the fastest of PROBE_CALLS calls after a warm-up call, on random images in [0, 1].
    Largest first, so that a slow model, whose first size alone takes the time, keeps the
    memory budget's batch: a probe from the smallest size runs out of time on a few tiny
    batches of such a model and picks one of them (docs/performance.md). ``limit`` is the
    model's batch (memory budget and count cap), so the largest call the probe makes, which
    is the most it holds at once, stays within the budget.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    sizes = sorted({min(limit, 2**k) for k in range(limit.bit_length() + 1)}, reverse=True)
    generator = torch.Generator().manual_seed(0)
    rates: dict[int, float] = {}
    start = time.perf_counter()
    for size in sizes:
        x = torch.rand(size, *input_shape, generator=generator)
        run(x)  # warm-up: first-call allocations
        fastest = math.inf
        for _ in range(PROBE_CALLS):
            begin = time.perf_counter()
            run(x)
            fastest = min(fastest, time.perf_counter() - begin)
        rates[size] = size / max(fastest, 1e-9)
        if time.perf_counter() - start > seconds:
            break
    return max(rates, key=rates.__getitem__), rates
