"""Evaluation tables on hand-made rows, and the maps.csv round trip used to merge shards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from support.map_rows import map_row
from xaiserve.offline import stats, tables
from xaiserve.offline.evaluate import MapRow, mask_mass
from xaiserve.offline.report import read_rows, write_report


def row(
    image: str,
    method: str,
    apem: float,
    loss: float = 1.0,
    correct: bool = True,
    stage: str = "one_channel",
) -> MapRow:
    return map_row(image, method, apem, loss=loss, correct=correct, stage=stage, eps_minus=10.0)


ROWS = [
    row("a", "saliency", 30.0, loss=0.1),
    row("a", "grad_cam", 20.0, loss=0.1),
    row("b", "saliency", 10.0, loss=0.5),
    row("b", "grad_cam", 10.05, loss=0.5),
    row("c", "saliency", 5.0, loss=2.0, correct=False),
    row("c", "grad_cam", 8.0, loss=2.0, correct=False),
]


def test_summary_and_ranking():
    summary = {r["method"]: r for r in tables.summary(ROWS)}
    assert summary["saliency"]["apem_mean"] == pytest.approx(15.0)
    assert summary["grad_cam"]["apem_median"] == pytest.approx(10.05)
    # by median: grad_cam 10.05 > saliency 10.0, although saliency's mean is higher
    assert [r["method"] for r in tables.ranking(ROWS, "one_channel")] == ["grad_cam", "saliency"]


def test_pairwise_counts_ties_within_resolution():
    pairs = {(p["method"], p["versus"]): p for p in tables.pairwise(ROWS, "one_channel")}
    # a: saliency wins; b: |10 - 10.05| <= 0.01 * (20 + 20.05): tie; c: grad_cam wins
    assert pairs[("saliency", "grad_cam")]["win"] == pytest.approx(1 / 3)
    assert pairs[("saliency", "grad_cam")]["tie"] == pytest.approx(1 / 3)
    assert pairs[("grad_cam", "saliency")]["win"] == pytest.approx(1 / 3)


def test_correct_vs_misclassified_and_loss_correlation():
    split = {r["method"]: r for r in tables.correct_vs_misclassified(ROWS)}
    assert split["saliency"]["apem_mean_correct"] == pytest.approx(20.0)
    assert split["saliency"]["apem_mean_misclassified"] == pytest.approx(5.0)
    corr = {r["method"]: r for r in tables.loss_correlation(ROWS)}
    assert corr["saliency"]["spearman_all"] == pytest.approx(-1.0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 40).astype(float)
    b = a + rng.normal(size=40)
    test = stats.spearman(a, b)
    assert test.effect == pytest.approx(spearmanr(a, b).statistic)
    assert test.p == pytest.approx(spearmanr(a, b).pvalue)


def test_mask_mass():
    heat = np.zeros((1, 4, 4))
    heat[0, 0, 0], heat[0, 3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert mask_mass(heat, mask) == pytest.approx(0.75)
    assert math.isnan(mask_mass(np.zeros((1, 4, 4)), mask))


def test_report_round_trip(tmp_path):
    written = write_report(tmp_path, ROWS)
    assert written["boxplot_one_channel"].stat().st_size > 0
    back = read_rows(tmp_path / "maps.csv")
    assert [(r.image, r.method, r.correct) for r in back] == [
        (r.image, r.method, r.correct) for r in ROWS
    ]
    assert [r.apem for r in back] == pytest.approx([r.apem for r in ROWS])
    assert math.isnan(back[0].mask_mass) and back[0].undefined_reason == ""
