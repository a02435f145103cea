"""The seed's tables from evaluation rows (seed 004: tables 4.2, 4.4, 5.1, 5.2, 5.3 and
figure 4.4). Plain functions over ``MapRow`` lists; each returns a list of dict rows ready
for CSV."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from xaiserve.offline.evaluate import MapRow

Row = dict[str, Any]
"""One row of a table: column -> value (str, int or float), written as one CSV line."""


def _finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    return array[np.isfinite(array)]


def _mean(values: Iterable[float]) -> float:
    array = _finite(values)
    return float(array.mean()) if array.size else math.nan


def _median(values: Iterable[float]) -> float:
    array = _finite(values)
    return float(np.median(array)) if array.size else math.nan


def _groups(rows: Iterable[MapRow]) -> dict[tuple[str, str], list[MapRow]]:
    groups: dict[tuple[str, str], list[MapRow]] = defaultdict(list)
    for row in rows:
        groups[(row.method, row.stage)].append(row)
    return dict(groups)


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of the pairs where both values are finite."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return math.nan
    rx, ry = rank_average(x), rank_average(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def summary(rows: Iterable[MapRow]) -> list[Row]:
    """Tables 4.2 and 4.4: mean and median APEM (and eps) per method and stage."""
    out = []
    for (method, stage), group in sorted(_groups(rows).items()):
        out.append(
            {
                "method": method,
                "stage": stage,
                "maps": len(group),
                "undefined": sum(bool(r.undefined_reason) for r in group),
                "apem_mean": _mean(r.apem for r in group),
                "apem_median": _median(r.apem for r in group),
                "eps_minus_mean": _mean(r.eps_minus for r in group),
                "eps_plus_mean": _mean(r.eps_plus for r in group),
                "censored_fraction": _mean(
                    float(r.eps_minus_censored or r.eps_plus_censored) for r in group
                ),
                "apem_norm_median": _median(r.apem_norm for r in group),
                "mask_mass_mean": _mean(r.mask_mass for r in group),
                "seconds_per_map": _mean(r.seconds for r in group),
                "forward_passes_per_map": _mean(r.forward_passes for r in group),
            }
        )
    return out


def ranking(rows: Iterable[MapRow], stage: str) -> list[Row]:
    """Methods ordered by median APEM at one stage, best first (the seed's ordering
    question). The median, because a censored search (no flip up to eps_max) enters the
    mean as eps_max and can dominate it."""
    table = [r for r in summary(rows) if r["stage"] == stage]
    table.sort(key=lambda r: -r["apem_median"] if math.isfinite(r["apem_median"]) else math.inf)
    return [{"rank": i + 1, **r} for i, r in enumerate(table)]


def pairwise(rows: Iterable[MapRow], stage: str) -> list[Row]:
    """Figure 4.4: for each ordered pair of methods, the fraction of images where the first
    has a higher, equal or lower APEM. Equal: within the search resolution, i.e.
    |a - b| <= resolution * (eps_plus_a + eps_plus_b)."""
    by_method: dict[str, dict[str, MapRow]] = defaultdict(dict)
    for row in rows:
        if row.stage == stage and not row.undefined_reason:
            by_method[row.method][row.image] = row
    out = []
    for a, b in itertools.permutations(sorted(by_method), 2):
        shared = sorted(set(by_method[a]) & set(by_method[b]))
        win = tie = loss = 0
        for image in shared:
            ra, rb = by_method[a][image], by_method[b][image]
            slack = ra.resolution * (ra.eps_plus + rb.eps_plus)
            if abs(ra.apem - rb.apem) <= slack:
                tie += 1
            elif ra.apem > rb.apem:
                win += 1
            else:
                loss += 1
        n = max(len(shared), 1)
        out.append(
            {
                "method": a,
                "versus": b,
                "stage": stage,
                "images": len(shared),
                "win": win / n,
                "tie": tie / n,
                "loss": loss / n,
            }
        )
    return out


def shuffled_norm(rows: Iterable[MapRow]) -> list[dict[str, object]]:
    """Table 5.1: APEM_norm of shuffled maps (expected near 0) next to the real maps'."""
    return [
        {
            "method": method,
            "stage": stage,
            "real_apem_norm_mean": _mean(r.apem_norm for r in group),
            "real_apem_norm_median": _median(r.apem_norm for r in group),
            "shuffled_apem_norm_mean": _mean(r.shuffled_apem_norm for r in group),
            "shuffled_apem_norm_median": _median(r.shuffled_apem_norm for r in group),
        }
        for (method, stage), group in sorted(_groups(rows).items())
    ]


def correct_vs_misclassified(rows: Iterable[MapRow]) -> list[dict[str, object]]:
    """Table 5.2: APEM of correctly classified versus misclassified images."""
    out = []
    for (method, stage), group in sorted(_groups(rows).items()):
        right = [r.apem for r in group if r.correct]
        wrong = [r.apem for r in group if r.correct is False]
        out.append(
            {
                "method": method,
                "stage": stage,
                "correct": len(right),
                "misclassified": len(wrong),
                "apem_mean_correct": _mean(right),
                "apem_median_correct": _median(right),
                "apem_mean_misclassified": _mean(wrong),
                "apem_median_misclassified": _median(wrong),
            }
        )
    return out


def loss_correlation(rows: Iterable[MapRow]) -> list[dict[str, object]]:
    """Table 5.3: Spearman correlation between APEM and the cross-entropy loss."""
    return [
        {
            "method": method,
            "stage": stage,
            "images": len(group),
            "spearman_apem_loss": spearman([r.apem for r in group], [r.loss for r in group]),
            "spearman_eps_minus_loss": spearman(
                [r.eps_minus for r in group], [r.loss for r in group]
            ),
        }
        for (method, stage), group in sorted(_groups(rows).items())
    ]
