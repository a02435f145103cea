"""The one registry mapping method names (:mod:`xaiserve.api.catalog`: the proto enum names,
lower-cased) to classes. It serves exactly the catalog's methods
(``tests/methods/test_registry.py``)."""

from __future__ import annotations

from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.attention.attention_rollout import AttentionRollout
from xaiserve.methods.auto import Auto
from xaiserve.methods.base import AttributionMethod
from xaiserve.methods.calibrated.s_grad_cam import SGradCam
from xaiserve.methods.calibrated.s_grad_cam_pixel import SGradCamPixel
from xaiserve.methods.calibrated.s_grad_cam_plus_plus import SGradCamPlusPlus
from xaiserve.methods.calibrated.s_xgrad_cam import SXGradCam
from xaiserve.methods.cam.grad_cam import GradCam
from xaiserve.methods.cam.grad_cam_plus_plus import GradCamPlusPlus
from xaiserve.methods.cam.guided_grad_cam import GuidedGradCam
from xaiserve.methods.cam.hires_cam import HiResCam
from xaiserve.methods.cam.layer_cam import LayerCam
from xaiserve.methods.cam.score_cam import ScoreCam
from xaiserve.methods.cam.xgrad_cam import XGradCam
from xaiserve.methods.gradient.deconvolution import Deconvolution
from xaiserve.methods.gradient.deeplift import DeepLift
from xaiserve.methods.gradient.fullgrad import FullGrad
from xaiserve.methods.gradient.guided_backprop import GuidedBackprop
from xaiserve.methods.gradient.input_x_gradient import InputXGradient
from xaiserve.methods.gradient.integrated_gradients import IntegratedGradients
from xaiserve.methods.gradient.saliency import Saliency
from xaiserve.methods.gradient.smoothgrad import SmoothGrad
from xaiserve.methods.gradient.vargrad import VarGrad
from xaiserve.methods.lrp.lrp import Lrp
from xaiserve.methods.perturbation.kernel_shap import KernelShap
from xaiserve.methods.perturbation.lime import Lime
from xaiserve.methods.perturbation.occlusion import Occlusion
from xaiserve.methods.perturbation.rise import Rise

METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls
    for cls in (
        Saliency,
        InputXGradient,
        SmoothGrad,
        IntegratedGradients,
        GradCam,
        Occlusion,
        GuidedBackprop,
        Deconvolution,
        DeepLift,
        Lrp,
        GradCamPlusPlus,
        XGradCam,
        HiResCam,
        LayerCam,
        FullGrad,
        GuidedGradCam,
        VarGrad,
        Lime,
        KernelShap,
        ScoreCam,
        Rise,
        Auto,
        SGradCam,
        SXGradCam,
        SGradCamPlusPlus,
        SGradCamPixel,
        AttentionRollout,
    )
}


def get_method(name: str, field: str = "method") -> AttributionMethod:
    """An instance of the method called ``name``; InvalidArgument naming ``field`` if unknown."""
    cls = METHODS.get(name)
    if cls is None:
        raise InvalidArgument(field, f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return cls()
