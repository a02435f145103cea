"""APEM and filter options: defaults, and invalid options named by their field."""

from __future__ import annotations

import pytest

from support.tiny_models import make_context
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import FilterRequest, ReliabilityRequest
from xaiserve.reliability import options as O
from xaiserve.reliability.options import ApemOptions, resolve_options


@pytest.mark.parametrize(
    "options, name, message",
    [
        (ReliabilityRequest(eps_max=0.0), "eps_max", "must be > 0"),
        (ReliabilityRequest(eps_max=-3.0), "eps_max", "must be > 0"),
        (ReliabilityRequest(eps_max=float("nan")), "eps_max", "finite"),
        (ReliabilityRequest(resolution=0.0), "resolution", "(0, 0.5]"),
        (ReliabilityRequest(resolution=0.75), "resolution", "(0, 0.5]"),
        (ReliabilityRequest(shuffles=-1), "shuffles", "between 0 and 64"),
        (ReliabilityRequest(shuffles=65), "shuffles", "between 0 and 64"),
        (ReliabilityRequest(shuffles=1.5), "shuffles", "integer"),
    ],
)
def test_invalid_options_name_the_field(served, images, options, name, message):
    ctx = make_context(served)
    with pytest.raises(InvalidArgument) as err:
        resolve_options(options, images[0].numel(), field="methods[2]")
    assert err.value.field == f"methods[2].reliability.{name}"
    assert message in err.value.message
    assert ctx.budget.spent == 0


def test_defaults():
    resolved = resolve_options(None, 3 * 16 * 16)
    assert resolved == ApemOptions(eps_max=768.0, resolution=0.01, shuffles=0, clamp=False)


def test_budget_too_small_names_the_field(served, images):
    ctx = make_context(served)
    options = O.resolve_options(None, 768)
    least = O.minimum_budget(options)
    with pytest.raises(InvalidArgument) as err:
        O.resolve_filter_options(
            FilterRequest(forward_budget=least - 1), options, field="methods[1]"
        )
    assert err.value.field == "methods[1].filter.forward_budget"
    assert f"at least {least}" in err.value.message
    assert ctx.budget.spent == 0


@pytest.mark.parametrize(
    "request_, field, message",
    [
        (FilterRequest(mode="quick"), "filter.mode", "unknown mode"),
        (FilterRequest(forward_budget=2.5), "filter.forward_budget", "integer"),
    ],
)
def test_invalid_filter_options_name_the_field(served, images, request_, field, message):
    options = O.resolve_options(None, images[0].numel())
    with pytest.raises(InvalidArgument) as err:
        O.resolve_filter_options(request_, options, field="methods[0]")
    assert err.value.field == f"methods[0].{field}" and message in err.value.message


def test_reliability_options_are_checked_too(served, images):
    with pytest.raises(InvalidArgument) as err:
        O.resolve_options(ReliabilityRequest(resolution=0.9), images[0].numel(), "methods[4]")
    assert err.value.field == "methods[4].reliability.resolution"


def test_filter_defaults():
    options = O.resolve_options(None, 768)
    assert O.resolve_filter_options(None, options) == O.FilterOptions("fast", 4096)
    assert O.resolve_filter_options(FilterRequest(mode="exact"), options).forward_budget is None
