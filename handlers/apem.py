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
``search_first_flips`` evaluates many eps values per forward call instead: a geometric grid
over (0, eps_max] first, then geometric grids inside the bracket [last not flipped, first
flipped] until (hi - lo) / hi <= resolution, and it searches several directions (relevance,
irrelevance, shuffles, filter candidates) in the same forward calls.

Shapes: x is one image, C x *spatial (no batch dimension); maps are C x *spatial or
1 x *spatial; directions are K x C x *spatial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgument
from .forward import Budget
from .types import ReliabilityRecord, ReliabilityRequest

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
"""The first grid covers [eps_max * GEOMETRIC_SPAN, eps_max] geometrically."""
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
    eps_max = float(numel) if options.eps_max is None else _finite(options.eps_max, f"{prefix}.eps_max")
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
    if isinstance(shuffles, bool) or not float(shuffles).is_integer():
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


def calls_needed(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """Forward calls for a flip inside the first grid to reach ``resolution`` (worst case)."""
    width = 1.0 - GEOMETRIC_SPAN ** (1.0 / (batch - 1))
    calls = 1
    while width > resolution:
        width = 1.0 - (1.0 - width) ** (1.0 / (batch + 1))
        calls += 1
    return calls


def max_calls_for(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """The default cap on calls per direction: ``calls_needed`` plus one spare round (a flip
    below the first grid's smallest value needs a second geometric grid)."""
    return calls_needed(resolution, batch) + 1


def _next_grid(
    lo: float,
    hi: float | None,
    eps_max: float,
    batch: int,
    resolution: float,
    hint: float | None = None,
) -> torch.Tensor:
    """The eps values of the next round, ascending (float64).

    - first round with a hint: ``batch`` values geometric over
      [hint / HINT_WIDTH, min(hint * HINT_WIDTH, eps_max)];
    - no flip seen yet: ``batch`` values geometric over [eps_max * span, eps_max], or over
      (lo, eps_max] after a hinted round that did not flip;
    - flipped at hi, nothing below seen: ``batch`` values geometric over [hi * span, hi);
    - bracket (lo, hi): interior values geometric over it, as few as reach ``resolution``
      in this round (at most ``batch``).
    """
    steps = torch.arange(1, batch + 1, dtype=torch.float64) / batch
    if hint is not None:
        bottom = hint / HINT_WIDTH
        top = min(hint * HINT_WIDTH, eps_max)
        return bottom * (top / bottom) ** torch.linspace(0.0, 1.0, batch, dtype=torch.float64)
    if hi is None:
        if lo <= 0.0:
            return eps_max * GEOMETRIC_SPAN ** torch.linspace(1.0, 0.0, batch, dtype=torch.float64)
        return lo * (eps_max / lo) ** steps
    if lo <= 0.0:
        return hi * GEOMETRIC_SPAN ** steps.flip(0)
    needed = math.ceil(math.log(lo / hi) / math.log1p(-resolution) - 1e-9) - 1
    n = max(1, min(batch, needed))
    ratio = (hi / lo) ** (torch.arange(1, n + 1, dtype=torch.float64) / (n + 1))
    return lo * ratio


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
        shape = (-1,) + (1,) * x.dim()
        images = x + eps[part].to(x.dtype).view(shape) * directions[rows[part]]
        if clamp:
            images = images.clamp_(0.0, 1.0)
        out.append(forward(images, stage).argmax(dim=1) != y)
    return torch.cat(out)


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

    x: C x *spatial; directions: K x C x *spatial. Every round puts all unfinished
    directions' eps values into one forward call (several only when a round has more than
    ``max_images`` images). A direction stops at (hi - lo) / hi <= resolution, when nothing
    flips up to eps_max (censored), or after ``max_calls`` rounds (default
    ``max_calls_for``). hints: per direction an eps expected near its flip (e.g. a similar
    map's), or None; a hinted first round searches around it instead of over (0, eps_max].
    """
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    if directions.shape[1:] != x.shape:
        raise ValueError(f"directions {tuple(directions.shape)} do not match x {tuple(x.shape)}")
    k_total = directions.shape[0]
    if hints is not None and len(hints) != k_total:
        raise ValueError(f"{len(hints)} hints for {k_total} directions")
    cap = max_calls if max_calls is not None else max_calls_for(resolution, batch)
    lo = [0.0] * k_total
    hi: list[float | None] = [None] * k_total
    calls = [0] * k_total
    passes = [0] * k_total
    active = list(range(k_total))
    while active:
        grids = [
            _next_grid(
                lo[k],
                hi[k],
                eps_max,
                batch,
                resolution,
                hints[k] if hints is not None and calls[k] == 0 else None,
            )
            for k in active
        ]
        rows = torch.cat([torch.full((len(g),), k) for k, g in zip(active, grids)])
        flipped = _flips(
            forward, x, directions, rows, torch.cat(grids), y, clamp, stage, max_images
        ).tolist()
        still = []
        offset = 0
        for k, grid in zip(active, grids):
            values = grid.tolist()
            hits = flipped[offset : offset + len(values)]
            offset += len(values)
            calls[k] += 1
            passes[k] += len(values)
            first = hits.index(True) if True in hits else None
            if first is None:
                if hi[k] is None and values[-1] >= eps_max:  # no flip up to eps_max: censored
                    continue
                lo[k] = values[-1]
            else:
                hi[k] = values[first]
                if first > 0:
                    lo[k] = values[first - 1]
            top = hi[k]
            unresolved = top is None or (top - lo[k]) / top > resolution
            if unresolved and (calls[k] < cap or top is None):
                still.append(k)
        active = still
    results = []
    for k in range(k_total):
        top = hi[k]
        if top is None:
            results.append(SearchResult(eps_max, True, 0.0, calls[k], passes[k], eps_max))
        else:
            results.append(
                SearchResult(top, False, (top - lo[k]) / top, calls[k], passes[k], lo[k])
            )
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
        """The smallest APEM the brackets allow (censored eps_plus: > eps_max)."""
        return self.plus.lower - self.minus.eps

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
    the record, the gradient's included.

    Undefined cases (all-zero R, all-one R, the model not predicting y on x) set
    ``undefined_reason``; eps_minus, eps_plus and apem are then NaN and no search runs.
    APEM_norm is None when shuffles = 0, NaN when no shuffle flips both ways.
    """
    resolved = resolve_options(options, x.numel(), field)
    spent = budget.spent
    nan = math.nan

    def undefined(reason: str) -> ReliabilityRecord:
        return ReliabilityRecord(
            eps_minus=nan,
            eps_plus=nan,
            apem=nan,
            resolution=resolved.resolution,
            eps_minus_censored=False,
            eps_plus_censored=False,
            forward_passes=budget.spent - spent,
            apem_norm=None,
            undefined_reason=reason,
        )

    reason = undefined_reason(relevance)
    if reason:
        return undefined(reason)
    sign, logits = gradient_sign_and_logits(module, x, y, budget, stage)
    predicted = int(logits.argmax())
    if predicted != y:
        return undefined(UNDEFINED_PREDICTION.format(pred=predicted, y=y))

    generator = torch.Generator().manual_seed(seed)
    shuffles = [shuffled(relevance, generator) for _ in range(resolved.shuffles)]
    # the original and the first shuffle share forward calls; later shuffles only if needed
    score, *scores = score_maps(
        forward, x, y, [relevance, *shuffles[:1]], sign, resolved, batch=batch, stage=stage
    )
    apem_norm = None if not shuffles else math.nan
    for i, candidate in enumerate(shuffles):
        (shuffle_score,) = scores if i == 0 else score_maps(
            forward, x, y, [candidate], sign, resolved, batch=batch, stage=stage
        )
        if _flipped_both(shuffle_score):
            apem_norm = _normalized(score, shuffle_score)
            break
    return ReliabilityRecord(
        eps_minus=score.minus.eps,
        eps_plus=score.plus.eps,
        apem=score.apem,
        resolution=score.resolution,
        eps_minus_censored=score.minus.censored,
        eps_plus_censored=score.plus.censored,
        forward_passes=budget.spent - spent,
        apem_norm=apem_norm,
    )
