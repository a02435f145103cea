"""APEM, the Adversarial Perturbation Explanation Metric (seed 004, chapter 3 and section 5.2).

For a pixel-space model f, one image x in [0, 1] (C x *spatial, before the model's
normalization), the explained class y and a relevance map R in [0, 1] broadcast to x's shape:

    R_norm = R / ||R||_1                       (L1 over the broadcast, full-shape map)
    R_dir  = R_norm * sign(grad_x CE(f(x), y))  (the "Directed Relevance", section 3.1)
    x'(eps) = x + eps * R_dir                   (optionally clamped to [0, 1])
    eps_minus = min { eps : argmax f(x'(eps)) != y }
    eps_plus  = the same for the irrelevance R^- = 1 - R
    APEM = eps_plus - eps_minus                 (higher = a more reliable map)

Since ||R_dir||_1 = 1 (less where the gradient is exactly 0), eps is the L1 size of the
perturbation. A search that sees no flip up to eps_max reports eps_max and is *censored*.

APEM_norm (section 5.2): the first of n shuffled copies of R (values permuted over positions,
seeded) whose two searches both flip gives eps_minus_shuffle and eps_plus_shuffle, and
``APEM_norm = eps_plus / eps_plus_shuffle - eps_minus / eps_minus_shuffle``; random maps
score near 0.

The seed scans eps = 1, 2, 3, ... with one forward pass per step (``reference_search``).
``search_first_flips`` evaluates many eps values per forward call instead, on a geometric
``Lattice`` whose neighbours differ by the resolution: a grid over [eps_max * 1e-6, eps_max]
first, then grids splitting the bracket [last not flipped, first flipped] until
(hi - lo) / hi <= resolution (1% in 3 calls of 12 values), and it searches several
directions (relevance, irrelevance, shuffles, filter candidates) in the same forward calls;
``apem_many`` puts the maps of one request there too, with one gradient for all.

Shapes: x is one image, C x *spatial (no batch dimension); maps are C x *spatial or
1 x *spatial; directions are K x C x *spatial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import ReliabilityRecord, ReliabilityRequest
from xaiserve.runtime.forward.counted import Budget

Forward = Callable[[torch.Tensor, str], torch.Tensor]
"""A counted no-grad forward: (N x C x *spatial, stage) -> logits N x K (``TorchForward``)."""

STAGE = "apem"
DEFAULT_RESOLUTION = 0.01
DEFAULT_SHUFFLES = 0
MAX_SHUFFLES = 64
MAX_RESOLUTION = 0.5
DEFAULT_BATCH = 12
"""eps values per direction per forward call: 12 reach 1% in 3 calls from a 1e-6 span."""
GEOMETRIC_SPAN = 1e-6
"""The first grid covers [eps_max * GEOMETRIC_SPAN, eps_max] geometrically (lower flips
are still found, one round later)."""
MAX_IMAGES_PER_CALL = 512
"""Perturbed images built at once (memory bound); a round with more takes several calls."""
SHUFFLE_SEED = 0
HINT_WIDTH = 1.5
"""A hinted search (an eps known for a similar map) starts over [hint / 1.5, hint * 1.5]."""

UNDEFINED_ZERO = "the relevance map is zero everywhere, so R / ||R||_1 is undefined"
UNDEFINED_ONE = "the relevance map is one everywhere, so the irrelevance map 1 - R is zero"
UNDEFINED_PREDICTION = (
    "the model predicts class {pred}, not the explained class {y}, on the unperturbed "
    "input, so eps would be 0"
)
UNDEFINED_GRADIENT = (
    "the loss gradient is zero everywhere (the prediction is saturated), so R_dir is zero"
)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ApemOptions:
    """Resolved APEM options.

    eps_max: the largest eps searched (L1 size in pixel units); default the number of
        elements of x, i.e. a mean absolute change of 1.0 per value.
    resolution: the relative width (hi - lo) / hi at which an eps search stops.
    shuffles: shuffled maps tried for APEM_norm (0: no APEM_norm).
    clamp: clamp perturbed images to [0, 1] (the seed does not).
    """

    eps_max: float
    resolution: float = DEFAULT_RESOLUTION
    shuffles: int = DEFAULT_SHUFFLES
    clamp: bool = False


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


# ---------------------------------------------------------------------- relevance parts


def relevance_from_map(attr_map: torch.Tensor) -> torch.Tensor:
    """R = |a| / max |a| in [0, 1], any stage (raw signed C x *spatial, or 1 x *spatial).

    Same shape as ``attr_map``; a map that is zero everywhere stays zero.
    """
    magnitude = attr_map.detach().abs().float()
    peak = magnitude.max()
    return magnitude / peak if peak > 0 else torch.zeros_like(magnitude)


def irrelevance(relevance: torch.Tensor) -> torch.Tensor:
    """R^- = 1 - R (seed section 3.1); same shape as R."""
    return 1.0 - relevance


def loss_gradient_sign(
    module: nn.Module, x: torch.Tensor, y: int, budget: Budget, stage: str = STAGE
) -> torch.Tensor:
    """sign(grad_x CE(f(x), y)), C x *spatial: one forward + backward, charged to ``budget``."""
    return gradient_sign_and_logits(module, x, y, budget, stage)[0]


def gradient_sign_and_logits(
    module: nn.Module, x: torch.Tensor, y: int, budget: Budget, stage: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign of the CE gradient C x *spatial, logits K) of the unperturbed x."""
    budget.charge(1, stage)
    xb = x.detach().unsqueeze(0).requires_grad_(True)
    with torch.enable_grad():
        logits = module(xb)
        loss = F.cross_entropy(logits, torch.tensor([y]))
        (grad,) = torch.autograd.grad(loss, xb)
    return grad[0].sign(), logits[0].detach()


def directed(relevance: torch.Tensor, sign: torch.Tensor) -> torch.Tensor | None:
    """R_dir = R / ||R||_1 * sign (seed section 3.1), or None when ||R||_1 == 0.

    relevance: >= 0, broadcastable to sign's shape (1 x *spatial -> C x *spatial); the L1
    norm is taken over the broadcast, full-shape map. Returns sign's shape.
    """
    full = relevance.expand_as(sign)
    total = full.abs().sum()
    if total <= 0:
        return None
    return full / total * sign


# ---------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchResult:
    """One eps search.

    eps: the smallest eps seen to flip (the bracket's upper end), eps_max when censored.
    censored: no flip up to eps_max.
    resolution_reached: (eps - lower) / eps of the final bracket; 0.0 when censored.
    forward_calls: forward calls (rounds) that evaluated images of this direction.
    forward_passes: images of this direction evaluated.
    lower: the largest eps seen not to flip below ``eps`` (0.0 if none); eps_max if censored.
    """

    eps: float
    censored: bool
    resolution_reached: float
    forward_calls: int
    forward_passes: int
    lower: float = 0.0


@dataclass(frozen=True)
class Lattice:
    """The eps values a search may report: e_j = eps_max * q^(top - j), q = 1 - resolution.

    e_top = eps_max; e_0 is about eps_max * GEOMETRIC_SPAN; j < 0 continue below. Neighbours
    differ by the resolution (relative), so the first flipped lattice value brackets the
    flip to it. Searches on one lattice report the same value for a flip that is monotone in
    eps whatever grids they tried (hinted or not), so APEMs of similar maps compare cleanly.
    """

    eps_max: float
    resolution: float

    @cached_property
    def log_q(self) -> float:
        return math.log1p(-self.resolution)

    @cached_property
    def top(self) -> int:
        return math.ceil(math.log(GEOMETRIC_SPAN) / self.log_q)

    def eps(self, j: int) -> float:
        return self.eps_max * math.exp((self.top - j) * self.log_q)

    def index(self, eps: float) -> int:
        """The lattice index nearest ``eps`` (> 0)."""
        return self.top - round(math.log(eps / self.eps_max) / self.log_q)

    def width(self, steps: int) -> float:
        """The relative width (hi - lo) / hi of a bracket ``steps`` indices wide."""
        return self.resolution if steps == 1 else -math.expm1(steps * self.log_q)

    def hint_width(self) -> int:
        """Indices spanning a factor HINT_WIDTH."""
        return math.ceil(math.log(HINT_WIDTH) / -self.log_q)


def calls_needed(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """Forward calls for a flip inside the first grid to reach ``resolution`` (worst case)."""
    gap = math.ceil(Lattice(1.0, resolution).top / (batch - 1))
    calls = 1
    while gap > 1:
        gap = 1 if gap - 1 <= batch else math.ceil(gap / (batch + 1))
        calls += 1
    return calls


def max_calls_for(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """The default cap on calls per direction: ``calls_needed`` plus one spare round (a flip
    below the first grid, or outside a hint's window, needs another wide grid)."""
    return calls_needed(resolution, batch) + 1


def search_cost_bound(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """The most images one direction's ``search_first_flips`` evaluates under the default
    cap: at most ``batch`` per round, at most ``max_calls_for`` rounds (a search that sees
    no flip ends by its second round, and the cap is at least 2)."""
    return batch * max_calls_for(resolution, batch)


def map_cost_bound(options: ApemOptions, batch: int = DEFAULT_BATCH) -> int:
    """The most images one map's APEM evaluates: its eps_minus and eps_plus searches."""
    return 2 * search_cost_bound(options.resolution, batch)


def record_cost_bound(options: ApemOptions, batch: int = DEFAULT_BATCH) -> int:
    """The most images ``apem_many`` evaluates for one map's record, the gradient left out
    (one per request, shared by its maps): the original's searches and, where no earlier
    shuffle flipped both ways, every shuffle's."""
    return (1 + options.shuffles) * map_cost_bound(options, batch)


def _spread(start: int, stop: int, count: int) -> list[int]:
    """Up to ``count`` distinct integers evenly spread over [start, stop], both included."""
    if stop - start + 1 <= count:
        return list(range(start, stop + 1))
    return sorted({start + round((stop - start) * i / (count - 1)) for i in range(count)})


def _next_indices(
    lo: int | None, hi: int | None, top: int, batch: int, hint: int | None, width: int
) -> list[int]:
    """Lattice indices of the next round, ascending (lo: largest known not to flip; hi:
    smallest known to flip; None: not known).

    - first round with a hint: ``batch`` indices over [hint - width, min(hint + width, top)];
    - first round: ``batch`` indices over [0, top] (geometric over [eps_max * span, eps_max]);
    - no flip seen yet: over (lo, top];
    - flipped at hi, nothing below seen: over [hi - top, hi);
    - bracket (lo, hi): ``batch`` indices splitting it evenly, or all of its inside.
    """
    if hint is not None:
        return _spread(min(hint, top) - width, min(hint + width, top), batch)
    if hi is None:
        return _spread(0, top, batch) if lo is None else _spread(lo + 1, top, batch)
    if lo is None:
        return _spread(hi - top, hi - 1, batch)
    if hi - lo - 1 <= batch:
        return list(range(lo + 1, hi))
    return sorted({lo + round((hi - lo) * i / (batch + 1)) for i in range(1, batch + 1)})


def _flips(
    forward: Forward,
    x: torch.Tensor,
    directions: torch.Tensor,
    rows: torch.Tensor,
    eps: torch.Tensor,
    y: int,
    clamp: bool,
    stage: str,
    max_images: int,
) -> torch.Tensor:
    """argmax f(x + eps_i * directions[rows_i]) != y for every i (bool, len(rows))."""
    out = []
    for start in range(0, len(rows), max_images):
        part = slice(start, start + max_images)
        images = _perturbed(x, directions, rows[part], eps[part], clamp)
        out.append(forward(images, stage).argmax(dim=1) != y)
    return torch.cat(out)


def _perturbed(
    x: torch.Tensor,
    directions: torch.Tensor,
    rows: torch.Tensor,
    eps: torch.Tensor,
    clamp: bool,
) -> torch.Tensor:
    """x + eps_i * directions[rows_i] (clamped to [0, 1] when asked), len(rows) x C x
    *spatial, built run by run of equal rows (rounds list each direction's values
    together) with numpy, one thread: torch's elementwise ops on whole rounds wake its
    OpenMP threads, which then spin for milliseconds and slowed the ONNX Runtime calls
    that follow by 12-14% in the demo model's fast filter (interleaved); building the
    whole round at once also made three temporaries and ran about 4x slower."""
    base = x.detach().numpy()
    every = directions.detach().numpy()
    scale = eps.to(x.dtype).numpy().reshape((-1,) + (1,) * x.dim())
    images = np.empty((len(rows), *x.shape), dtype=base.dtype)
    values, counts = torch.unique_consecutive(rows, return_counts=True)
    start = 0
    for k, count in zip(values.tolist(), counts.tolist()):
        run = images[start : start + count]
        np.multiply(scale[start : start + count], every[k], out=run)
        np.add(run, base, out=run)
        if clamp:
            np.clip(run, 0.0, 1.0, out=run)
        start += count
    return torch.from_numpy(images)


def search_first_flips(
    forward: Forward,
    x: torch.Tensor,
    directions: torch.Tensor,
    y: int,
    *,
    eps_max: float,
    resolution: float = DEFAULT_RESOLUTION,
    batch: int = DEFAULT_BATCH,
    clamp: bool = False,
    max_calls: int | None = None,
    stage: str = STAGE,
    max_images: int = MAX_IMAGES_PER_CALL,
    hints: Sequence[float | None] | None = None,
) -> list[SearchResult]:
    """The first flip of argmax f(x + eps * d) away from y, for K directions at once.

    x: C x *spatial; directions: K x C x *spatial. eps runs over a ``Lattice`` (relative
    spacing ``resolution``): the first round tries ``batch`` values geometric over
    [eps_max * GEOMETRIC_SPAN, eps_max], later rounds split the bracket [last not flipped,
    first flipped] evenly until the two are neighbours, i.e. (hi - lo) / hi <= resolution.
    Every round puts all unfinished directions' values into one forward call (several only
    past ``max_images`` images). A direction also stops when nothing flips up to eps_max
    (censored) or after ``max_calls`` rounds (default ``max_calls_for``; the bracket is then
    wider, as ``resolution_reached`` says). hints: per direction an eps expected near its
    flip (a similar map's), or None; a hinted first round searches a factor HINT_WIDTH
    around it instead.
    """
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    if directions.shape[1:] != x.shape:
        raise ValueError(f"directions {tuple(directions.shape)} do not match x {tuple(x.shape)}")
    k_total = directions.shape[0]
    if hints is not None and len(hints) != k_total:
        raise ValueError(f"{len(hints)} hints for {k_total} directions")
    lattice = Lattice(eps_max, resolution)
    top, width = lattice.top, lattice.hint_width()
    cap = max_calls if max_calls is not None else max_calls_for(resolution, batch)
    lo: list[int | None] = [None] * k_total
    hi: list[int | None] = [None] * k_total
    calls = [0] * k_total
    passes = [0] * k_total
    active = list(range(k_total))
    while active:
        rounds = []
        for k in active:
            hint = hints[k] if hints is not None and calls[k] == 0 else None
            hint_index = lattice.index(hint) if hint is not None and hint > 0 else None
            rounds.append(_next_indices(lo[k], hi[k], top, batch, hint_index, width))
        rows = torch.cat([torch.full((len(r),), k) for k, r in zip(active, rounds)])
        eps = torch.tensor([lattice.eps(j) for r in rounds for j in r], dtype=torch.float64)
        flipped = _flips(forward, x, directions, rows, eps, y, clamp, stage, max_images).tolist()
        still = []
        offset = 0
        for k, indices in zip(active, rounds):
            hits = flipped[offset : offset + len(indices)]
            offset += len(indices)
            calls[k] += 1
            passes[k] += len(indices)
            if True in hits:
                first = hits.index(True)
                hi[k] = indices[first]
                if first > 0:
                    lo[k] = indices[first - 1]
            else:
                lo[k] = indices[-1]
            if hi[k] is None:
                if lo[k] != top:  # eps_max not tried yet (after a hinted round)
                    still.append(k)
            elif (lo[k] is None or hi[k] - lo[k] > 1) and calls[k] < cap:
                still.append(k)
        active = still
    results = []
    for k in range(k_total):
        top_k, lo_k = hi[k], lo[k]
        if top_k is None:
            results.append(SearchResult(eps_max, True, 0.0, calls[k], passes[k], eps_max))
            continue
        lower = 0.0 if lo_k is None else lattice.eps(lo_k)
        width = 1.0 if lo_k is None else lattice.width(top_k - lo_k)
        results.append(SearchResult(lattice.eps(top_k), False, width, calls[k], passes[k], lower))
    return results


def search_first_flip(
    forward: Forward,
    x: torch.Tensor,
    direction: torch.Tensor,
    y: int,
    *,
    eps_max: float,
    resolution: float = DEFAULT_RESOLUTION,
    batch: int = DEFAULT_BATCH,
    clamp: bool = False,
    max_calls: int | None = None,
    stage: str = STAGE,
) -> SearchResult:
    """``search_first_flips`` for one direction (C x *spatial)."""
    (result,) = search_first_flips(
        forward,
        x,
        direction.unsqueeze(0),
        y,
        eps_max=eps_max,
        resolution=resolution,
        batch=batch,
        clamp=clamp,
        max_calls=max_calls,
        stage=stage,
    )
    return result


def reference_search(
    forward: Forward,
    x: torch.Tensor,
    direction: torch.Tensor,
    y: int,
    *,
    eps_max: float,
    step: float,
    clamp: bool = False,
    stage: str = STAGE,
) -> tuple[float, bool]:
    """The seed's procedure (section 3.3): eps = step, 2 step, ... one forward each.

    Returns (the first eps that flips, False), or (eps_max, True) when none up to eps_max
    does. Kept for tests and benchmarks; costs eps / step forward calls.
    """
    k = 1
    while k * step <= eps_max * (1 + 1e-12):
        image = x + (k * step) * direction
        if clamp:
            image = image.clamp(0.0, 1.0)
        if int(forward(image.unsqueeze(0), stage).argmax(dim=1)) != y:
            return k * step, False
        k += 1
    return eps_max, True


# ---------------------------------------------------------------------- map scores


@dataclass(frozen=True)
class MapScore:
    """eps_minus and eps_plus searches of one map; APEM and its uncertainty interval."""

    minus: SearchResult
    plus: SearchResult

    @property
    def apem(self) -> float:
        return self.plus.eps - self.minus.eps

    @property
    def apem_low(self) -> float:
        """The smallest APEM the brackets allow (-inf when eps_minus is censored)."""
        return self.plus.lower - (math.inf if self.minus.censored else self.minus.eps)

    @property
    def apem_high(self) -> float:
        """The largest APEM the brackets allow (inf when eps_plus is censored)."""
        return (math.inf if self.plus.censored else self.plus.eps) - self.minus.lower

    @property
    def resolution(self) -> float:
        return max(self.minus.resolution_reached, self.plus.resolution_reached)


def undefined_reason(relevance: torch.Tensor) -> str:
    """Why APEM is undefined for this map alone ('' when it is defined)."""
    if not bool((relevance > 0).any()):
        return UNDEFINED_ZERO
    if bool((relevance >= 1).all()):
        return UNDEFINED_ONE
    return ""


def undefined_at(sign: torch.Tensor, logits: torch.Tensor, y: int) -> str:
    """Why APEM is undefined at this input ('' when it is defined): the model does not
    predict y, or the loss gradient is zero everywhere. logits: K, of the unperturbed x."""
    predicted = int(logits.argmax())
    if predicted != y:
        return UNDEFINED_PREDICTION.format(pred=predicted, y=y)
    if not bool(sign.any()):
        return UNDEFINED_GRADIENT
    return ""


def check_relevance(relevance: torch.Tensor, x: torch.Tensor) -> None:
    """Raises ValueError unless relevance is in [0, 1] and broadcasts to x (C x *spatial)."""
    fits = relevance.dim() == x.dim() and relevance.shape[0] in (1, x.shape[0])
    if not fits or relevance.shape[1:] != x.shape[1:]:
        shapes = f"{tuple(relevance.shape)} vs x {tuple(x.shape)}"
        raise ValueError(f"relevance does not broadcast to x: {shapes}")
    if relevance.numel() and (relevance.min() < 0 or relevance.max() > 1):
        raise ValueError("relevance must lie in [0, 1]; use relevance_from_map on a raw map")


def score_maps(
    forward: Forward,
    x: torch.Tensor,
    y: int,
    maps: Sequence[torch.Tensor],
    sign: torch.Tensor,
    options: ApemOptions,
    *,
    batch: int = DEFAULT_BATCH,
    stage: str = STAGE,
    hints: Sequence[MapScore | None] | None = None,
) -> list[MapScore | None]:
    """eps_minus and eps_plus of several maps, all 2 * len(maps) searches batched together.

    maps: each in [0, 1], broadcastable to x (C x *spatial); sign: the loss gradient sign;
    hints: per map the score of a similar map (its eps values start the searches), or None.
    A map whose APEM is undefined (``undefined_reason``) gets None and costs nothing.
    """
    directions = []
    eps_hints: list[float | None] = []
    for i, relevance in enumerate(maps):
        if undefined_reason(relevance):
            continue
        directions += [directed(relevance, sign), directed(irrelevance(relevance), sign)]
        hint = hints[i] if hints is not None else None
        eps_hints += [None, None] if hint is None else [hint.minus.eps, hint.plus.eps]
    found = iter(
        search_first_flips(
            forward,
            x,
            torch.stack(directions),
            y,
            eps_max=options.eps_max,
            resolution=options.resolution,
            batch=batch,
            clamp=options.clamp,
            stage=stage,
            hints=eps_hints,
        )
        if directions
        else []
    )
    return [
        None if undefined_reason(relevance) else MapScore(next(found), next(found))
        for relevance in maps
    ]


def shuffled(relevance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """R with its values randomly permuted over its own positions (seed section 5.2)."""
    flat = relevance.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator)].view_as(relevance)


def _normalized(score: MapScore, shuffle: MapScore) -> float:
    """APEM_norm = eps_plus / eps_plus_shuffle - eps_minus / eps_minus_shuffle (section 5.2)."""
    return score.plus.eps / shuffle.plus.eps - score.minus.eps / shuffle.minus.eps


def _flipped_both(score: MapScore | None) -> bool:
    return score is not None and not score.minus.censored and not score.plus.censored


class SharedGradient:
    """sign(grad_x CE(f(x), y)) and the logits of one unperturbed x, computed on first use
    (one forward + backward, charged to ``budget`` then) and shared by every APEM search
    and filter of that (x, y): a request's maps all perturb the same image along the same
    gradient sign, so one pass serves them all."""

    def __init__(
        self, module: nn.Module, x: torch.Tensor, y: int, budget: Budget, stage: str = STAGE
    ) -> None:
        self.module, self.x, self.y, self.budget, self.stage = module, x, y, budget, stage
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def computed(self) -> bool:
        return self._value is not None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign C x *spatial, logits K)."""
        if self._value is None:
            self._value = gradient_sign_and_logits(
                self.module, self.x, self.y, self.budget, self.stage
            )
        return self._value


@dataclass(frozen=True)
class ScoredMap:
    """One map's reliability record and, where APEM is defined, the score of its two
    searches (the APEM filter starts from it instead of searching again)."""

    record: ReliabilityRecord
    score: MapScore | None


def apem(
    forward: Forward,
    module: nn.Module,
    x: torch.Tensor,
    y: int,
    relevance: torch.Tensor,
    options: ReliabilityRequest | None = None,
    *,
    budget: Budget,
    batch: int = DEFAULT_BATCH,
    field: str = "methods[0]",
    stage: str = STAGE,
    seed: int = SHUFFLE_SEED,
    gradient: SharedGradient | None = None,
) -> ReliabilityRecord:
    """The reliability record of one map (seed 004, sections 3.1 and 5.2).

    x: C x *spatial in [0, 1]; relevance: R in [0, 1], C x *spatial or 1 x *spatial (use
    ``relevance_from_map`` on a raw map); module: the pixel-space model (for the gradient);
    forward: counted no-grad batches on the same ``budget``.

    Defaults: eps_max = x.numel() (a mean absolute change of 1.0 per value), resolution
    0.01, shuffles 0 (no APEM_norm), clamp off. The original's searches and the first
    shuffle's run in the same forward calls; further shuffles only when that one does not
    flip both ways. ``resolution`` in the record is the worst relative bracket width
    reached by the original's two searches; ``forward_passes`` all images evaluated for
    the record, the gradient's included (unless a ``gradient`` shared with other maps of
    the same x and y had computed it already).

    Undefined cases (all-zero R, all-one R, the model not predicting y on x) set
    ``undefined_reason``; eps_minus, eps_plus and apem are then NaN and no search runs.
    APEM_norm is None when shuffles = 0, NaN when no shuffle flips both ways.
    """
    (scored,) = apem_many(
        forward,
        module,
        x,
        y,
        [relevance],
        [options],
        budget=budget,
        batch=batch,
        fields=[field],
        stage=stage,
        seed=seed,
        gradient=gradient,
    )
    return scored.record


def apem_many(
    forward: Forward,
    module: nn.Module,
    x: torch.Tensor,
    y: int,
    maps: Sequence[torch.Tensor],
    options: Sequence[ReliabilityRequest | None],
    *,
    budget: Budget,
    fields: Sequence[str],
    batch: int = DEFAULT_BATCH,
    stage: str = STAGE,
    seed: int = SHUFFLE_SEED,
    gradient: SharedGradient | None = None,
) -> list[ScoredMap]:
    """``apem`` of several maps of the same x and y (one request's), in shared forward
    calls: one gradient for all, and the searches of every map whose options give the same
    eps lattice and clamping (eps_max, resolution, clamp) in the same rounds, so each round
    is one larger batch instead of one small batch per map. Each search sees exactly the
    eps values it would alone, so the records equal ``apem``'s map by map.

    maps, options, fields: per map (``fields`` name the options in errors). A record's
    ``forward_passes`` counts the images of its own searches, plus the gradient's pass on
    the first map that needed it; they add up to what the call charged ``budget``.
    """
    if not len(maps) == len(options) == len(fields):
        raise ValueError(f"{len(maps)} maps, {len(options)} options, {len(fields)} fields")
    resolved = [resolve_options(o, x.numel(), f) for o, f in zip(options, fields)]
    for relevance in maps:
        check_relevance(relevance, x)
    gradient = gradient or SharedGradient(module, x, y, budget, stage)
    passes = [0] * len(maps)
    reasons = [undefined_reason(relevance) for relevance in maps]
    defined = [i for i, reason in enumerate(reasons) if not reason]
    if defined:  # the gradient's pass (where computed here) counts on the first such map
        spent = budget.spent
        sign, logits = gradient.get()
        passes[defined[0]] += budget.spent - spent
        at = undefined_at(sign, logits, y)
        reasons = [reason or at for reason in reasons]
    scores: dict[int, MapScore] = {}
    norms: dict[int, float | None] = {}
    groups: dict[tuple[float, float, bool], list[int]] = {}
    for i, o in enumerate(resolved):
        if not reasons[i]:
            groups.setdefault((o.eps_max, o.resolution, o.clamp), []).append(i)
    for members in groups.values():
        _score_group(
            forward,
            x,
            y,
            maps,
            resolved,
            members,
            gradient.get()[0],
            batch,
            stage,
            seed,
            scores,
            norms,
            passes,
        )
    return [
        ScoredMap(_undefined_record(resolved[i], passes[i], reasons[i]), None)
        if reasons[i]
        else ScoredMap(_record(scores[i], norms[i], passes[i]), scores[i])
        for i in range(len(maps))
    ]


def _score_group(
    forward: Forward,
    x: torch.Tensor,
    y: int,
    maps: Sequence[torch.Tensor],
    resolved: Sequence[ApemOptions],
    members: list[int],
    sign: torch.Tensor,
    batch: int,
    stage: str,
    seed: int,
    scores: dict[int, MapScore],
    norms: dict[int, float | None],
    passes: list[int],
) -> None:
    """The searches of maps sharing one lattice and clamping: round after round, every
    member's original (first round only) and its next shuffle, while it has one and no
    earlier shuffle flipped both ways, scored together. Fills scores, norms, passes."""
    options = resolved[members[0]]
    shuffles = {}
    for i in members:
        generator = torch.Generator().manual_seed(seed)
        shuffles[i] = [shuffled(maps[i], generator) for _ in range(resolved[i].shuffles)]
        norms[i] = None if not shuffles[i] else math.nan
    turn, waiting = 0, list(members)
    while waiting:
        owners, batch_maps = [], []
        for i in waiting:
            if turn == 0:
                owners.append((i, "original"))
                batch_maps.append(maps[i])
            if turn < len(shuffles[i]):
                owners.append((i, "shuffle"))
                batch_maps.append(shuffles[i][turn])
        found = score_maps(forward, x, y, batch_maps, sign, options, batch=batch, stage=stage)
        still = []
        for (i, kind), score in zip(owners, found):
            if score is not None:
                passes[i] += score.minus.forward_passes + score.plus.forward_passes
            if kind == "original":
                scores[i] = score
            elif _flipped_both(score):
                norms[i] = _normalized(scores[i], score)
            elif turn + 1 < len(shuffles[i]):
                still.append(i)
        turn, waiting = turn + 1, still


def _record(score: MapScore, apem_norm: float | None, passes: int) -> ReliabilityRecord:
    return ReliabilityRecord(
        eps_minus=score.minus.eps,
        eps_plus=score.plus.eps,
        apem=score.apem,
        resolution=score.resolution,
        eps_minus_censored=score.minus.censored,
        eps_plus_censored=score.plus.censored,
        forward_passes=passes,
        apem_norm=apem_norm,
    )


def _undefined_record(options: ApemOptions, passes: int, reason: str) -> ReliabilityRecord:
    """eps values and APEM NaN, with the reason."""
    nan = math.nan
    return ReliabilityRecord(
        eps_minus=nan,
        eps_plus=nan,
        apem=nan,
        resolution=options.resolution,
        eps_minus_censored=False,
        eps_plus_censored=False,
        forward_passes=passes,
        apem_norm=None,
        undefined_reason=reason,
    )
