"""One map's APEM: relevance and irrelevance directions, their two searches, APEM_norm
(seed 004, sections 3.1 and 5.2).

For a pixel-space model f, one image x in [0, 1] (C x *spatial), the explained class y and
a relevance map R in [0, 1] broadcast to x's shape:

    R_norm = R / ||R||_1                       (L1 over the broadcast, full-shape map)
    R_dir  = R_norm * sign(grad_x CE(f(x), y))  (the "Directed Relevance", section 3.1)
    eps_minus = min { eps : argmax f(x + eps * R_dir) != y }
    eps_plus  = the same for the irrelevance R^- = 1 - R
    APEM = eps_plus - eps_minus                 (higher = a more reliable map)

    APEM_norm = eps_plus / eps_plus_shuffle - eps_minus / eps_minus_shuffle  (section 5.2)

with the eps values of the first shuffled copy of R whose two searches both flip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.search import SearchResult, search_first_flips

UNDEFINED_ZERO = "the relevance map is zero everywhere, so R / ||R||_1 is undefined"
UNDEFINED_ONE = "the relevance map is one everywhere, so the irrelevance map 1 - R is zero"
UNDEFINED_PREDICTION = (
    "the model predicts class {pred}, not the explained class {y}, on the unperturbed "
    "input, so eps would be 0"
)
UNDEFINED_GRADIENT = (
    "the loss gradient is zero everywhere (the prediction is saturated), so R_dir is zero"
)


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


def shuffled(relevance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """R with its values randomly permuted over its own positions (seed section 5.2); the
    permutation is drawn on the CPU (``generator`` is a CPU generator), the same on every
    device."""
    flat = relevance.reshape(-1)
    order = torch.randperm(flat.numel(), generator=generator, device="cpu")
    return flat[order.to(flat.device)].view_as(relevance)


def check_relevance(relevance: torch.Tensor, x: torch.Tensor) -> None:
    """Raises ValueError unless relevance is in [0, 1] and broadcasts to x (C x *spatial)."""
    fits = relevance.dim() == x.dim() and relevance.shape[0] in (1, x.shape[0])
    if not fits or relevance.shape[1:] != x.shape[1:]:
        shapes = f"{tuple(relevance.shape)} vs x {tuple(x.shape)}"
        raise ValueError(f"relevance does not broadcast to x: {shapes}")
    if relevance.numel() and (relevance.min() < 0 or relevance.max() > 1):
        raise ValueError("relevance must lie in [0, 1]; use relevance_from_map on a raw map")


def undefined_reason(relevance: torch.Tensor) -> str:
    """Why APEM is undefined for this map alone ('' when it is defined)."""
    if not bool((relevance > 0).any()):
        return UNDEFINED_ZERO
    if bool((relevance >= 1).all()):
        return UNDEFINED_ONE
    return ""


def undefined_at(probe: Probe) -> str:
    """Why APEM is undefined at the probe's input ('' when it is defined): the model does
    not predict y, or the loss gradient is zero everywhere. Computes the gradient."""
    sign, logits = probe.sign_and_logits()
    predicted = int(logits.argmax())
    if predicted != probe.y:
        return UNDEFINED_PREDICTION.format(pred=predicted, y=probe.y)
    if not bool(sign.any()):
        return UNDEFINED_GRADIENT
    return ""


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

    @property
    def forward_passes(self) -> int:
        """Images the two searches evaluated."""
        return self.minus.forward_passes + self.plus.forward_passes

    @property
    def flipped_both(self) -> bool:
        """Both searches flipped (neither is censored)."""
        return not self.minus.censored and not self.plus.censored


def normalized(score: MapScore, shuffle: MapScore) -> float:
    """APEM_norm = eps_plus / eps_plus_shuffle - eps_minus / eps_minus_shuffle (seed 004,
    section 5.2); ``shuffle`` is the score of a shuffled copy of the map."""
    return score.plus.eps / shuffle.plus.eps - score.minus.eps / shuffle.minus.eps


def score_maps(
    probe: Probe, lattice: Lattice, maps: Sequence[torch.Tensor]
) -> list[MapScore | None]:
    """eps_minus and eps_plus of several maps, all 2 * len(maps) searches batched together.

    maps: each in [0, 1], broadcastable to x (C x *spatial). A map whose APEM is undefined
    (``undefined_reason``) gets None and costs nothing. The directions follow the probe's
    gradient sign (computed here if no search needed it yet). Every map's searches try the
    points they would try alone, so its score does not depend on the other maps.
    """
    directions = []
    for relevance in maps:
        if undefined_reason(relevance):
            continue
        sign = probe.sign_and_logits()[0]
        minus, plus = directed(relevance, sign), directed(irrelevance(relevance), sign)
        if minus is None or plus is None:  # not for a map with a reason ''
            raise ValueError("a defined map has an all-zero relevance or irrelevance")
        directions += [minus, plus]
    found = iter(search_first_flips(probe, lattice, torch.stack(directions)) if directions else [])
    return [
        None if undefined_reason(relevance) else MapScore(next(found), next(found))
        for relevance in maps
    ]
