"""APEM and filter options, resolved once (in the engine's plan) into typed objects, and
the most forward passes they allow.

``resolve_options`` and ``resolve_filter_options`` fill defaults and validate a request's
``reliability`` and ``filter``; errors name the request field. Everything below them takes
the resolved ``ApemOptions`` and ``FilterOptions``. The bounds count images in the budget's
unit (one per image evaluated) from the same constants the searches use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import FilterRequest, ReliabilityRequest
from xaiserve.reliability.lattice import Lattice

DEFAULT_RESOLUTION = 0.01
DEFAULT_SHUFFLES = 0
MAX_SHUFFLES = 64
MAX_RESOLUTION = 0.5
MODES = ("fast", "exact")
DEFAULT_FORWARD_BUDGET = 4096
"""Images the fast filter may evaluate, its gradient and original APEM included. A cap, not
a cost (``docs/apem.md`` has the measurements that set it)."""


@dataclass(frozen=True)
class ApemOptions:
    """Resolved APEM options.

    eps_max: the largest eps searched (L1 size in pixel units); default the number of
        elements of x, i.e. a mean absolute change of 1.0 per value.
    resolution: the relative spacing (hi - lo) / hi of the eps grid the searches report on.
    shuffles: shuffled maps tried for APEM_norm (0: no APEM_norm).
    clamp: clamp perturbed images to [0, 1] (the seed does not).
    """

    eps_max: float
    resolution: float = DEFAULT_RESOLUTION
    shuffles: int = DEFAULT_SHUFFLES
    clamp: bool = False

    @property
    def lattice(self) -> Lattice:
        """The eps values the searches report on (``eps_max`` and ``resolution``)."""
        return Lattice(self.eps_max, self.resolution)


@dataclass(frozen=True)
class FilterOptions:
    """Resolved filter options; ``forward_budget`` None: no cap of the filter's own."""

    mode: str
    forward_budget: int | None


def default_options(numel: int) -> ApemOptions:
    """The options of an empty ``reliability``: eps_max = numel (elements of one image)."""
    return ApemOptions(float(numel))


def resolve_options(
    options: ReliabilityRequest | None, numel: int, field: str = "methods[0]"
) -> ApemOptions:
    """Fills defaults and validates; errors name ``<field>.reliability.<option>``.

    numel: elements of one image (C * H * W), the default eps_max.
    """
    options = options or ReliabilityRequest()
    prefix = f"{field}.reliability"
    eps_max = (
        float(numel) if options.eps_max is None else _finite(options.eps_max, f"{prefix}.eps_max")
    )
    if eps_max <= 0:
        raise InvalidArgument(f"{prefix}.eps_max", f"must be > 0, got {eps_max:g}")
    resolution = (
        DEFAULT_RESOLUTION
        if options.resolution is None
        else _finite(options.resolution, f"{prefix}.resolution")
    )
    if not 0 < resolution <= MAX_RESOLUTION:
        raise InvalidArgument(
            f"{prefix}.resolution", f"must be in (0, {MAX_RESOLUTION:g}], got {resolution:g}"
        )
    shuffles = DEFAULT_SHUFFLES if options.shuffles is None else options.shuffles
    if isinstance(shuffles, bool) or not _finite(shuffles, f"{prefix}.shuffles").is_integer():
        raise InvalidArgument(f"{prefix}.shuffles", f"must be an integer, got {shuffles!r}")
    if not 0 <= shuffles <= MAX_SHUFFLES:
        raise InvalidArgument(
            f"{prefix}.shuffles", f"must be between 0 and {MAX_SHUFFLES}, got {shuffles}"
        )
    return ApemOptions(eps_max, resolution, int(shuffles), bool(options.clamp))


def _finite(value: float, field: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value!r}")
    return value


def default_filter_options(mode: str = "fast") -> FilterOptions:
    """The options of a ``filter`` with only its mode: fast capped at
    ``DEFAULT_FORWARD_BUDGET``, exact uncapped."""
    return FilterOptions(mode, DEFAULT_FORWARD_BUDGET if mode == "fast" else None)


def resolve_filter_options(
    request: FilterRequest | None,
    options: ApemOptions,
    *,
    field: str = "methods[0]",
) -> FilterOptions:
    """Validates the mode and the budget; errors name ``<field>.filter.<option>``.

    fast: forward_budget defaults to ``DEFAULT_FORWARD_BUDGET``; exact: no cap unless given
    (the request's own forward-pass limit still applies).
    """
    request = request or FilterRequest()
    if request.mode not in MODES:
        raise InvalidArgument(
            f"{field}.filter.mode", f"unknown mode {request.mode!r}; use one of {MODES}"
        )
    given = request.forward_budget
    if given is None:
        return default_filter_options(request.mode)
    name = f"{field}.filter.forward_budget"
    if isinstance(given, bool) or not isinstance(given, int):
        raise InvalidArgument(name, f"must be an integer, got {given!r}")
    least = minimum_budget(options)
    if given < least:
        raise InvalidArgument(
            name,
            f"must be at least {least} forward passes (the gradient, the original's APEM and "
            f"one candidate's at resolution {options.resolution:g}), got {given}",
        )
    return FilterOptions(request.mode, given)


# ------------------------------------------------------------------------------ bounds


def search_cost_bound(resolution: float) -> int:
    """The most images one direction's ``search_first_flips`` evaluates: its first round
    and a full second round (``Lattice.search_bound``; eps_max does not change it)."""
    return Lattice(1.0, resolution).search_bound()


def map_cost_bound(options: ApemOptions) -> int:
    """The most images one map's APEM evaluates: its eps_minus and eps_plus searches."""
    return 2 * search_cost_bound(options.resolution)


def record_cost_bound(options: ApemOptions) -> int:
    """The most images ``apem_many`` evaluates for one map's record, the gradient left out
    (one per request, shared by its maps): the original's searches and, where no earlier
    shuffle flipped both ways, every shuffle's."""
    return (1 + options.shuffles) * map_cost_bound(options)


def minimum_budget(options: ApemOptions) -> int:
    """The gradient, the original's APEM and one candidate's, at their worst."""
    return 1 + 2 * map_cost_bound(options)


def filter_cost_bound(
    filter_options: FilterOptions,
    options: ApemOptions,
    entries: int,
) -> int:
    """The most images ``filter_map`` evaluates for a map of ``entries`` values, its
    gradient and the original's APEM included (when they are shared with the map's APEM
    record, the filter spends less).

    Either mode scores each step of the path at most once: the original and the distinct
    positive values but the last, at most ``entries`` APEMs in all. The gradient and the
    original's APEM (``1 + map_cost_bound``) run before the filter looks at its
    ``forward_budget``; after them neither mode passes the budget (fast stops, exact
    refuses), so a budget caps the rest.
    """
    cost = map_cost_bound(options)
    path = 1 + max(1, entries) * cost
    cap = filter_options.forward_budget
    return path if cap is None else min(path, max(cap, 1 + cost))
