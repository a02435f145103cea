"""AUTO: run candidate methods and return them ranked by APEM, the best first (seed 004:
the score exists so users can pick the method that fits the model and the image).

AUTO produces no map of its own. The engine expands it into one explanation per candidate,
each with a reliability record, placed where AUTO was requested and ordered by APEM
(undefined APEM last). Candidates run with their default parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.api import catalog
from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.base import AttributionMethod, MethodContext
from xaiserve.runtime.model import ServedModel

DEFAULT_CANDIDATES = ("saliency", "smoothgrad", "integrated_gradients", "grad_cam")
MAX_CANDIDATES = 8


class Auto(AttributionMethod):
    name = "auto"
    composite = True

    def resolve_params(
        self, given: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> dict[str, Any]:
        """``candidates``: method names of the catalog (which the registry serves: a test
        holds them equal), not ``auto``, at most MAX_CANDIDATES, no repeats."""
        unknown = set(given) - {"candidates"}
        if unknown:
            raise InvalidArgument(f"{field}.{sorted(unknown)[0]}", "unknown parameter of auto")
        candidates = tuple(given.get("candidates") or DEFAULT_CANDIDATES)
        if len(candidates) > MAX_CANDIDATES:
            raise InvalidArgument(
                f"{field}.candidates", f"at most {MAX_CANDIDATES} candidates, got {len(candidates)}"
            )
        for i, name in enumerate(candidates):
            if name not in catalog.METHODS or name == self.name:
                raise InvalidArgument(f"{field}.candidates[{i}]", f"not a candidate method: {name}")
            if name in candidates[:i]:
                raise InvalidArgument(f"{field}.candidates[{i}]", f"{name} is listed twice")
        return {"candidates": candidates}

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        raise TypeError("auto is expanded by the engine into its candidates, which it counts")

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        raise TypeError("auto is expanded by the engine into its candidates")
