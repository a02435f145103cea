"""One executor per model and device: the device work of every request in flight, packed
into shared calls.

Requests run at once, each in its own thread. Whatever a request asks of the model (a
forward-only batch, input gradients with a target per row, a pass that captures a layer)
it hands to the model's executor as a work item: a :class:`Pass` (what to run, and the key
of the passes it may share a call with) and its rows. Each of the executor's streams (its
threads: one on a GPU, one per usable core on a CPU) takes the oldest waiting item and
every other waiting item with the same key, up to the pass's row limit, runs them as one
call, and routes each item's rows of the result back to it. Rows are independent (the
model is in eval mode), so a row's result does not depend on what shares its call, up to
the summation order of a larger batch. Hooks a pass sets act in its stream only
(``methods.hooks``), so streams side by side on one module do not see each other's.

No request starves: a request hands over one item at a time (each at most the pass's row
limit) and waits for it, so its next item queues behind what other requests handed over
meanwhile: a large request's calls interleave with small ones, and a small request waits
for at most one call per request ahead of it (the chunk each has handed over).

Counts stay per request: the caller charges its budget before it hands an item over, and
each call adds 1/k to the ``device_calls`` of each of the k requests whose rows it ran.
A packed call that raises is run again item by item, so one request's bad rows fail that
request alone.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
_NO_ROWS = torch.empty(0, device="cpu")
Result = torch.Tensor | tuple[torch.Tensor, ...]
"""What a pass returns: one tensor, or a tuple of tensors, each with the rows first."""


@dataclass(frozen=True)
class Pass:
    """One kind of device work.

    key: passes with equal keys are interchangeable, so their items may share one call
        (the first item's ``run`` runs it): include every parameter ``run`` depends on.
    run: (rows R x ..., targets R or None) -> the result, R rows first; rows and
        targets arrive on the executor's device.
    max_rows: the most rows one call takes (the memory budget's batch of this work).
    packs: whether other items may share its calls; False for work whose numbers a
        different batch would move past the 1e-5 that packing may cost elsewhere (a
        batch of another size may sum in another order; LRP's epsilon rule divides by
        sums near zero and amplifies that).
    """

    key: Hashable
    run: Callable[[torch.Tensor, torch.Tensor | None], Result]
    max_rows: int
    packs: bool = True


class Share(Protocol):
    """What a request's share of device calls is added to (its ``Budget``)."""

    device_calls: float


@dataclass
class _Unshared:
    device_calls: float = 0.0


@dataclass
class _Item:
    work: Pass
    rows: torch.Tensor
    targets: torch.Tensor | None
    share: Share
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    error: BaseException | None = None


@dataclass
class Counts:
    """Device calls and rows an executor ran, by the first element of the pass key."""

    calls: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)


class Executor:
    """Runs passes for one model on ``device``. ``run`` is thread-safe; the calls run on
    the executor's own (daemon) threads, its streams, started on first use."""

    def __init__(
        self,
        name: str,
        device: torch.device | str | None = "cpu",
        streams: int = 1,
        threads: int = 0,
    ) -> None:
        """device: where rows are moved before a call (None: left where they are).
        streams: calls that may run at once, each taking the oldest waiting work: 1 on a
            GPU (one queue of kernels); on a CPU one per usable core, since the small
            operations of a small model's call leave most cores idle however many
            threads it may use, while calls side by side fill them.
        threads: the CPU threads of torch, shared by the calls running at a time: a call
            that runs alone gets them all (the latency of one request), k calls at once
            ``threads // k`` each (0: torch's own setting, untouched).
        """
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.name = name
        self.device = None if device is None else torch.device(device)
        self.streams = streams
        self.threads = threads
        self.counts = Counts()
        self._queue: deque[_Item] = deque()
        self._ready = threading.Condition()
        self._started = False
        self._busy = 0

    def run(
        self,
        work: Pass,
        rows: torch.Tensor,
        targets: torch.Tensor | None = None,
        share: Share | None = None,
    ) -> Result:
        """``work.run`` on these rows (at most ``work.max_rows``), possibly in one call with
        other requests' rows; blocks until done. Results are on the executor's device.
        share: the request's budget, whose ``device_calls`` gets its share of the call (the
        caller charges the forward passes before it calls)."""
        if rows.shape[0] > work.max_rows:
            raise ValueError(f"{rows.shape[0]} rows, more than the pass takes ({work.max_rows})")
        item = _Item(work, rows, targets, share or _Unshared())
        self._submit(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return cast(Result, item.result)

    def _submit(self, item: _Item) -> None:
        """Queues the item for the streams (started on first use)."""
        with self._ready:
            if not self._started:
                for k in range(self.streams):
                    name = f"xaiserve-executor-{self.name}-{k}"
                    threading.Thread(target=self._serve, name=name, daemon=True).start()
                self._started = True
            self._queue.append(item)
            self._ready.notify()

    def call(self, kind: str, fn: Callable[[], T], share: Share | None = None) -> T:
        """``fn()`` on one of the executor's streams, alone: device work that is not rows of
        a pass (an incremental occluder's stages, which hold one image's activations),
        queued with the passes, so it interleaves with other requests' calls, takes its
        share of the threads and counts as one device call of ``share``."""

        def run(_rows: torch.Tensor, _targets: torch.Tensor | None) -> Any:
            return fn()

        result = self.run(Pass((kind, "call"), run, 1, packs=False), _NO_ROWS, None, share)
        return cast(T, result)

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                items = self._take()
                self._busy += 1
                busy = self._busy
            if self.threads:
                torch.set_num_threads(max(1, self.threads // busy))  # this thread's calls
            try:
                self._call(items)
            finally:
                with self._ready:
                    self._busy -= 1

    def _take(self) -> list[_Item]:
        """The oldest item and the waiting items of its key that fit beside it, oldest
        first; removed from the queue. With idle streams beside this one, it takes its
        share only (the waiting rows of the key over the idle streams, this one counted),
        so the others get calls too: on a CPU, calls side by side on one thread each keep
        the cores busier than one packed call on all of them."""
        first = self._queue[0]
        same = [i for i in self._queue if i.work.key == first.work.key] if first.work.packs else []
        idle = max(1, self.streams - self._busy)
        share = -(-sum(i.rows.shape[0] for i in same) // idle)  # ceiling
        limit = min(first.work.max_rows, max(share, first.rows.shape[0]))
        taken, rows = [first], first.rows.shape[0]
        for item in same[1:]:
            n = item.rows.shape[0]
            if rows + n <= limit:
                taken.append(item)
                rows += n
        for item in taken:
            self._queue.remove(item)
        return taken

    def _call(self, items: list[_Item]) -> None:
        try:
            results = self._packed(items)
        except Exception as err:
            if len(items) == 1:
                items[0].error = err
                items[0].done.set()
                return
            log.warning(
                "model %s: a call of %d packed items failed (%s: %s); running them one by one",
                self.name,
                len(items),
                type(err).__name__,
                err,
            )
            for item in items:
                self._call([item])
            return
        for item, result in zip(items, results, strict=True):
            item.result = result
            item.done.set()

    def _packed(self, items: Sequence[_Item]) -> list[Result]:
        """Runs the items as one call; the result of each, split by rows."""
        work = items[0].work
        rows = torch.cat([self._moved(i.rows) for i in items])
        targets = None
        if items[0].targets is not None:
            targets = torch.cat([self._moved(_required(i.targets)) for i in items])
        out = work.run(rows, targets)
        sizes = [i.rows.shape[0] for i in items]
        self._count(work, items, sum(sizes))
        if len(items) == 1:
            return [out]
        if isinstance(out, torch.Tensor):
            return list(out.split(sizes))
        parts = [t.split(sizes) for t in out]
        return [tuple(p[k] for p in parts) for k in range(len(items))]

    def _count(self, work: Pass, items: Sequence[_Item], rows: int) -> None:
        kind = str(work.key[0] if isinstance(work.key, tuple) else work.key)
        with self._ready:
            self.counts.calls[kind] = self.counts.calls.get(kind, 0) + 1
            self.counts.rows[kind] = self.counts.rows.get(kind, 0) + rows
        shares = {id(i.share): i.share for i in items}
        for share in shares.values():
            share.device_calls += 1 / len(shares)

    def _moved(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device is None else t.to(self.device)


def single(result: Result) -> torch.Tensor:
    """The result of a pass that returns one tensor."""
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"expected one tensor, the pass returned {len(result)}")
    return result


def per_row(targets: torch.Tensor | None, what: str) -> torch.Tensor:
    """The targets of a pass that needs one per row (``what`` names the pass when there
    are none: the caller handed the rows over without them)."""
    if targets is None:
        raise ValueError(f"a {what} pass needs a target per row")
    return targets


def _required(targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        raise ValueError("items of one pass must all have targets or all have none")
    return targets


class InlineExecutor(Executor):
    """Runs each pass at once in the calling thread, packing nothing, rows where they
    are: for modules that run outside the executors (GAD's support models, offline
    tools, tests)."""

    def __init__(self, name: str = "inline", device: torch.device | str | None = None) -> None:
        super().__init__(name, device)

    def _submit(self, item: _Item) -> None:
        self._call([item])
