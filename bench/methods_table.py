"""The method catalog against Captum, and what each method costs.

    python bench/methods_table.py [--repeats 3] [--threads 1] [--skip-resnet]

(a) Captum comparison: for every method Captum also has, the max abs difference between
ours and Captum's on the same model, images and targets, on the raw map and on the
one-channel map; on the tiny test model and, when ``var/test-cache/demo/config.yaml``
exists, on the demo model (build it with ``python -m xaiserve.model_store.build_demo
--out var/test-cache/demo``). LIME and KernelSHAP get Captum the same masks and an exact
weighted least-squares surrogate (Captum's default Lasso needs scikit-learn). The notes say
where a difference is expected: Captum's DeepLift reads the plain max-pool gradient where a
ReLU feeds a max pool directly (the demo model), and Captum's LRP treats BatchNorm as its
own layer and divides by the normalization's std.

(b) Time per method (median of ``--repeats`` runs of one image) and forward passes, on the
demo model at 64 x 64 and on the ResNet-18-shaped network (width 64, random weights) at
224 x 224, with the modest parameters in ``TIMING_PARAMS``. The machine is shared: times
are indicative, forward passes are exact.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum._utils.models.model import Model
from captum.attr import (
    LRP,
    Deconvolution,
    DeepLift,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    LayerAttribution,
    LayerGradCam,
    Lime,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.resnets import resnet18_served  # noqa: E402
from support.tiny_models import make_context, tiny_served  # noqa: E402
from xaiserve.engine.postprocess import apply_stage  # noqa: E402
from xaiserve.methods.perturbation.superpixels import grid_segments  # noqa: E402
from xaiserve.methods.registry import METHODS, get_method  # noqa: E402
from xaiserve.runtime.model import ModelConfig, PixelSpaceModel, ServedModel, load_model_dir  # noqa: E402

DEMO_DIR = REPO / "var" / "test-cache" / "demo"
SURROGATE = {"samples": 48, "segments": 16, "baseline": 0.5, "seed": 3}
TIMING_PARAMS: dict[str, dict[str, float]] = {
    "smoothgrad": {"samples": 8},
    "vargrad": {"samples": 8},
    "integrated_gradients": {"steps": 16},
    "occlusion": {"window": 16, "stride": 16},
    "lime": {"samples": 64, "segments": 16},
    "kernel_shap": {"samples": 64, "segments": 16},
    "rise": {"masks": 64, "cells": 7},
}
"""Modest parameters for the timing table (defaults for the other methods)."""


class ExactWeightedLeastSquares(Model):
    """Weighted least squares with intercept (float64 normal equations) for Captum's Lime."""

    def fit(self, train_data, **kwargs):
        z, y, w = (torch.cat(t).double().numpy() for t in zip(*train_data, strict=True))
        design = np.hstack([np.ones((len(z), 1)), z])
        self.coef = np.linalg.solve(design.T @ (design * w[:, None]), design.T @ (w * y.ravel()))[
            1:
        ]

    def representation(self) -> torch.Tensor:
        return torch.tensor(self.coef, dtype=torch.float32).view(1, -1)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z.double() @ torch.tensor(self.coef)


def _surrogate(served: ServedModel, name: str) -> tuple[Callable[..., torch.Tensor], dict]:
    method = get_method(name)
    spatial = served.config.spatial
    labels, cells = grid_segments(spatial, SURROGATE["segments"])
    z = method.sample(cells, SURROGATE["samples"], torch.Generator().manual_seed(SURROGATE["seed"]))

    def masks(_inputs, **_kwargs):
        yield from (row.view(1, -1) for row in z)

    if name == "lime":
        captum = Lime(
            served.module,
            ExactWeightedLeastSquares(),
            perturb_func=masks,
            similarity_func=lambda _x, _p, s, **_k: method.weights(s.long()),
        )
    else:
        captum = KernelShap(served.module)
        captum.interpretable_model, captum.perturb_func = ExactWeightedLeastSquares(), masks

    def run(x, t):
        return captum.attribute(
            x,
            target=t,
            baselines=SURROGATE["baseline"],
            n_samples=SURROGATE["samples"],
            perturbations_per_eval=16,
            feature_mask=labels.view(1, 1, *spatial),
        )

    return run, dict(SURROGATE)


def captum_references(served: ServedModel, side: int) -> dict[str, tuple[str, Callable, dict]]:
    """name -> (Captum class, (x, target) -> Captum's map, our params)."""
    m, layer = served.module, served.cam_layer

    def up(cam):
        return LayerAttribution.interpolate(cam, (side, side), interpolate_mode="bilinear")

    refs = {
        "saliency": ("Saliency", lambda x, t: Saliency(m).attribute(x, target=t, abs=False), {}),
        "input_x_gradient": (
            "InputXGradient",
            lambda x, t: InputXGradient(m).attribute(x, target=t),
            {},
        ),
        "integrated_gradients": (
            "IntegratedGradients",
            lambda x, t: IntegratedGradients(m).attribute(
                x, baselines=0.25, target=t, n_steps=16, method="gausslegendre"
            ),
            {"steps": 16, "baseline": 0.25},
        ),
        "grad_cam": (
            "LayerGradCam",
            lambda x, t: up(LayerGradCam(m, layer).attribute(x, target=t, relu_attributions=True)),
            {},
        ),
        "occlusion": (
            "Occlusion",
            lambda x, t: Occlusion(m).attribute(
                x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), baselines=0.5, target=t
            ),
            {"window": 8, "stride": 8, "baseline": 0.5},
        ),
        "guided_backprop": (
            "GuidedBackprop",
            lambda x, t: GuidedBackprop(m).attribute(x, target=t),
            {},
        ),
        "deconvolution": (
            "Deconvolution",
            lambda x, t: Deconvolution(m).attribute(x, target=t),
            {},
        ),
        "deeplift": (
            "DeepLift",
            lambda x, t: DeepLift(m).attribute(x, baselines=0.2, target=t),
            {"baseline": 0.2},
        ),
        "lrp": ("LRP", lambda x, t: LRP(m).attribute(x, target=t), {"epsilon": 1e-9}),
        "guided_grad_cam": (
            "GuidedGradCam",
            lambda x, t: GuidedGradCam(m, layer).attribute(
                x, target=t, interpolate_mode="bilinear"
            ),
            {},
        ),
    }
    for name in ("lime", "kernel_shap"):
        run, params = _surrogate(served, name)
        refs[name] = ("Lime" if name == "lime" else "KernelShap", run, params)
    return refs


def _one_image_noise_refs(served: ServedModel) -> dict[str, tuple[str, Callable, dict]]:
    """SmoothGrad and VarGrad: one image, Captum's noise after torch.manual_seed(seed)."""
    refs = {}
    for name, kind in (("smoothgrad", "smoothgrad"), ("vargrad", "vargrad")):

        def run(x, t, kind=kind):
            torch.manual_seed(11)
            return NoiseTunnel(Saliency(served.module)).attribute(
                x,
                nt_type=kind,
                nt_samples=6,
                stdevs=float((x.max() - x.min()) * 0.1),
                target=t,
                abs=False,
            )

        refs[name] = (f"NoiseTunnel({kind})", run, {"samples": 6, "noise_level": 0.1, "seed": 11})
    return refs


NOTES = {
    ("demo", "deeplift"): "ReLU feeds MaxPool directly: Captum's ReLU hook reads the plain "
    "max-pool gradient (see the separated row)",
    ("demo", "lrp"): "BatchNorm: merged here, own epsilon layer in Captum; Captum divides "
    "by std (see the plain row)",
    ("tiny", "lrp"): "Captum divides by std and passes the functional mean pooling a plain "
    "gradient (see the plain row)",
}


class Unhooked(torch.nn.Module):
    """x * 1 between a ReLU and a max pool: two tensors, so Captum's hooks do not collide."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def separated(served: ServedModel) -> ServedModel:
    """A copy of ``served`` with ``Unhooked`` after every ReLU that feeds a max pool."""
    net = copy.deepcopy(served.module.net)
    for parent in list(net.modules()):
        if isinstance(parent, torch.nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], torch.nn.ReLU) and isinstance(
                    parent[i + 1], torch.nn.MaxPool2d
                ):
                    parent[i] = torch.nn.Sequential(parent[i], Unhooked())
    return _serve(net, served.config)


class PlainNet(torch.nn.Module):
    """Conv-ReLU-MaxPool-Conv-ReLU-AvgPool-Linear, served with mean 0 and std 1: every
    layer has the same LRP rule in Captum and here."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(6, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _serve(net: torch.nn.Module, cfg: ModelConfig) -> ServedModel:
    module = PixelSpaceModel(net, cfg.mean, cfg.std).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    layer = net.get_submodule(cfg.cam_layer) if cfg.cam_layer else None
    return ServedModel(cfg, module, layer, Path("."))


def plain_served() -> ServedModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        "plain",
        "1",
        "model.py",
        "PlainNet",
        {},
        "weights.pt",
        (3, 16, 16),
        (0.0,) * 3,
        (1.0,) * 3,
        ("a", "b", "c"),
        "",
    )
    return _serve(PlainNet(), cfg)


def compare(label: str, served: ServedModel, x: torch.Tensor, target: torch.Tensor) -> list[tuple]:
    rows = []
    side = served.config.spatial[-1]
    refs = captum_references(served, side)
    for name, (cls, run, params) in refs.items():
        rows.append(_row(label, served, name, cls, run, params, x, target))
    for name, (cls, run, params) in _one_image_noise_refs(served).items():
        rows.append(_row(label, served, name, cls, run, params, x[:1], target[:1]))
    return rows


def _row(label, served, name, cls, run, params, x, target) -> tuple:
    method = get_method(name)
    ours = method.attribute(
        make_context(served),
        x,
        target,
        method.resolve_params(params, served.config.input_shape, name),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = run(x, target).detach()
    raw = (ours - ref).abs().max().item()
    one = (
        (apply_stage(ours, x, "one_channel") - apply_stage(ref, x, "one_channel"))
        .abs()
        .max()
        .item()
    )
    return (label, name, cls, raw, one, NOTES.get((label, name), ""))


def resnet224() -> ServedModel:
    return resnet18_served(224, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def timings(label: str, served: ServedModel, repeats: int) -> list[tuple]:
    x = torch.rand(1, *served.config.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = served.module(x).argmax(1)
    rows = []
    for name, cls in METHODS.items():
        if name == "auto" or name.startswith("s_") or cls().unsupported_reason(served):
            continue
        method = cls()
        params = method.resolve_params(TIMING_PARAMS.get(name, {}), served.config.input_shape, name)
        times, passes = [], 0
        for _ in range(repeats):
            ctx = make_context(served, max_batch=16)
            start = time.perf_counter()
            method.attribute(ctx, x, target, params)
            times.append(time.perf_counter() - start)
            passes = ctx.budget.spent
        rows.append((label, name, statistics.median(times), passes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-resnet", action="store_true", help="no 224 x 224 timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    served = {"tiny": tiny_served()}
    inputs = {"tiny": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))}
    if (DEMO_DIR / "config.yaml").exists():
        served["demo"] = load_model_dir(DEMO_DIR)
        inputs["demo"] = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    else:
        print(f"(no demo model at {DEMO_DIR}: the demo rows are left out)")

    print("## Captum comparison (max abs difference, 2 images; noise methods 1 image)\n")
    print("| model | method | Captum class | raw | one_channel | note |\n|---|---|---|---|---|---|")
    rows = []
    for label, model in served.items():
        rows += compare(label, model, inputs[label], torch.tensor([2, 0]))
    plain = plain_served()
    lrp = captum_references(plain, 16)["lrp"]
    rows.append(_row("plain", plain, "lrp", *lrp, inputs["tiny"], torch.tensor([2, 0])))
    if "demo" in served:
        demo = separated(served["demo"])
        deeplift = captum_references(demo, 64)["deeplift"]
        rows.append(
            _row(
                "demo, separated", demo, "deeplift", *deeplift, inputs["demo"], torch.tensor([2, 0])
            )
        )
    for row in rows:
        print("| {} | {} | {} | {:.2e} | {:.2e} | {} |".format(*row))

    print(f"\n## Time per method (median of {args.repeats}, one image, {args.threads} thread(s))\n")
    print("| model | method | seconds | forward passes |\n|---|---|---|---|")
    targets = {k: v for k, v in served.items() if k == "demo"}
    if not args.skip_resnet:
        targets["resnet18 224"] = resnet224()
    for label, model in targets.items():
        for row in timings(label, model, args.repeats):
            print("| {} | {} | {:.3f} | {} |".format(*row), flush=True)


if __name__ == "__main__":
    main()
