"""The one registry mapping method names (the proto enum names, lower-cased) to classes."""

from __future__ import annotations

from ..errors import InvalidArgument
from .auto import Auto
from .base import AttributionMethod
from .deconvolution import Deconvolution
from .deeplift import DeepLift
from .fullgrad import FullGrad
from .grad_cam import GradCam
from .grad_cam_plus_plus import GradCamPlusPlus
from .guided_backprop import GuidedBackprop
from .guided_grad_cam import GuidedGradCam
from .hires_cam import HiResCam
from .input_x_gradient import InputXGradient
from .integrated_gradients import IntegratedGradients
from .kernel_shap import KernelShap
from .layer_cam import LayerCam
from .lime import Lime
from .lrp import Lrp
from .occlusion import Occlusion
from .rise import Rise
from .s_grad_cam import SGradCam
from .s_grad_cam_pixel import SGradCamPixel
from .s_grad_cam_plus_plus import SGradCamPlusPlus
from .s_xgrad_cam import SXGradCam
from .saliency import Saliency
from .score_cam import ScoreCam
from .smoothgrad import SmoothGrad
from .vargrad import VarGrad
from .xgrad_cam import XGradCam

METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls
    for cls in (
        Saliency, InputXGradient, SmoothGrad, IntegratedGradients, GradCam, Occlusion,
        GuidedBackprop, Deconvolution, DeepLift, Lrp, GradCamPlusPlus, XGradCam, HiResCam,
        LayerCam, FullGrad, GuidedGradCam, VarGrad, Lime, KernelShap, ScoreCam, Rise, Auto,
        SGradCam, SXGradCam, SGradCamPlusPlus, SGradCamPixel,
    )
}


def get_method(name: str, field: str = "method") -> AttributionMethod:
    """An instance of the method called ``name``; InvalidArgument naming ``field`` if unknown."""
    cls = METHODS.get(name)
    if cls is None:
        raise InvalidArgument(field, f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return cls()
