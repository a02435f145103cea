"""torch.fx tracing while other threads run modules (xaiserve/runtime/tracing.py)."""

from __future__ import annotations

import threading

import torch
from torch import fx, nn

from xaiserve.runtime.tracing import symbolic_trace


class Pausing(nn.Module):
    """Stops halfway through its forward (while it is traced) until told to go on."""

    def __init__(self, halfway: threading.Event, go_on: threading.Event) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 2)
        self.halfway, self.go_on = halfway, go_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        self.halfway.set()
        assert self.go_on.wait(30)
        return self.second(torch.relu(y))


def trace_while_another_thread_runs(trace) -> tuple[object, object, fx.GraphModule]:
    """(what the other thread's module returned, what it should, the traced graph)."""
    halfway, go_on = threading.Event(), threading.Event()
    traced = Pausing(halfway, go_on)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        expected = other(x)
    result: dict = {}
    tracer = threading.Thread(target=lambda: result.setdefault("gm", trace(traced)))
    tracer.start()
    assert halfway.wait(30)
    try:  # the module's __call__ is patched now, for the whole process
        with torch.no_grad():
            got = other(x)
    except Exception as err:  # what plain torch.fx makes of it
        got = err
    go_on.set()
    tracer.join(30)
    return got, expected, result.get("gm")


def test_other_threads_run_their_modules_untouched_while_one_traces():
    got, expected, gm = trace_while_another_thread_runs(symbolic_trace)
    assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["first", "second"]  # nothing of the other module recorded
    x = torch.rand(2, 4)
    with torch.no_grad():
        assert torch.equal(gm(x), gm.second(torch.relu(gm.first(x))))


def test_plain_torch_fx_would_record_the_other_threads_calls():
    """Why runtime/tracing.py exists: with fx.symbolic_trace the other thread's call is
    intercepted (it gets a proxy, or fails)."""
    got, _, _ = trace_while_another_thread_runs(fx.symbolic_trace)
    assert not isinstance(got, torch.Tensor)


def test_traces_run_one_at_a_time():
    original = nn.Module.__call__
    halfway, go_on = threading.Event(), threading.Event()
    first = threading.Thread(target=lambda: symbolic_trace(Pausing(halfway, go_on)))
    first.start()
    assert halfway.wait(30)
    done = threading.Event()
    second = threading.Thread(
        target=lambda: (symbolic_trace(nn.Sequential(nn.Linear(2, 2))), done.set())
    )
    second.start()
    assert not done.wait(0.5)  # waits for the first trace
    go_on.set()
    first.join(30)
    second.join(30)
    assert done.is_set()
    assert nn.Module.__call__ is original  # both patches undone


def test_the_same_graph_as_torch_fx():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert str(symbolic_trace(module).graph) == str(fx.symbolic_trace(module).graph)
