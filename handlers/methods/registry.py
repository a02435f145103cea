"""The one registry mapping method names (the proto enum names, lower-cased) to classes."""

from __future__ import annotations

from ..errors import InvalidArgument
from .base import AttributionMethod
from .grad_cam import GradCam
from .input_x_gradient import InputXGradient
from .integrated_gradients import IntegratedGradients
from .occlusion import Occlusion
from .saliency import Saliency
from .smoothgrad import SmoothGrad

METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls
    for cls in (Saliency, InputXGradient, SmoothGrad, IntegratedGradients, GradCam, Occlusion)
}


def get_method(name: str, field: str = "method") -> AttributionMethod:
    """An instance of the method called ``name``; InvalidArgument naming ``field`` if unknown."""
    cls = METHODS.get(name)
    if cls is None:
        raise InvalidArgument(field, f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return cls()
