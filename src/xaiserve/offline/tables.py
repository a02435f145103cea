"""The seed's tables from evaluation rows (seed 004: tables 4.2, 4.4, 5.1, 5.2, 5.3 and
figure 4.4). Plain functions over ``MapRow`` lists; each returns a list of dict rows ready
for CSV.

Censoring: a map whose search saw no flip up to eps_max (``MapRow.censored``) has a bound,
not a value; it is counted (``censored``, ``censored_fraction``) and left out of every
mean, median, interval, test and correlation, which are over the ``usable`` maps (defined
and uncensored). Medians come with a percentile-bootstrap interval (``stats.Bootstrap``:
seeded, resamples stated). Tests: Wilcoxon signed-rank where the seed compares the same
images (methods, stages), Mann-Whitney U where it compares different images (correct
versus misclassified), Spearman's p-value for table 5.3."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from xaiserve.api.types import STAGES
from xaiserve.offline import stats
from xaiserve.offline.evaluate import MapRow

Row = dict[str, Any]
"""One row of a table: column -> value (str, int or float), written as one CSV line."""

DEFAULT_BOOTSTRAP = stats.Bootstrap()


def _finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    return array[np.isfinite(array)]


def _mean(values: Iterable[float]) -> float:
    array = _finite(values)
    return float(array.mean()) if array.size else math.nan


def _median(values: Iterable[float]) -> float:
    array = _finite(values)
    return float(np.median(array)) if array.size else math.nan


def stage_order(stage: str) -> tuple[int, str]:
    """Stages in the seed's order (the API's STAGES), unknown ones after, by name."""
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def _groups(rows: Iterable[MapRow]) -> dict[tuple[str, str], list[MapRow]]:
    groups: dict[tuple[str, str], list[MapRow]] = defaultdict(list)
    for row in rows:
        groups[(row.method, row.stage)].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], stage_order(kv[0][1]))))


def _median_columns(prefix: str, values: Iterable[float], boot: stats.Bootstrap) -> Row:
    m = stats.median_ci(_finite(values), boot)
    return {f"{prefix}_median": m.value, f"{prefix}_ci_low": m.low, f"{prefix}_ci_high": m.high}


def summary(rows: Iterable[MapRow], boot: stats.Bootstrap = DEFAULT_BOOTSTRAP) -> list[Row]:
    """Tables 4.2 and 4.4: per method and stage, the censored maps counted, and the mean
    and median (with its bootstrap interval) of APEM over the usable maps; eps medians,
    APEM_norm, mask mass, the method's own time and forward passes."""
    out = []
    for (method, stage), group in _groups(rows).items():
        usable = [r for r in group if r.usable]
        defined = [r for r in group if not r.undefined_reason]
        censored = sum(r.censored for r in defined)
        out.append(
            {
                "method": method,
                "stage": stage,
                "maps": len(group),
                "undefined": len(group) - len(defined),
                "censored": censored,
                "censored_fraction": censored / len(defined) if defined else math.nan,
                "eps_minus_censored": sum(r.eps_minus_censored for r in defined),
                "eps_plus_censored": sum(r.eps_plus_censored for r in defined),
                "uncensored": len(usable),
                "apem_mean": _mean(r.apem for r in usable),
                **_median_columns("apem", (r.apem for r in usable), boot),
                "eps_minus_median": _median(r.eps_minus for r in usable),
                "eps_plus_median": _median(r.eps_plus for r in usable),
                "apem_norm_mean": _mean(r.apem_norm for r in usable),
                "apem_norm_median": _median(r.apem_norm for r in usable),
                "mask_mass_mean": _mean(r.mask_mass for r in group),
                "seconds_per_map": _mean(r.seconds for r in group),
                "attribute_seconds": _mean(r.attribute_seconds for r in group),
                "apem_seconds": _mean(r.apem_seconds for r in group),
                "forward_passes_per_map": _mean(r.forward_passes for r in group),
            }
        )
    return out


def ranking(
    rows: Iterable[MapRow], stage: str, boot: stats.Bootstrap = DEFAULT_BOOTSTRAP
) -> list[Row]:
    """Methods ordered by median APEM of the usable maps at one stage, best first (the
    seed's ordering question). Read it with ``censored_fraction``: a method whose maps
    are often censored is ranked on the maps that flipped."""
    table = [r for r in summary(rows, boot) if r["stage"] == stage]
    table.sort(key=lambda r: -r["apem_median"] if math.isfinite(r["apem_median"]) else math.inf)
    return [{"rank": i + 1, **r} for i, r in enumerate(table)]


def _paired(rows: Iterable[MapRow], key: str) -> dict[str, dict[str, MapRow]]:
    """``key`` value (method or stage) -> image -> row, usable rows only."""
    by: dict[str, dict[str, MapRow]] = defaultdict(dict)
    for row in rows:
        if row.usable:
            by[getattr(row, key)][row.image] = row
    return by


def _compare(ra: list[MapRow], rb: list[MapRow]) -> Row:
    """Win/tie/loss of ``ra`` over ``rb`` on the same images and the Wilcoxon test of the
    APEM differences. Tie: |a - b| <= resolution * (eps_plus_a + eps_plus_b)."""
    win = tie = 0
    for x, y in zip(ra, rb, strict=True):
        if abs(x.apem - y.apem) <= x.resolution * (x.eps_plus + y.eps_plus):
            tie += 1
        elif x.apem > y.apem:
            win += 1
    n = len(ra)
    test = stats.wilcoxon([r.apem for r in ra], [r.apem for r in rb])
    return {
        "images": n,
        "win": win / n if n else math.nan,
        "tie": tie / n if n else math.nan,
        "loss": (n - win - tie) / n if n else math.nan,
        "median_difference": _median(x.apem - y.apem for x, y in zip(ra, rb, strict=True)),
        "effect": test.effect,
        "wilcoxon_p": test.p,
    }


def _both_orders(table: list[Row], first: str, second: str) -> list[Row]:
    """Each unordered comparison's row and its mirror (effects and differences negated)."""
    out = []
    for row in table:
        out.append(row)
        mirror = {**row, first: row[second], second: row[first]}
        mirror["win"], mirror["loss"] = row["loss"], row["win"]
        mirror["median_difference"] = -row["median_difference"]
        mirror["effect"] = -row["effect"]
        out.append(mirror)
    return out


def pairwise(rows: Iterable[MapRow], stage: str) -> list[Row]:
    """Figure 4.4: for each ordered pair of methods, over the images where both maps are
    usable, the fraction where the first has a higher, equal (within the resolution) or
    lower APEM; the median difference, the matched-pairs rank-biserial effect and the
    Wilcoxon signed-rank p-value, with Holm's adjustment over the stage's pairs."""
    by_method = _paired((r for r in rows if r.stage == stage), "method")
    table = []
    for a, b in itertools.combinations(sorted(by_method), 2):
        shared = sorted(set(by_method[a]) & set(by_method[b]))
        ra, rb = [by_method[a][i] for i in shared], [by_method[b][i] for i in shared]
        table.append({"method": a, "versus": b, "stage": stage, **_compare(ra, rb)})
    for row, adjusted in zip(table, stats.holm([r["wilcoxon_p"] for r in table]), strict=True):
        row["wilcoxon_p_holm"] = adjusted
    return _both_orders(table, "method", "versus")


def stage_tests(rows: Iterable[MapRow]) -> list[Row]:
    """Table 4.4's claim (each visualization stage loses APEM against the one before):
    for each method and pair of stages, on the images where both maps are usable, the
    same columns as ``pairwise`` (``stage`` against ``versus``), Wilcoxon signed-rank."""
    rows = list(rows)
    table = []
    for method in sorted({r.method for r in rows}):
        by_stage = _paired((r for r in rows if r.method == method), "stage")
        for a, b in itertools.combinations(sorted(by_stage, key=stage_order), 2):
            shared = sorted(set(by_stage[a]) & set(by_stage[b]))
            ra, rb = [by_stage[a][i] for i in shared], [by_stage[b][i] for i in shared]
            table.append({"method": method, "stage": a, "versus": b, **_compare(ra, rb)})
    return table


def shuffled_norm(rows: Iterable[MapRow], boot: stats.Bootstrap = DEFAULT_BOOTSTRAP) -> list[Row]:
    """Table 5.1: APEM_norm of shuffled maps (expected near 0) next to the real maps', over
    the usable maps (a shuffled copy without a flip has no APEM_norm)."""
    out = []
    for (method, stage), group in _groups(rows).items():
        usable = [r for r in group if r.usable]
        out.append(
            {
                "method": method,
                "stage": stage,
                "maps": len(usable),
                "real_apem_norm_mean": _mean(r.apem_norm for r in usable),
                **_median_columns("real_apem_norm", (r.apem_norm for r in usable), boot),
                "shuffled": len(_finite(r.shuffled_apem_norm for r in usable)),
                "shuffled_apem_norm_mean": _mean(r.shuffled_apem_norm for r in usable),
                **_median_columns(
                    "shuffled_apem_norm", (r.shuffled_apem_norm for r in usable), boot
                ),
            }
        )
    return out


def correct_vs_misclassified(
    rows: Iterable[MapRow], boot: stats.Bootstrap = DEFAULT_BOOTSTRAP
) -> list[Row]:
    """Table 5.2: APEM of correctly classified versus misclassified images (different
    images: Mann-Whitney U, effect > 0 when the correct images score higher), each group's
    censored maps counted and left out."""
    out = []
    for (method, stage), group in _groups(rows).items():
        right = [r for r in group if r.correct and not r.undefined_reason]
        wrong = [r for r in group if r.correct is False and not r.undefined_reason]
        a = [r.apem for r in right if r.usable]
        b = [r.apem for r in wrong if r.usable]
        test = stats.mann_whitney(a, b)
        out.append(
            {
                "method": method,
                "stage": stage,
                "correct": len(right),
                "correct_censored": sum(r.censored for r in right),
                "misclassified": len(wrong),
                "misclassified_censored": sum(r.censored for r in wrong),
                "apem_mean_correct": _mean(a),
                **_median_columns("apem_correct", a, boot),
                "apem_mean_misclassified": _mean(b),
                **_median_columns("apem_misclassified", b, boot),
                "effect": test.effect,
                "mann_whitney_p": test.p,
            }
        )
    return out


GROUPS = (("correct", True), ("misclassified", False), ("all", None))


def _correlation_columns(pairs: list[tuple[float, float, bool | None]]) -> Row:
    """Spearman rho, p and n of (value, loss) for the correct, misclassified and all."""
    out: Row = {}
    for name, want in GROUPS:
        chosen = [(v, loss) for v, loss, c in pairs if want is None or c is want]
        kept = [(v, loss) for v, loss in chosen if math.isfinite(v) and math.isfinite(loss)]
        test = stats.spearman([v for v, _ in kept], [loss for _, loss in kept])
        out[f"n_{name}"] = test.n
        out[f"spearman_{name}"] = test.effect
        out[f"p_{name}"] = test.p
    return out


def loss_correlation(rows: Iterable[MapRow]) -> list[Row]:
    """Table 5.3: Spearman correlation of APEM with the cross-entropy loss at the true
    label, separately for correctly classified, misclassified and all images, with
    p-values; usable maps only. The last row correlates the predicted class's confidence
    with the loss over the images (the seed's comparison row; no stage)."""
    rows = list(rows)
    out = []
    for (method, stage), group in _groups(rows).items():
        pairs = [(r.apem, r.loss, r.correct) for r in group if r.usable]
        out.append({"method": method, "stage": stage, **_correlation_columns(pairs)})
    images = {r.image: r for r in rows}
    pairs = [(r.confidence, r.loss, r.correct) for r in images.values()]
    out.append({"method": "confidence", "stage": "", **_correlation_columns(pairs)})
    return out
