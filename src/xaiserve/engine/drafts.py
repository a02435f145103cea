"""The maps of one request on their way to ``Explanation``s: each planned method's map
computed and post-processed first (``draft_maps``), then every map's APEM record and
filtered map added together (``with_reliability``: they share forward calls and the
gradient), then AUTO's candidates ranked (``explanations``).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from xaiserve.api.types import Explanation, FilteredRecord, ReliabilityRecord
from xaiserve.engine.gad import gad_map
from xaiserve.engine.plan import PlannedMethod
from xaiserve.engine.postprocess import apply_stage
from xaiserve.engine.render import overlay_png
from xaiserve.methods.base import MethodContext, on_device
from xaiserve.reliability.apem import apem_many
from xaiserve.reliability.filter import STAGE as FILTER_STAGE
from xaiserve.reliability.filter import filter_map
from xaiserve.reliability.probe import STAGE as APEM_STAGE
from xaiserve.reliability.probe import Probe, loss_gradient_pass
from xaiserve.reliability.score import MapScore, relevance_from_map
from xaiserve.runtime.forward.counted import Budget


@dataclass(frozen=True)
class Draft:
    """One map on its way to an ``Explanation``. staged: the map at its stage (C x *spatial
    or 1 x *spatial), ``map`` the same as float32 numpy; score: its APEM searches, for the
    filter."""

    item: PlannedMethod
    staged: torch.Tensor
    map: Any
    forward_passes: int
    timings: dict[str, float]
    png: bytes | None
    reliability: ReliabilityRecord | None = None
    filtered: FilteredRecord | None = None
    score: MapScore | None = None

    def explanation(self) -> Explanation:
        return Explanation(
            method=self.item.method.name,
            stage=self.item.request.stage,
            map=self.map,
            forward_passes=self.forward_passes,
            timings=self.timings,
            png=self.png,
            reliability=self.reliability,
            filtered=self.filtered,
        )


def png_of(attr_map: Any, x: torch.Tensor, want_png: bool) -> bytes | None:
    """The PNG overlay when asked for (2-D images only); x: 1 x C x *spatial."""
    return overlay_png(attr_map, x[0].cpu().numpy()) if want_png and x.dim() == 4 else None


def draft_maps(
    ctx: MethodContext,
    groups: list[list[PlannedMethod]],
    x: torch.Tensor,
    target: torch.Tensor,
    want_png: bool,
) -> list[list[Draft]]:
    """Every planned map, without its APEM and filter; x: 1 x C x *spatial, target: 1.
    One method asked for at several stages with the same parameters runs once (the later
    explanations then report no forward passes of their own)."""
    attributions: dict[tuple[str, str], torch.Tensor] = {}
    drafts = []
    for group in groups:
        row = []
        for item in group:
            spent_before = ctx.budget.spent
            t0 = time.perf_counter()
            raw = attributions.get(item.attribution_key)
            if raw is None:  # the same method and parameters at another stage: computed once
                raw = item.method.attribute(ctx, x, target, item.params)
                attributions[item.attribution_key] = raw
            attribute = time.perf_counter() - t0
            row.append(_draft(ctx, item, raw, x, target, want_png, attribute, spent_before))
        drafts.append(row)
    return drafts


def _draft(
    ctx: MethodContext,
    item: PlannedMethod,
    raw: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    want_png: bool,
    attribute: float,
    spent_before: int,
) -> Draft:
    """One map from its raw attribution (1 x C x *spatial): staged, GAD where asked for,
    rendered."""
    timings = {"attribute": attribute}
    t0 = time.perf_counter()
    request = item.request
    staged = apply_stage(raw, x, request.stage)[0].detach()
    if request.gad:  # keep what the support models agree on (seed 002)
        t1 = time.perf_counter()
        staged = gad_map(
            ctx, item.method, item.params, x, target, staged, request.stage, request.field
        )
        timings["gad"] = time.perf_counter() - t1
    attr_map = staged.cpu().numpy().astype("float32")
    png = png_of(attr_map, x, want_png)
    timings["postprocess"] = time.perf_counter() - t0 - timings.get("gad", 0.0)
    return Draft(item, staged, attr_map, ctx.budget.spent - spent_before, timings, png)


def with_reliability(
    ctx: MethodContext, groups: list[list[Draft]], x: torch.Tensor, y: int, want_png: bool
) -> list[list[Draft]]:
    """The drafts with the APEM records and filtered maps their plans ask for (x: 1 x C x
    *spatial, y: the explained class). Every map's APEM runs in the same forward calls
    (``apem_many``; its timing ``apem`` is its share of them by forward passes), one
    gradient serves them all, and a filter starts from its map's APEM instead of searching
    the original again."""
    wanted = [d for group in groups for d in group if d.item.apem_options is not None]
    if not wanted:
        return groups
    scored = [d for d in wanted if d.item.wants_record]
    gradient_stage = APEM_STAGE if scored else FILTER_STAGE
    probe = Probe.of(
        ctx.forward,
        ctx.model,
        x[0].cpu(),  # perturbed images are built with numpy; the forward moves them back
        y,
        ctx.budget,
        gradient_stage=gradient_stage,
        sign_and_logits=functools.partial(_sign_and_logits, ctx),
    )
    relevance = {id(d): relevance_from_map(d.staged.cpu()) for d in wanted}  # as the probe's x
    done: dict[int, Draft] = {}
    if scored:
        t0 = time.perf_counter()
        results = apem_many(
            probe,
            [relevance[id(d)] for d in scored],
            [o for d in scored if (o := d.item.apem_options) is not None],
        )
        elapsed = time.perf_counter() - t0
        total = sum(r.record.forward_passes for r in results)
        for d, result in zip(scored, results, strict=True):
            share = result.record.forward_passes / total if total else 1 / len(scored)
            timings = {**d.timings, "apem": elapsed * share}
            done[id(d)] = replace(d, reliability=result.record, score=result.score, timings=timings)
    for d in wanted:
        if d.item.filter_options is None or d.item.apem_options is None:
            continue
        current = done.get(id(d), d)
        t0 = time.perf_counter()
        record = filter_map(
            probe,
            relevance[id(d)],
            d.item.apem_options,
            d.item.filter_options,
            field=d.item.request.field,
            before=current.score,
        )
        kept = d.map * (record.map > 0)  # the original's values where R was kept
        filtered = replace(record, map=kept, png=png_of(kept, x, want_png))
        timings = {**current.timings, "filter": time.perf_counter() - t0}
        done[id(d)] = replace(current, filtered=filtered, timings=timings)
    return [[done.get(id(d), d) for d in group] for group in groups]


def _sign_and_logits(
    ctx: MethodContext, x: torch.Tensor, y: int, budget: Budget, stage: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """APEM's loss gradient sign and logits of x (C x *spatial), through the executor."""
    if budget is not ctx.budget:
        raise ValueError("the probe charges the request's budget")
    run = loss_gradient_pass(ctx.model)
    classes = torch.tensor([y], device=x.device)
    grad, logits = on_device(ctx, ("loss_gradient",), run, x[None], classes, stage)[0]
    return grad[0].sign().cpu(), logits[0].cpu()


def _apem_rank(explanation: Explanation) -> tuple[int, float]:
    """Sort key: defined APEM first, highest first."""
    record = explanation.reliability
    if record is None or record.undefined_reason or math.isnan(record.apem):
        return (1, 0.0)
    return (0, -record.apem)


def explanations(groups: list[list[Draft]]) -> tuple[Explanation, ...]:
    """The explanations, group by group; AUTO's candidates ranked by APEM, best first."""
    out: list[Explanation] = []
    for group in groups:
        rows = [d.explanation() for d in group]
        out += sorted(rows, key=_apem_rank) if group and group[0].item.ranked else rows
    return tuple(out)
