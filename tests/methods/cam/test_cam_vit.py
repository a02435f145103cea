"""The CAM family on a vision transformer: the CAM layer is a block, whose tokens
(N x 17 x 16: a class token and a 4 x 4 patch grid) ``hooks.captured`` reshapes to a map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from support.method_models import served_from_net
from support.tiny_models import make_context
from support.vit_models import VIT_MEAN, VIT_STD, vit_served, write_vit_model_dir
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.methods.cam.grad_cam import layer_activations_and_gradients
from xaiserve.methods.cam.score_cam import layer_channels
from xaiserve.methods.hooks import token_grid
from xaiserve.methods.registry import METHODS, get_method
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.model import load_model_dir


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_grid_is_found_from_the_tokens_and_the_input_size():
    assert token_grid(17, (16, 16)) == (1, 4, 4)  # class token + 4 x 4 patches of 4
    assert token_grid(16, (16, 16)) == (0, 4, 4)  # no class token
    assert token_grid(9, (32, 64)) == (1, 2, 4)  # 16-pixel patches of a wide image
    assert token_grid(18, (16, 16)) == (2, 4, 4)  # class and distillation tokens
    assert token_grid(20, (16, 16)) is None
    assert token_grid(17, (4, 4, 4)) is None


def test_grad_cam_equals_the_hand_computation():
    served = vit_served()
    net = served.module.net
    x, target = images(), torch.tensor([0, 2])
    tokens: list[torch.Tensor] = []
    handle = net.blocks[1].register_forward_hook(lambda _m, _i, out: tokens.append(out))
    try:
        logits = net(((x - VIT_MEAN) / VIT_STD).requires_grad_(True))  # frozen weights
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), tokens[0])
    acts = tokens[0][:, 1:].detach().transpose(1, 2).reshape(2, 16, 4, 4)
    grads = grad[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    layer_map = torch.relu((weights * acts).sum(dim=1, keepdim=True))
    expected = F.interpolate(layer_map, size=(16, 16), mode="bilinear", align_corners=False)

    got_acts, got_grads = layer_activations_and_gradients(make_context(served), x, target)
    assert torch.allclose(got_acts, acts, atol=1e-6)
    assert torch.allclose(got_grads, grads, atol=1e-7)
    got = get_method("grad_cam").attribute(make_context(served), x, target, {})
    assert got.shape == (2, 1, 16, 16)
    assert expected.amax() > 1e-3  # a map that is not all zero
    assert torch.allclose(got, expected, atol=1e-5)


class ToGrid(nn.Module):
    """Tokens N x 17 x D -> the 4 x 4 patch grid N x D x 4 x 4, class token kept aside."""

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, d = tokens.shape
        return tokens[:, :1], tokens[:, 1:].transpose(1, 2).reshape(n, d, 4, 4)


class GridBlock(nn.Module):
    """A block whose output passes through an explicit grid module Captum can hook."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.grid = block, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, grid = ToGrid()(self.block(x))
        grid = self.grid(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


def test_grad_cam_equals_captums_layer_grad_cam_on_the_reshaped_output():
    served = vit_served()
    x, target = images(3, seed=4), torch.tensor([1, 0, 2])
    ours = get_method("grad_cam").attribute(make_context(served), x, target, {})

    net = served.module.net
    wrapped = GridBlock(net.blocks[1])
    net.blocks[1] = wrapped
    try:
        captum = LayerGradCam(served.module, wrapped.grid).attribute(
            x, target=target, relu_attributions=True
        )
    finally:
        net.blocks[1] = wrapped.block
    captum = F.interpolate(captum, size=(16, 16), mode="bilinear", align_corners=False)
    assert captum.amax() > 1e-3
    assert torch.allclose(ours, captum, atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.needs_layer))
def test_every_layer_method_maps_the_vit_or_says_why(name):
    served = vit_served()
    method = get_method(name)
    reason = method.unsupported_reason(served)
    if name == "guided_grad_cam":  # guided backpropagation needs nn.ReLU; the ViT has GELU
        assert reason is not None and "nn.ReLU" in reason
        return
    if name.startswith("s_"):  # the calibrated methods need a calibration file
        assert reason is not None
        return
    if name == "hires_cam":  # ~zero on a pre-norm ViT: see the test below
        return
    assert reason is None
    x, target = images(), torch.tensor([0, 1])
    got = method.attribute(make_context(served), x, target, {})
    assert got.shape == (2, 1, 16, 16)
    assert torch.isfinite(got).all()
    assert (got.flatten(1).amax(1) > 0).all()


def test_the_vit_serves_from_a_model_directory(tmp_path):
    served = load_model_dir(write_vit_model_dir(tmp_path / "vit"))
    assert type(served.cam_layer).__name__ == "Block"
    x, target = images(1), torch.tensor([2])
    got = get_method("grad_cam").attribute(make_context(served), x, target, {})
    expected = get_method("grad_cam").attribute(make_context(vit_served()), x, target, {})
    assert torch.allclose(got, expected, atol=1e-6)


def test_hires_cam_is_zero_on_a_pre_norm_vit():
    """The patch tokens of blocks.1 reach the output only through LayerNorms (pre-norm
    blocks, final norm on the class token), which are scale invariant: f(alpha A) = f(A),
    but for their eps, so per position sum_k G_k A_k = d f(alpha A) / d alpha ~ 0 (Euler),
    and HiResCAM's map is noise far below Grad-CAM's."""
    served = vit_served()
    x, target = images(), torch.tensor([0, 1])
    hires = get_method("hires_cam").attribute(make_context(served), x, target, {})
    grad_cam = get_method("grad_cam").attribute(make_context(served), x, target, {})
    acts, grads = layer_activations_and_gradients(make_context(served), x, target)
    per_position = (acts * grads).sum(dim=1).abs()
    assert per_position.max() < 1e-3 * (acts.abs() * grads.abs()).sum(dim=1).max()
    assert hires.abs().max() < 1e-4 * grad_cam.abs().max()


class SevenTokens(nn.Module):
    """Patches of 4 (16 tokens), the first 7 kept: a token layer (``mix``) that is no class
    token and patch grid of the 16 x 16 input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.mix = nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)[:, :7]
        return self.head(self.mix(tokens).mean(dim=1))


def test_a_token_layer_without_a_patch_grid_is_refused_with_the_reason():
    served = served_from_net(SevenTokens(), (3, 16, 16), cam_layer="mix")
    expected = (
        "cam_layer mix: the layer outputs 7 tokens, which are not a class token and a "
        "patch grid of the 16 x 16 input"
    )
    for name in ("grad_cam", "layer_cam", "score_cam"):
        assert get_method(name).unsupported_reason(served) == expected
    assert layer_channels(served) == 0
    engine = Engine(
        {"net": served}, EngineLimits(), ForwardConfig(backend="torch", export_on_load=False)
    )
    (info,) = engine.list_models()
    assert f"grad_cam: {expected}" in info.unsupported_methods
    assert "saliency" in info.methods
