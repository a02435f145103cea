"""The probe's loss gradient sign (seed 004, chapter 3): the closed form, charged to the budget."""

from __future__ import annotations

import torch

from support.apem_reference import linear_case, loss_gradient_sign


def test_loss_gradient_sign_matches_closed_form_and_is_charged():
    case = linear_case()
    _, budget = case.context()
    sign = loss_gradient_sign(case.module, case.x, 0, budget)
    assert torch.equal(sign, -case.u.sign())
    assert budget.spent == 1 and budget.by_stage == {"apem": 1}
