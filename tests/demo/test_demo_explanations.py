"""Properties of explanations and APEM on the trained demo model (seed 004, chapter 5),
and the relevance mass of maps inside the objects' ground-truth masks.

The demo model is trained on each machine, and training is bit-for-bit deterministic only on
one CPU: another instruction set (AVX2 against AVX-512 kernels) trains a different model.
So every threshold here is set from the spread over independently trained models (eight of
them: other training seeds and other kernels), with a margin the per-image sampling cannot
cross; docs/statistical-tests.md has the measured values. Searches that see no flip up to
eps_max (censored) give no APEM comparison, so the paired comparisons count only the images
where every search flipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xaiserve.api.types import FilterRequest, ReliabilityRecord, ReliabilityRequest
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import get_method
from xaiserve.model_store import synthetic
from xaiserve.reliability.apem import apem
from xaiserve.reliability.filter import filter_map
from xaiserve.reliability.options import (
    DEFAULT_RESOLUTION,
    resolve_filter_options,
    resolve_options,
)
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.score import relevance_from_map, shuffled
from xaiserve.runtime.forward.counted import Budget, TorchForward
from xaiserve.runtime.model import ServedModel, load_model_dir

SEED = 777  # neither the training nor the held-out seed
N_MASS = 32
N_SHUFFLED = 32
N_IRRELEVANCE = 80
N_FILTER = 6
MASS_THRESHOLDS = {"grad_cam": (1.5, 1.5, 0.7), "occlusion": (1.5, 1.0, 0.5)}
"""(mass in mask / area, median per-image ratio, share of images above uniform) per method.
Occlusion's 8 x 8 windows smear small objects: about 77% of images put more than the
uniform share inside the mask (73-81% over the models), so only a majority is asserted."""


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path) -> ServedModel:
    return load_model_dir(demo_model_dir)


@pytest.fixture(scope="module")
def samples(demo: ServedModel) -> list[synthetic.Sample]:
    """Correctly classified images of a fresh draw, as many as the largest test uses."""
    wanted = max(N_MASS, N_SHUFFLED, N_IRRELEVANCE, N_FILTER)
    chosen = []
    for i in range(2 * wanted):
        sample = synthetic.make_sample(SEED, i)
        with torch.no_grad():
            predicted = int(demo.module(torch.from_numpy(sample.image)[None]).argmax())
        if predicted == sample.label:
            chosen.append(sample)
        if len(chosen) == wanted:
            return chosen
    raise AssertionError(f"only {len(chosen)} of {2 * wanted} images classified correctly")


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
    options = resolve_options(ReliabilityRequest(shuffles=shuffles), x.numel())
    return apem(Probe.of(forward, demo.module, x, sample.label, budget), relevance, options)


def _informative(*records: ReliabilityRecord) -> bool:
    """Every search of every record flipped (APEM defined and not a censored bound)."""
    return all(
        np.isfinite(r.apem) and not r.eps_minus_censored and not r.eps_plus_censored
        for r in records
    )


@pytest.mark.parametrize("name", ["grad_cam", "occlusion"])
def test_relevance_mass_inside_object_beats_uniform(demo, samples, name):
    """Mass of the one-channel map inside the object mask versus the mask's area fraction
    (what a uniform map would put there), over correctly classified images."""
    inside, area = [], []
    for sample in samples[:N_MASS]:
        heat = _map(demo, name, sample).numpy()[0]
        inside.append(heat[sample.mask].sum() / heat.sum())
        area.append(sample.mask.mean())
    ratios = np.asarray(inside) / np.asarray(area)
    print(
        f"\n{name}: mass in mask {np.mean(inside):.3f} vs uniform {np.mean(area):.3f} "
        f"(x{np.mean(inside) / np.mean(area):.2f}); per image median x{np.median(ratios):.2f}, "
        f"above uniform in {np.mean(ratios > 1):.0%} of {len(ratios)} images"
    )
    least_mass, least_median, least_share = MASS_THRESHOLDS[name]
    assert np.mean(inside) > least_mass * np.mean(area)
    assert np.median(ratios) > least_median
    assert np.mean(ratios > 1.0) >= least_share


def test_shuffled_maps_score_near_zero_and_below_real_maps(demo, samples):
    """Seed 5.2: a shuffled map's APEM_norm is near 0 (median within +-0.15); the real
    gradient map scores higher than its shuffled copy on at least 2/3 of the images where
    all four searches flip (a broken ordering, a coin flip per image, passes 2.5-4% of the
    time; the worst trained model measured wins on 89% of its images and fails 4e-4)."""
    generator = torch.Generator().manual_seed(0)
    shuffled_norms, wins, informative = [], [], 0
    for sample in samples[:N_SHUFFLED]:
        relevance = relevance_from_map(_map(demo, "saliency", sample))
        real = _apem(demo, sample, relevance)
        copy = shuffled(relevance, generator)
        fake = _apem(demo, sample, copy, shuffles=4)
        shuffled_norms.append(fake.apem_norm)
        if _informative(real, fake):
            informative += 1
            wins.append(real.apem > fake.apem)
    median = float(np.nanmedian(np.asarray(shuffled_norms, dtype=float)))
    print(
        f"\nshuffled APEM_norm median {median:.3f}; real > shuffled in {np.mean(wins):.0%} "
        f"of {informative} images where every search flipped ({N_SHUFFLED} images)"
    )
    assert abs(median) <= 0.15
    assert informative >= N_SHUFFLED / 2
    assert np.mean(wins) >= 2 / 3


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
    """Seed 5.1, over the images where every search of the three maps flips: the object
    plus background scores lower than the object alone on at least 60% of them, and half of
    the object lower than the whole object on most of them (negative median differences).

    The half map loses mostly through eps_plus (the missing half is perturbed as irrelevant);
    its eps_minus is a coin flip, so per image the half scores lower on only 70-92% of the
    images, depending on the trained model: hence a majority, over 80 images."""
    half_diff, background_diff = [], []
    for sample in samples[:N_IRRELEVANCE]:
        records = {k: _apem(demo, sample, m) for k, m in _object_maps(sample.mask).items()}
        if not _informative(*records.values()):
            continue
        scores = {k: r.apem for k, r in records.items()}
        half_diff.append(scores["half"] - scores["object"])
        background_diff.append(scores["object+background"] - scores["object"])
    half_diff, background_diff = np.asarray(half_diff), np.asarray(background_diff)
    print(
        f"\nhalf < object in {np.mean(half_diff < 0):.0%} (median diff "
        f"{np.median(half_diff):.1f}); object+background < object in "
        f"{np.mean(background_diff < 0):.0%} (median diff {np.median(background_diff):.1f}); "
        f"{len(half_diff)} of {N_IRRELEVANCE} images where every search flipped"
    )
    assert len(half_diff) >= N_IRRELEVANCE / 4
    assert np.mean(background_diff < 0) >= 0.6 and np.median(background_diff) < 0
    assert np.median(half_diff) < 0


def test_filter_never_lowers_apem_beyond_resolution(demo, samples):
    """The filtered map's APEM is not below the original's beyond what the two search
    brackets blur: resolution * (eps_plus of the original + eps_minus of the result)
    (``apem_filter``'s guarantee; the eps values from scoring both maps again)."""
    for sample in samples[:N_FILTER]:
        relevance = relevance_from_map(_map(demo, "saliency", sample))
        budget = Budget(10**9)
        forward = TorchForward(demo.module, budget, 64)
        x = torch.from_numpy(sample.image)
        options = resolve_options(ReliabilityRequest(), x.numel())
        record = filter_map(
            Probe.of(forward, demo.module, x, sample.label, budget),
            relevance,
            options,
            resolve_filter_options(FilterRequest(), options),
        )
        before = _apem(demo, sample, relevance)
        after = _apem(demo, sample, torch.from_numpy(record.map))
        slack = DEFAULT_RESOLUTION * (before.eps_plus + after.eps_minus)
        assert record.apem_after >= record.apem_before - slack
        assert 0 < record.kept_fraction <= 1
