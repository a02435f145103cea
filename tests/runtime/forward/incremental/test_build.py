"""Building occluders: cuts inside blocks and valid stages give the logits of full passes,
export failures fall back to torch, untraceable models get a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from support.occluder_models import BACKENDS, all_corners, pixel_model, small_resnet18
from support.tiny_models import tiny_served
from xaiserve.methods.perturbation.occlusion import window_starts
from xaiserve.runtime.forward.incremental.build import build_occluder
from xaiserve.runtime.model import PixelSpaceModel


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_with_cuts_inside_blocks_give_exact_logits(backend):
    module = small_resnet18()
    axes, corners = all_corners((3, 64, 64), 9, 4)
    joined, reason = build_occluder(module, (3, 64, 64), 9, axes, backend, joins_worth_it=1.0)
    plain, _ = build_occluder(module, (3, 64, 64), 9, axes, backend, joins_worth_it=0.0)
    assert joined is not None, reason
    assert len(joined.plan.stages) > len(plain.plan.stages)  # the joined plan was taken
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    occluded = x.expand(len(corners), 3, 64, 64).clone()
    for j, (a, b) in enumerate(corners):
        occluded[j, :, a : a + 9, b : b + 9] = 0.25
    activations, _ = joined.original(x)
    got = torch.cat(
        [joined.logits(activations, corners[s : s + 32], 0.25) for s in range(0, len(corners), 32)]
    )
    with torch.no_grad():
        assert (got - module(occluded)).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ("torch", "onnxruntime"))
@pytest.mark.parametrize(
    "name,shape,window,stride",
    [
        ("resnet18", (3, 64, 64), 9, 4),
        ("resnet18", (3, 40, 36), 7, 5),  # not square, border-flush windows
        ("tiny", (3, 16, 16), 4, 2),
    ],
)
def test_occluders_with_valid_stages_give_the_logits_of_full_passes(
    backend, name, shape, window, stride
):
    module = small_resnet18() if name == "resnet18" else tiny_served().module
    axes = [window_starts(n, window, stride) for n in shape[1:]]
    corners = [(a, b) for a in axes[0] for b in axes[1]]
    joins = 1.0 if name == "resnet18" else 0.0  # cuts inside blocks: one layer a stage
    valid, reason = build_occluder(module, shape, window, axes, backend, joins_worth_it=joins)
    padded_only, _ = build_occluder(
        module, shape, window, axes, backend, joins_worth_it=joins, valid_windows=False
    )
    assert valid is not None, reason
    assert padded_only.valid_stages == 0 and valid.valid_stages >= 1
    if name == "resnet18":
        assert valid.valid_stages == len(valid.plan.stages)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(4))
    occluded = x.expand(len(corners), *shape).clone()
    for j, (a, b) in enumerate(corners):
        occluded[j, :, a : a + window, b : b + window] = 0.25
    got = {}
    for label, occluder in (("valid", valid), ("padded", padded_only)):
        activations, _ = occluder.original(x)
        got[label] = torch.cat(
            [
                occluder.logits(activations, corners[s : s + 16], 0.25)
                for s in range(0, len(corners), 16)
            ]
        )
    with torch.no_grad():
        expected = module(occluded)
    tolerance = 1e-5 if backend == "torch" else 1e-4
    assert (got["valid"] - expected).abs().max() <= tolerance
    assert (got["valid"] - got["padded"]).abs().max() <= tolerance
    # the first stage's input is padded in pixels with what normalizes to zero
    first = valid.valid[0]
    if isinstance(module, PixelSpaceModel) and first.fill == 0.0:
        np.testing.assert_allclose(valid.fills[0], module.mean.reshape(-1).numpy(), rtol=1e-6)


def test_whole_image_stages_fall_back_to_torch_when_their_export_fails(monkeypatch, caplog):
    export = torch.onnx.export

    def fails_on_whole_images(module: nn.Module, args: tuple, *rest, **kwargs) -> None:
        if tuple(args[0].shape[1:]) == (3, 64, 64):  # the stages on crops export
            raise RuntimeError("for the test")
        export(module, args, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fails_on_whole_images)
    module = small_resnet18()
    axes, corners = all_corners((3, 64, 64), 9, 4)
    with caplog.at_level("WARNING"):
        occluder, reason = build_occluder(module, (3, 64, 64), 9, axes, "onnxruntime")
    assert occluder is not None, reason
    assert "whole-image stages run on torch" in caplog.text
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    occluded = x.expand(4, 3, 64, 64).clone()
    for j, (a, b) in enumerate(corners[:4]):
        occluded[j, :, a : a + 9, b : b + 9] = 0.25
    activations, original = occluder.original(x)
    with torch.no_grad():
        assert (
            occluder.logits(activations, corners[:4], 0.25) - module(occluded)
        ).abs().max() <= 1e-4
        assert (original - module(x)).abs().max() <= 1e-4


def test_a_grid_of_fewer_windows_than_the_check_samples():
    # 2 x 2 windows (the check looks at up to CHECK_WINDOWS of them)
    axes = [window_starts(64, 16, 16)[::3]] * 2
    assert axes[0] == [0, 48]
    occluder, reason = build_occluder(small_resnet18(), (3, 64, 64), 16, axes, "torch")
    assert occluder is not None, reason


def test_untraceable_model_gets_no_occluder_and_a_reason():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = -y
            return self.fc(y.mean(dim=(2, 3)))

    axes, _ = all_corners((3, 16, 16), 4, 2)
    occluder, reason = build_occluder(pixel_model(Branchy()), (3, 16, 16), 4, axes, "torch")
    assert occluder is None and "not traceable" in reason
