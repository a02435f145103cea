"""APEM, the Adversarial Perturbation Explanation Metric (seed 004, chapter 3 and section 5.2):
the reliability records of a request's maps, scored together.

``apem_many`` scores the maps of one image and class in shared forward calls: one loss
gradient for all (the ``Probe``'s), and the searches of every map whose options give the
same eps lattice and clamping in the same rounds, with the shuffled copies APEM_norm needs.
``apem`` is the same for one map. The formulas are in ``score``, the search in ``search``,
the options (resolved once, in the engine's plan) in ``options``.

Shapes: x is one image, C x *spatial (no batch dimension); maps are C x *spatial or
1 x *spatial, in [0, 1] (``relevance_from_map`` of any stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from xaiserve.api.types import ReliabilityRecord
from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.options import ApemOptions, default_options
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.score import (
    MapScore,
    check_relevance,
    normalized,
    score_maps,
    shuffled,
    undefined_at,
    undefined_reason,
)

SHUFFLE_SEED = 0


@dataclass(frozen=True)
class ScoredMap:
    """One map's reliability record and, where APEM is defined, the score of its two
    searches (the APEM filter starts from it instead of searching again)."""

    record: ReliabilityRecord
    score: MapScore | None


def apem(
    probe: Probe, relevance: torch.Tensor, options: ApemOptions | None = None
) -> ReliabilityRecord:
    """The reliability record of one map (seed 004, sections 3.1 and 5.2).

    probe: x (C x *spatial in [0, 1]), y, the model and its budget; relevance: R in [0, 1],
    C x *spatial or 1 x *spatial (use ``relevance_from_map`` on a raw map); options:
    resolved (``resolve_options``), default eps_max = x.numel() (a mean absolute change of
    1.0 per value), resolution 0.01, shuffles 0 (no APEM_norm), clamp off.

    The original's searches and the first shuffle's run in the same forward calls; further
    shuffles only when that one does not flip both ways. ``resolution`` in the record is
    the worst relative bracket width reached by the original's two searches;
    ``forward_passes`` all images evaluated for the record, the gradient's included
    (unless the probe's gradient, shared with other maps of the same x and y, had been
    computed already).

    Undefined cases (all-zero R, all-one R, the model not predicting y on x) set
    ``undefined_reason``; eps_minus, eps_plus and apem are then NaN and no search runs.
    APEM_norm is None when shuffles = 0, NaN when no shuffle flips both ways.
    """
    (scored,) = apem_many(probe, [relevance], [options or default_options(probe.x.numel())])
    return scored.record


def apem_many(
    probe: Probe, maps: Sequence[torch.Tensor], options: Sequence[ApemOptions]
) -> list[ScoredMap]:
    """``apem`` of several maps of the probe's x and y (one request's), in shared forward
    calls: one gradient for all, and the searches of every map whose options give the same
    eps lattice and clamping (eps_max, resolution, clamp) in the same rounds, so each round
    is one larger batch instead of one small batch per map. Each search sees exactly the
    eps values it would alone, so the records equal ``apem``'s map by map.

    maps, options: per map. A record's ``forward_passes`` counts the images of its own
    searches, plus the gradient's pass on the first map that needed it; they add up to
    what the call charged the probe's budget.
    """
    if len(maps) != len(options):
        raise ValueError(f"{len(maps)} maps, {len(options)} options")
    for relevance in maps:
        check_relevance(relevance, probe.x)
    reasons = [undefined_reason(relevance) for relevance in maps]
    defined = [i for i, reason in enumerate(reasons) if not reason]
    gradient_passes = [0] * len(maps)
    if defined:  # the gradient's pass (where computed here) counts on the first such map
        spent = probe.budget.spent
        at = undefined_at(probe)
        gradient_passes[defined[0]] = probe.budget.spent - spent
        reasons = [reason or at for reason in reasons]
    groups: dict[tuple[Lattice, bool], list[int]] = {}
    for i, o in enumerate(options):
        if not reasons[i]:
            groups.setdefault((o.lattice, o.clamp), []).append(i)
    scored: dict[int, _Scored] = {}
    for (lattice, clamp), members in groups.items():
        found = _score_group(
            replace(probe, clamp=clamp),
            lattice,
            [maps[i] for i in members],
            [options[i].shuffles for i in members],
        )
        scored.update(zip(members, found, strict=True))
    return [
        ScoredMap(_undefined_record(options[i], gradient_passes[i], reasons[i]), None)
        if reasons[i]
        else scored[i].scored_map(gradient_passes[i])
        for i in range(len(maps))
    ]


@dataclass
class _Scored:
    """One map of a group as its rounds go: its shuffled copies, its own score, APEM_norm
    (None without shuffles, NaN until a shuffle flips both ways) and the images its
    searches evaluated."""

    relevance: torch.Tensor
    shuffles: list[torch.Tensor]
    score: MapScore | None = None
    norm: float | None = None
    passes: int = 0
    waiting: bool = True

    def scored_map(self, gradient_passes: int) -> ScoredMap:
        if self.score is None:  # every map's original is scored in the first round
            raise RuntimeError("a map of the group was not scored")
        return ScoredMap(_record(self.score, self.norm, self.passes + gradient_passes), self.score)


def _score_group(
    probe: Probe, lattice: Lattice, maps: Sequence[torch.Tensor], shuffles: Sequence[int]
) -> list[_Scored]:
    """The searches of maps sharing one lattice and clamping (the probe's): round after
    round, every map's original (first round only) and its next shuffle, while it has one
    and no earlier shuffle flipped both ways, scored together. Returns per map its score,
    APEM_norm and the images its searches evaluated."""
    members = []
    for relevance, count in zip(maps, shuffles, strict=True):
        generator = torch.Generator(device="cpu").manual_seed(SHUFFLE_SEED)
        copies = [shuffled(relevance, generator) for _ in range(count)]
        members.append(_Scored(relevance, copies, norm=math.nan if copies else None))
    turn = 0
    while any(m.waiting for m in members):
        owners, batch_maps = [], []
        for m in members:
            if not m.waiting:
                continue
            if turn == 0:
                owners.append((m, True))
                batch_maps.append(m.relevance)
            if turn < len(m.shuffles):
                owners.append((m, False))
                batch_maps.append(m.shuffles[turn])
            m.waiting = False
        found = score_maps(probe, lattice, batch_maps)
        for (m, original), score in zip(owners, found, strict=True):
            m.passes += score.forward_passes if score is not None else 0
            if original:
                m.score = score
            elif score is not None and score.flipped_both and m.score is not None:
                m.norm = normalized(m.score, score)
            else:
                m.waiting = turn + 1 < len(m.shuffles)
        turn += 1
    return members


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
