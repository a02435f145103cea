"""What a model's CAM layer outputs, read once per layer from one hooked, uncounted forward
of a zero image and then remembered: its channels K (the masks Score-CAM may evaluate per
image) and, for a layer whose tokens are no class token and patch grid of the input, why
the CAM family cannot use it. The engine probes every model when it is built, before any
request can hook the layer."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from xaiserve.api.errors import FailedPrecondition
from xaiserve.methods.hooks import captured
from xaiserve.runtime.model import ServedModel


@dataclass(frozen=True)
class LayerProbe:
    """channels: K of the layer's map (0 when the forward does not call the layer or its
    output is no map); reason: why the layer's output is no map, or None."""

    channels: int
    reason: str | None = None


_PROBES: weakref.WeakKeyDictionary[nn.Module, LayerProbe] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def probe_layer(served: ServedModel) -> LayerProbe:
    """The probe of ``served``'s CAM layer (which must be configured)."""
    layer = served.cam_layer
    if layer is None:
        raise RuntimeError("no CAM layer")  # unsupported_reason() stops this earlier
    with _LOCK:
        if layer not in _PROBES:
            zero = torch.zeros(1, *served.config.input_shape, device=served.device)
            try:
                with torch.no_grad(), captured(layer, spatial=served.config.spatial) as calls:
                    served.module(zero)
                _PROBES[layer] = LayerProbe(int(calls[0][1].shape[1]) if calls else 0)
            except FailedPrecondition as err:
                _PROBES[layer] = LayerProbe(0, f"cam_layer {served.config.cam_layer}: {err}")
        return _PROBES[layer]
