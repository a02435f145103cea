"""Censoring-aware evaluation statistics on hand-made rows: censored maps counted and left
out, seeded bootstrap intervals, Wilcoxon / Mann-Whitney / Spearman p-values against
scipy, Holm's adjustment by hand, and ``select_images`` on a model whose answer is known."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from support.map_rows import map_row
from xaiserve.offline import stats, tables
from xaiserve.offline.evaluate import EvalImage, MapRow, select_images


def row(image: str, method: str, apem: float, *, confidence: float = 0.9, **kwargs: Any) -> MapRow:
    return map_row(image, method, apem, confidence=confidence, **kwargs)


def test_censored_maps_are_counted_and_left_out_of_means_and_medians():
    rows = [
        row("a", "saliency", 10.0),
        row("b", "saliency", 20.0),
        row("c", "saliency", 30.0),
        row("d", "saliency", 0.0, censored_plus=True),  # APEM would enter as 12283
        replace(row("e", "saliency", 1.0), undefined_reason="all-zero map"),
    ]
    (summary,) = tables.summary(rows)
    assert summary["maps"] == 5 and summary["undefined"] == 1
    assert summary["censored"] == 1 and summary["eps_plus_censored"] == 1
    assert summary["censored_fraction"] == pytest.approx(1 / 4)
    assert summary["uncensored"] == 3
    assert summary["apem_mean"] == pytest.approx(20.0)  # not (60 + 12283) / 4
    assert summary["apem_median"] == pytest.approx(20.0)
    assert summary["eps_plus_median"] == pytest.approx(25.0)


def test_bootstrap_interval_holds_the_median_and_is_seeded():
    values = np.random.default_rng(3).lognormal(2.0, 1.0, 60)
    boot = stats.Bootstrap(resamples=500, seed=11)
    first, again = stats.median_ci(values, boot), stats.median_ci(values, boot)
    assert first == again
    assert first.value == pytest.approx(float(np.median(values)))
    assert first.low < first.value < first.high
    other = stats.median_ci(values, stats.Bootstrap(resamples=500, seed=12))
    assert (other.low, other.high) != (first.low, first.high)
    # the median's 95% interval (about +-0.3 sd at n = 60) lies inside the quartiles (+-0.67)
    low, high = np.percentile(values, [25, 75])
    assert low < first.low and first.high < high


def test_paired_and_independent_tests_equal_scipy():
    a = [12.0, 7.5, 30.0, 4.0, 18.0, 9.0, 22.0, 15.5]
    b = [10.0, 8.0, 21.0, 1.0, 18.5, 3.0, 20.0, 11.0]
    paired = stats.wilcoxon(a, b)
    assert paired.p == pytest.approx(sps.wilcoxon(a, b).pvalue)
    # differences 2, -0.5, 9, 3, -0.5, 6, 2, 4.5; |d| ranks: 0.5s -> 1.5, 2s -> 3.5, 3 -> 5,
    # 4.5 -> 6, 6 -> 7, 9 -> 8; W- = 3, W+ = 33: effect (33 - 3) / 36
    assert paired.effect == pytest.approx(30 / 36)
    independent = stats.mann_whitney(a, [1.0, 2.0, 3.0, 50.0])
    scipy_u = sps.mannwhitneyu(a, [1.0, 2.0, 3.0, 50.0], alternative="two-sided")
    assert independent.p == pytest.approx(scipy_u.pvalue)
    assert independent.effect == pytest.approx(2 * scipy_u.statistic / 32 - 1)
    assert math.isnan(stats.wilcoxon([1.0, 2.0], [1.0, 2.0]).p)


def test_holm_by_hand():
    adjusted = stats.holm([0.01, 0.04, math.nan, 0.03])
    # sorted 0.01, 0.03, 0.04 over m = 3: 0.03, max(0.03, 0.06), max(0.06, 0.04)
    assert adjusted[0] == pytest.approx(0.03)
    assert adjusted[3] == pytest.approx(0.06)
    assert adjusted[1] == pytest.approx(0.06)
    assert math.isnan(adjusted[2])


def test_pairwise_tests_the_shared_uncensored_images():
    apem_a = [30.0, 12.0, 25.0, 40.0, 8.0, 19.0]
    apem_b = [20.0, 14.0, 11.0, 22.0, 3.0, 9.0]
    rows = [row(f"i{k}", "a", v) for k, v in enumerate(apem_a)]
    rows += [row(f"i{k}", "b", v) for k, v in enumerate(apem_b)]
    rows += [row("i6", "a", 50.0), row("i6", "b", 0.0, censored_plus=True)]
    pairs = {(p["method"], p["versus"]): p for p in tables.pairwise(rows, "one_channel")}
    ab, ba = pairs[("a", "b")], pairs[("b", "a")]
    assert ab["images"] == 6  # i6 left out: b's search there is censored
    assert ab["wilcoxon_p"] == pytest.approx(sps.wilcoxon(apem_a, apem_b).pvalue)
    assert ab["wilcoxon_p_holm"] == pytest.approx(ab["wilcoxon_p"])  # one pair
    assert ab["win"] == pytest.approx(5 / 6) and ba["loss"] == pytest.approx(5 / 6)
    assert ab["effect"] == pytest.approx(-ba["effect"]) and ab["effect"] > 0.5


def test_stage_tests_pair_each_method_by_image():
    one = [30.0, 12.0, 25.0, 40.0, 8.0]
    times = [20.0, 14.0, 11.0, 22.0, 3.0]
    rows = [row(f"i{k}", "a", v) for k, v in enumerate(one)]
    rows += [row(f"i{k}", "a", v, stage="times_image") for k, v in enumerate(times)]
    (test,) = tables.stage_tests(rows)
    assert (test["stage"], test["versus"]) == ("one_channel", "times_image")
    assert test["wilcoxon_p"] == pytest.approx(sps.wilcoxon(one, times).pvalue)


def test_correct_vs_misclassified_and_loss_correlation_by_group():
    right = [40.0, 35.0, 28.0, 50.0, 33.0, 45.0]
    wrong = [5.0, 9.0, 2.0, 12.0]
    loss_right = [0.01, 0.03, 0.2, 0.002, 0.05, 0.04]
    loss_wrong = [2.0, 1.5, 3.0, 0.9]
    rows = [
        row(f"c{k}", "m", v, loss=loss, confidence=1 - loss / 4)
        for k, (v, loss) in enumerate(zip(right, loss_right, strict=True))
    ]
    rows += [
        row(f"w{k}", "m", v, correct=False, loss=loss, confidence=0.5 + loss / 10)
        for k, (v, loss) in enumerate(zip(wrong, loss_wrong, strict=True))
    ]
    rows.append(row("w9", "m", 0.0, correct=False, censored_plus=True, loss=9.0))
    (split,) = tables.correct_vs_misclassified(rows)
    assert split["correct"] == 6 and split["misclassified"] == 5
    assert split["misclassified_censored"] == 1
    assert split["apem_mean_misclassified"] == pytest.approx(np.mean(wrong))
    expected = sps.mannwhitneyu(right, wrong, alternative="two-sided").pvalue
    assert split["mann_whitney_p"] == pytest.approx(expected)
    assert split["effect"] == pytest.approx(1.0)  # every correct image scores higher
    method, confidence = tables.loss_correlation(rows)
    assert method["n_correct"] == 6 and method["n_misclassified"] == 4 and method["n_all"] == 10
    spearman = sps.spearmanr(right, loss_right)
    assert method["spearman_correct"] == pytest.approx(spearman.statistic)
    assert method["p_correct"] == pytest.approx(spearman.pvalue)
    wrong_test = sps.spearmanr(wrong, loss_wrong)
    assert method["p_misclassified"] == pytest.approx(wrong_test.pvalue)
    assert confidence["method"] == "confidence" and confidence["n_all"] == 11
    assert confidence["spearman_correct"] == pytest.approx(-1.0)


class _Brightness(nn.Module):
    """Class 1 when the image's mean is above 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1)


def test_select_images_picks_by_the_models_answer():
    images = [
        EvalImage(f"img{k}", np.full((1, 2, 2), level, np.float32), label)
        for k, (level, label) in enumerate(
            [(0.9, 1), (0.1, 1), (0.8, 0), (0.2, 0), (0.7, 1), (0.3, 1), (0.6, 1)]
        )
    ]  # predicted 1, 0, 1, 0, 1, 0, 1: img1, img2 and img5 are misclassified
    wrong = select_images(_Brightness(), images, "misclassified", 2, scan_limit=100, batch_size=2)
    assert [i.name for i in wrong.images] == ["img1", "img2"]
    assert wrong.scanned == 4 and wrong.misclassified_seen == 2  # stops at the batch holding #2
    right = select_images(_Brightness(), images, "correct", 10, scan_limit=100)
    assert [i.name for i in right.images] == ["img0", "img3", "img4", "img6"]
    limited = select_images(_Brightness(), images, "misclassified", 3, scan_limit=4)
    assert [i.name for i in limited.images] == ["img1", "img2"] and limited.scanned == 4
    first = select_images(_Brightness(), images, "all", 3, scan_limit=3)
    assert [i.name for i in first.images] == ["img0", "img1", "img2"]
    with pytest.raises(ValueError, match="needs labels"):
        select_images(_Brightness(), [replace(images[0], label=None)], "correct", 1, scan_limit=5)
