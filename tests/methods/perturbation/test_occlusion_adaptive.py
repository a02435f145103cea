"""Adaptive occlusion: the hierarchical interpolation, its parameters, and its targets on
the demo model (at least 4x fewer forward passes than full occlusion, median Spearman rank
correlation with it >= 0.9 on held-out images)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from support.resnets import Tiny3dNet
from support.tiny_models import tiny_served
from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.base import MethodContext
from xaiserve.methods.perturbation.occlusion import Occlusion
from xaiserve.methods.perturbation.occlusion_adaptive import (
    Hierarchy,
    adaptive_drops,
    rank_correlation,
)
from xaiserve.model_store import synthetic
from xaiserve.runtime.forward.backends import ModelForwards, prepare_forwards
from xaiserve.runtime.forward.counted import Budget
from xaiserve.runtime.model import PixelSpaceModel, ServedModel, load_model_dir

DEMO_IMAGES = 100
"""Held-out images (25 per class) of the target check."""


def smooth_field(counts: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*(np.linspace(0, 1, n) for n in counts), indexing="ij")
    return np.sin(3 * grids[0]) * np.cos(2 * grids[-1]) + grids[0] * grids[-1]


def test_interpolation_is_exact_where_known_and_multilinear_on_the_coarse_grid() -> None:
    counts = (15, 11)
    field = smooth_field(counts)
    hierarchy = Hierarchy(counts, 4)
    coarse = hierarchy.positions(0)
    estimate = hierarchy.interpolate({p: field[p] for p in coarse})
    rows, cols = [sorted({p[a] for p in coarse}) for a in (0, 1)]
    assert rows == [0, 4, 8, 12, 14] and cols == [0, 4, 8, 10]
    # multilinear: interpolate along columns at the coarse rows, then along rows
    along_cols = np.array([np.interp(range(11), cols, field[r, cols]) for r in rows])
    expected = np.array([np.interp(range(15), rows, along_cols[:, c]) for c in range(11)]).T
    np.testing.assert_allclose(estimate, expected, atol=1e-12)

    rng = np.random.default_rng(0)
    known = {p: field[p] for p in coarse}
    for p in itertools.product(range(15), range(11)):
        if rng.random() < 0.3:
            known[p] = field[p]
    estimate = hierarchy.interpolate(known)
    for p, value in known.items():
        assert estimate[p] == pytest.approx(value, abs=1e-12)


def test_adaptive_drops_spend_the_refine_fraction_on_the_highest_estimates() -> None:
    counts = (15, 15)
    field = smooth_field(counts)
    asked: list[list[tuple[int, ...]]] = []

    def evaluate(positions: list[tuple[int, ...]]) -> torch.Tensor:
        asked.append(positions)
        return torch.tensor([field[p] for p in positions])

    drops, evaluated = adaptive_drops(evaluate, counts, 4, 0.15)
    assert len(asked[0]) == 25  # the 5 x 5 coarse grid
    assert evaluated == 25 + round(0.15 * (225 - 25)) == sum(map(len, asked))
    hierarchy = Hierarchy(counts, 4)
    coarse = hierarchy.interpolate({p: field[p] for p in asked[0]})
    level_one = hierarchy.positions(1)
    chosen = set(asked[1])
    worst_chosen = min(coarse[p] for p in chosen)
    assert all(coarse[p] <= worst_chosen for p in level_one if p not in chosen)
    for batch in asked:
        for p in batch:
            assert drops[p] == pytest.approx(field[p])

    _, everything = adaptive_drops(evaluate, counts, 4, 1.0)
    assert everything == 225


def test_rank_correlation_is_spearman() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    b = a + torch.rand(40, generator=generator) * 3
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert rank_correlation(a, a) == pytest.approx(1.0)


def attribute(forwards: ModelForwards, x: torch.Tensor, given: dict, backend: str = "torch"):
    """Occlusion of x (N x C x *spatial) with ``given`` parameters: (map, passes spent)."""
    method = Occlusion()
    served = forwards.served
    params = method.resolve_params(given, served.config.input_shape, "methods[0].occlusion")
    budget = Budget(10**9)
    ctx = MethodContext(served, forwards.forward(budget, backend), budget, 64)
    target = ctx.forward(x, "predict").argmax(1)
    return method.attribute(ctx, x, target, params), budget.by_stage["attribute"]


def test_refining_everything_is_full_occlusion() -> None:
    served = prepare_forwards(tiny_served())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    full, full_passes = attribute(served, x, {"window": 4, "stride": 2})
    every = {"window": 4, "stride": 2, "adaptive": {"enabled": True, "refine_fraction": 1.0}}
    adaptive, passes = attribute(served, x, every)
    assert passes == full_passes == 2 * (1 + 7 * 7)
    torch.testing.assert_close(adaptive, full, atol=1e-5, rtol=1e-5)
    off = {"window": 4, "stride": 2, "adaptive": {"refine_fraction": 0.5}}  # not enabled
    torch.testing.assert_close(attribute(served, x, off)[0], full)


@pytest.mark.parametrize(
    ("adaptive", "field", "message"),
    [
        ({"enabled": True, "levels": 2}, "adaptive.levels", "unknown option"),
        ({"enabled": True, "refine_fraction": 1.5}, "adaptive.refine_fraction", "between 0"),
        ({"enabled": True, "coarse_window": -2}, "adaptive.coarse_window", ">= 0"),
        ({"enabled": "yes"}, "adaptive.enabled", "true or false"),
        ("on", "adaptive", "message of options"),
    ],
)
def test_bad_adaptive_options_name_the_field(adaptive, field: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        Occlusion().resolve_params({"adaptive": adaptive}, (3, 16, 16), "methods[2].occlusion")
    assert err.value.field == f"methods[2].occlusion.{field}"


def test_adaptive_occlusion_of_a_volume() -> None:
    shape = (1, 12, 12, 12)
    torch.manual_seed(0)
    config = replace(tiny_served().config, input_shape=shape, mean=(0.5,), std=(0.25,))
    module = PixelSpaceModel(Tiny3dNet(), config.mean, config.std).eval()
    forwards = prepare_forwards(ServedModel(config, module, None, Path(".")))
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    full, full_passes = attribute(forwards, x, {"window": 4, "stride": 2})
    adaptive, passes = attribute(
        forwards, x, {"window": 4, "stride": 2, "adaptive": {"enabled": True}}
    )
    assert adaptive.shape == full.shape == x.shape
    assert full_passes == 1 + 5**3 and passes == 1 + 2**3 + round(0.15 * (5**3 - 2**3))
    assert rank_correlation(full, adaptive) > 0.5


@pytest.mark.slow
def test_adaptive_targets_on_the_demo_model(demo_model_dir: Path) -> None:
    """At the default window and stride: >= 4x fewer forward passes than full occlusion (a
    count fixed by the window grid and the refine fraction) and, over held-out images on
    ONNX Runtime, median Spearman rank correlation >= 0.9 with it and mean >= 0.85.

    Over eight independently trained demo models the median was 0.941-0.950 and the mean
    0.891-0.918 (a few images near 0.5 pull the mean down; its standard error over 100
    images is about 0.01), so the mean is held to 0.85 and the median carries the 0.9."""
    forwards = prepare_forwards(load_model_dir(demo_model_dir))
    ratios, correlations = [], []
    for i in range(DEMO_IMAGES):
        x = torch.from_numpy(synthetic.make_sample(synthetic.TEST_SEED, i).image)[None]
        full, full_passes = attribute(forwards, x, {}, "onnxruntime")
        adaptive, passes = attribute(forwards, x, {"adaptive": {"enabled": True}}, "onnxruntime")
        ratios.append(full_passes / passes)
        correlations.append(rank_correlation(full[0, 0], adaptive[0, 0]))
    mean = float(np.mean(correlations))
    print(
        f"\nadaptive occlusion on {DEMO_IMAGES} held-out demo images: "
        f"{full_passes} vs {passes} forward passes ({min(ratios):.2f}x fewer), "
        f"Spearman mean {mean:.3f}, median {np.median(correlations):.3f}, "
        f"min {min(correlations):.3f}"
    )
    assert full_passes == 226 and min(ratios) >= 4.0
    assert np.median(correlations) >= 0.9 and mean >= 0.85
