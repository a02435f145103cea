"""The executor: packing by key and row limit, routing rows back, call shares, fairness,
a failing item alone failing (issue 22, item 3)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from xaiserve.runtime.execution.executor import Executor, InlineExecutor, Pass, single
from xaiserve.runtime.forward.counted import Budget


class Blocked:
    """An executor whose thread is held in a first call until ``release``, so the items
    handed over meanwhile wait in its queue together."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.gate = threading.Event()
        self.entered = threading.Event()

        def hold(rows: torch.Tensor, _t: torch.Tensor | None) -> torch.Tensor:
            self.entered.set()
            self.gate.wait(10)
            return rows

        self.thread = threading.Thread(
            target=executor.run, args=(Pass("hold", hold, 1), torch.zeros(1, 1))
        )
        self.thread.start()
        assert self.entered.wait(10)

    def release(self) -> None:
        self.gate.set()
        self.thread.join(10)


def submit(executor: Executor, work: Pass, rows: torch.Tensor, budget: Budget, out: dict, key):
    def go() -> None:
        try:
            out[key] = executor.run(work, rows, rows[:, 0].long(), budget)
        except Exception as err:  # the test checks which items failed
            out[key] = err

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def wait_queued(executor: Executor, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(executor._queue) < n and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(executor._queue) == n


def test_items_of_one_key_share_a_call_and_get_their_own_rows_back():
    executor = Executor("m")
    calls: list[int] = []

    def double(rows: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        calls.append(rows.shape[0])
        assert targets is not None
        return rows * 2 + targets[:, None]

    blocked = Blocked(executor)
    budgets = [Budget(0) for _ in range(3)]
    out: dict = {}
    work = Pass("double", double, 8)
    inputs = [torch.full((n, 2), float(i)) for i, n in enumerate((1, 3, 2))]
    pairs = enumerate(zip(inputs, budgets, strict=True))
    threads = [submit(executor, work, x, b, out, i) for i, (x, b) in pairs]
    wait_queued(executor, 3)
    blocked.release()
    for t in threads:
        t.join(10)
    assert calls == [6]  # one call of 1 + 3 + 2 rows
    for i, x in enumerate(inputs):
        assert torch.equal(out[i], x * 2 + x[:, 0:1])
    assert [b.device_calls for b in budgets] == [pytest.approx(1 / 3)] * 3
    assert executor.counts.calls["double"] == 1 and executor.counts.rows["double"] == 6


def test_other_keys_and_full_calls_are_not_packed():
    executor = Executor("m")
    calls: list[tuple[str, int]] = []

    def named(name: str) -> Pass:
        def run(rows: torch.Tensor, _t: torch.Tensor | None) -> torch.Tensor:
            calls.append((name, rows.shape[0]))
            return rows

        return Pass(name, run, 4)

    blocked = Blocked(executor)
    out: dict = {}
    works = [named("a"), named("b"), named("a"), named("a")]
    sizes = [3, 1, 1, 2]
    threads = []
    for i, (w, n) in enumerate(zip(works, sizes, strict=True)):
        threads.append(submit(executor, w, torch.ones(n, 1), Budget(0), out, i))
        wait_queued(executor, i + 1)
    blocked.release()
    for t in threads:
        t.join(10)
    # "a": 3 + 1 fit in 4; the 2 rows wait for the next call; "b" runs in between
    assert calls == [("a", 4), ("b", 1), ("a", 2)]


def test_a_large_request_interleaves_with_a_small_one():
    """The large request hands over one chunk at a time; the small request's item,
    queued meanwhile, runs after at most the chunk ahead of it."""
    executor = Executor("m")
    order: list[str] = []

    def run_as(name: str):
        def run(rows: torch.Tensor, _t: torch.Tensor | None) -> torch.Tensor:
            order.append(name)
            time.sleep(0.002)
            return rows

        return run

    large, small = Pass("large", run_as("large"), 4), Pass("small", run_as("small"), 4)
    blocked = Blocked(executor)
    done = threading.Event()

    def large_request() -> None:
        for _ in range(10):
            executor.run(large, torch.ones(4, 1))
        done.set()

    thread = threading.Thread(target=large_request)
    thread.start()
    wait_queued(executor, 1)
    small_thread = threading.Thread(target=executor.run, args=(small, torch.ones(1, 1)))
    small_thread.start()
    wait_queued(executor, 2)
    blocked.release()
    thread.join(10)
    small_thread.join(10)
    assert order.index("small") == 1  # after the large request's first chunk, not its last
    assert order.count("large") == 10


def test_a_failing_item_fails_alone():
    executor = Executor("m")

    def no_nan(rows: torch.Tensor, _t: torch.Tensor | None) -> torch.Tensor:
        if torch.isnan(rows).any():
            raise ValueError("a NaN row")
        return rows + 1

    blocked = Blocked(executor)
    out: dict = {}
    work = Pass("k", no_nan, 8)
    inputs = [torch.zeros(2, 1), torch.full((1, 1), float("nan")), torch.ones(2, 1)]
    threads = []
    for i, x in enumerate(inputs):
        threads.append(submit(executor, work, x, Budget(0), out, i))
    wait_queued(executor, 3)
    blocked.release()
    for t in threads:
        t.join(10)
    assert isinstance(out[1], ValueError)
    assert torch.equal(out[0], inputs[0] + 1) and torch.equal(out[2], inputs[2] + 1)


def test_passes_that_do_not_pack_run_alone():
    executor = Executor("m")
    calls: list[int] = []

    def run(rows: torch.Tensor, _t: torch.Tensor | None) -> torch.Tensor:
        calls.append(rows.shape[0])
        return rows

    blocked = Blocked(executor)
    out: dict = {}
    work = Pass("lrp", run, 8, packs=False)
    threads = [submit(executor, work, torch.ones(2, 1), Budget(0), out, i) for i in range(3)]
    wait_queued(executor, 3)
    blocked.release()
    for t in threads:
        t.join(10)
    assert calls == [2, 2, 2]


def test_tuple_results_are_split_by_rows_and_too_many_rows_refused():
    executor = Executor("m")
    work = Pass("t", lambda rows, _t: (rows, rows.sum(1)), 3)
    acts, sums = executor.run(work, torch.ones(2, 4))
    assert acts.shape == (2, 4) and torch.equal(sums, torch.full((2,), 4.0))
    with pytest.raises(ValueError, match="more than the pass takes"):
        executor.run(work, torch.ones(4, 4))


def test_inline_executor_runs_in_the_calling_thread():
    seen: list[int] = []
    work = Pass("i", lambda rows, _t: seen.append(threading.get_ident()) or rows, 4)
    budget = Budget(0)
    assert torch.equal(
        single(InlineExecutor().run(work, torch.ones(2, 1), None, budget)), torch.ones(2, 1)
    )
    assert seen == [threading.get_ident()] and budget.device_calls == 1


def test_streams_run_calls_side_by_side_with_the_threads_shared():
    executor = Executor("m", streams=2, threads=2)
    blocked = Blocked(executor)  # one stream held, alone when it started: 2 threads
    seen: list[int] = []

    def record(rows: torch.Tensor, _t: torch.Tensor | None) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return rows

    # runs on the other stream while the first is held; two calls at once: 1 thread each
    result = executor.run(Pass("other", record, 4), torch.ones(1, 1))
    blocked.release()
    assert torch.equal(single(result), torch.ones(1, 1))
    assert seen == [1]


def test_a_call_runs_alone_on_a_stream_and_counts_as_one_device_call():
    executor = Executor("m")
    budget = Budget(0)
    where: list[int] = []

    def stages() -> dict[str, int]:
        where.append(threading.get_ident())
        return {"logits": 7}

    assert executor.call("incremental", stages, budget) == {"logits": 7}
    assert where and where[0] != threading.get_ident()  # on the executor's stream
    assert budget.device_calls == 1 and executor.counts.calls == {"incremental": 1}


def test_a_stream_takes_its_share_when_others_are_idle():
    """8 waiting rows of one key, two idle streams: the first call takes 4, the rest is
    left for the other stream; with the other stream busy it takes all 8."""
    from xaiserve.runtime.execution.executor import _Item

    executor = Executor("m", streams=2)
    work = Pass("k", lambda rows, _t: rows, 16)
    items = [_Item(work, torch.ones(1, 1), None, Budget(0)) for _ in range(8)]
    executor._queue.extend(items)
    assert executor._take() == items[:4] and list(executor._queue) == items[4:]
    executor._queue.clear()
    executor._queue.extend(items)
    executor._busy = 1
    assert executor._take() == items and not executor._queue
