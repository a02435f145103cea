"""Hooks a method sets act in its own thread only (issue 22, item 2)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from xaiserve.methods.backward_override import overridden_backward
from xaiserve.methods.hooks import captured


def test_a_capture_sees_its_own_thread_only():
    layer = nn.Linear(2, 2)
    other = threading.Event()

    def forward_elsewhere() -> None:
        layer(torch.ones(5, 2))
        other.set()

    with captured(layer) as calls:
        thread = threading.Thread(target=forward_elsewhere)
        thread.start()
        thread.join(10)
        assert other.is_set() and calls == []  # the other thread's forward is not seen
        layer(torch.ones(3, 2))
    assert [out.shape[0] for _, out in calls] == [3]


def test_an_overridden_backward_leaves_other_threads_alone():
    relu = nn.ReLU()
    x = torch.tensor([[-1.0, 2.0]], requires_grad=True)

    def grad_elsewhere(out: list[torch.Tensor]) -> None:
        xb = x.detach().requires_grad_(True)
        relu(xb).sum().backward()
        out.append(xb.grad)

    everywhere_one = {nn.ReLU: lambda _m, _z, _out, grad: torch.ones_like(grad)}
    with overridden_backward(relu, everywhere_one):
        elsewhere: list[torch.Tensor] = []
        thread = threading.Thread(target=grad_elsewhere, args=(elsewhere,))
        thread.start()
        thread.join(10)
        (here,) = torch.autograd.grad(relu(x).sum(), x)
    assert torch.equal(here, torch.tensor([[1.0, 1.0]]))  # the rule ran here
    assert torch.equal(elsewhere[0], torch.tensor([[0.0, 1.0]]))  # ReLU's own backward there
