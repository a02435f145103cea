"""Properties of explanations and APEM on the trained demo model (seed 004, chapter 5),
and the relevance mass of maps inside the objects' ground-truth masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xaiserve.api.types import FilterRequest, ReliabilityRequest
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import get_method
from xaiserve.model_store import synthetic
from xaiserve.reliability.apem import apem, relevance_from_map, shuffled
from xaiserve.reliability.filter import filter_map
from xaiserve.runtime.forward.counted import Budget, TorchForward
from xaiserve.runtime.model import ServedModel, load_model_dir

SEED = 777  # neither the training nor the held-out seed
N_IMAGES = 24


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path) -> ServedModel:
    return load_model_dir(demo_model_dir)


@pytest.fixture(scope="module")
def samples(demo: ServedModel) -> list[synthetic.Sample]:
    """Correctly classified images of a fresh draw."""
    chosen = []
    for i in range(N_IMAGES + 8):
        sample = synthetic.make_sample(SEED, i)
        with torch.no_grad():
            predicted = int(demo.module(torch.from_numpy(sample.image)[None]).argmax())
        if predicted == sample.label:
            chosen.append(sample)
    return chosen[:N_IMAGES]


def _context(demo: ServedModel):
    from xaiserve.methods.base import MethodContext

    budget = Budget(10**9)
    return MethodContext(demo, TorchForward(demo.module, budget, 64), budget, 64), budget


def _map(demo: ServedModel, name: str, sample: synthetic.Sample, stage: str = "one_channel"):
    ctx, _ = _context(demo)
    method = get_method(name)
    params = method.resolve_params({}, demo.config.input_shape, name)
    x = torch.from_numpy(sample.image)[None]
    raw = method.attribute(ctx, x, torch.tensor([sample.label]), params)
    return apply_stage(raw, x, stage)[0]


def _apem(demo: ServedModel, sample: synthetic.Sample, relevance: torch.Tensor, shuffles: int = 0):
    budget = Budget(10**9)
    forward = TorchForward(demo.module, budget, 64)
    x = torch.from_numpy(sample.image)
    options = ReliabilityRequest(shuffles=shuffles)
    return apem(forward, demo.module, x, sample.label, relevance, options, budget=budget)


@pytest.mark.parametrize("name", ["grad_cam", "occlusion"])
def test_relevance_mass_inside_object_beats_uniform(demo, samples, name):
    """Mass of the one-channel map inside the object mask versus the mask's area fraction
    (what a uniform map would put there), over correctly classified images."""
    inside, area = [], []
    for sample in samples:
        heat = _map(demo, name, sample).numpy()[0]
        inside.append(heat[sample.mask].sum() / heat.sum())
        area.append(sample.mask.mean())
    ratios = np.asarray(inside) / np.asarray(area)
    print(
        f"\n{name}: mass in mask {np.mean(inside):.3f} vs uniform {np.mean(area):.3f} "
        f"(x{np.mean(inside) / np.mean(area):.2f}); per image median x{np.median(ratios):.2f}, "
        f"above uniform in {np.mean(ratios > 1):.0%} of {len(ratios)} images"
    )
    assert np.mean(inside) > 1.5 * np.mean(area)
    assert np.median(ratios) > 1.5
    assert np.mean(ratios > 1.0) >= 0.7


def test_shuffled_maps_score_near_zero_and_below_real_maps(demo, samples):
    """Seed 5.2: a shuffled map's APEM_norm is near 0 (median within +-0.15); the real
    gradient map scores higher than its shuffled copy."""
    generator = torch.Generator().manual_seed(0)
    shuffled_norms, wins = [], []
    for sample in samples[:16]:
        relevance = relevance_from_map(_map(demo, "saliency", sample))
        real = _apem(demo, sample, relevance)
        copy = shuffled(relevance, generator)
        fake = _apem(demo, sample, copy, shuffles=4)
        shuffled_norms.append(fake.apem_norm)
        wins.append(real.apem > fake.apem)
    median = float(np.nanmedian(shuffled_norms))
    print(f"\nshuffled APEM_norm median {median:.3f}; real > shuffled in {np.mean(wins):.0%}")
    assert abs(median) <= 0.15
    assert np.mean(wins) >= 0.9


def _object_maps(mask: np.ndarray) -> dict[str, torch.Tensor]:
    """Ground-truth maps: the object with its one-pixel outline (a shape's evidence is its
    boundary), its left half, and the object plus as many scattered far-background pixels
    (more than 12 pixels away from it)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    whole = F.max_pool2d(m, 3, 1, 1)[0, 0].numpy() > 0
    xs = np.nonzero(whole)[1]
    half = whole.copy()
    half[:, int(np.median(xs)) :] = False
    far = ~(F.max_pool2d(m, 25, 1, 12)[0, 0].numpy() > 0)
    rng = np.random.default_rng(0)
    extra = far & (rng.random(far.shape) < whole.sum() / max(far.sum(), 1))
    as_map = lambda a: torch.from_numpy(a.astype(np.float32))[None]
    return {
        "object": as_map(whole),
        "half": as_map(half),
        "object+background": as_map(whole | extra),
    }


def test_irrelevance_matters(demo, samples):
    """Seed 5.1: half of the object scores lower than the whole object, and the object plus
    background lower than the object alone: on at least 70% of the images, with a negative
    median paired difference."""
    half_diff, background_diff = [], []
    for sample in samples:
        scores = {k: _apem(demo, sample, m).apem for k, m in _object_maps(sample.mask).items()}
        half_diff.append(scores["half"] - scores["object"])
        background_diff.append(scores["object+background"] - scores["object"])
    half_diff, background_diff = np.asarray(half_diff), np.asarray(background_diff)
    print(
        f"\nhalf < object in {np.mean(half_diff < 0):.0%} (median diff "
        f"{np.median(half_diff):.1f}); object+background < object in "
        f"{np.mean(background_diff < 0):.0%} (median diff {np.median(background_diff):.1f}); "
        f"{len(half_diff)} images"
    )
    assert np.mean(half_diff < 0) >= 0.7 and np.median(half_diff) < 0
    assert np.mean(background_diff < 0) >= 0.7 and np.median(background_diff) < 0


def test_filter_never_lowers_apem_beyond_resolution(demo, samples):
    for sample in samples[:6]:
        relevance = relevance_from_map(_map(demo, "saliency", sample))
        budget = Budget(10**9)
        forward = TorchForward(demo.module, budget, 64)
        record = filter_map(
            forward,
            demo.module,
            torch.from_numpy(sample.image),
            sample.label,
            relevance,
            ReliabilityRequest(),
            request=FilterRequest(),
            budget=budget,
        )
        slack = 0.01 * 2 * max(abs(record.apem_before), abs(record.apem_after)) + 1e-9
        assert record.apem_after >= record.apem_before - slack
        assert 0 < record.kept_fraction <= 1
