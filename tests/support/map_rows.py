"""Hand-made ``MapRow`` records for the evaluation table tests."""

from __future__ import annotations

import math

from xaiserve.offline.evaluate import MapRow

EPS_MAX = 12288.0


def map_row(
    image: str,
    method: str,
    apem: float,
    *,
    stage: str = "one_channel",
    correct: bool = True,
    loss: float = 1.0,
    censored_plus: bool = False,
    confidence: float = math.nan,
    eps_minus: float = 5.0,
) -> MapRow:
    """One map's row: eps_plus = eps_minus + apem (``EPS_MAX`` when ``censored_plus``),
    label 1, predicted 1 when ``correct`` else 2."""
    eps_plus = EPS_MAX if censored_plus else eps_minus + apem
    return MapRow(
        image=image,
        method=method,
        stage=stage,
        label=1,
        predicted=1 if correct else 2,
        correct=correct,
        loss=loss,
        eps_minus=eps_minus,
        eps_plus=eps_plus,
        apem=eps_plus - eps_minus,
        apem_norm=0.5,
        shuffled_apem_norm=0.0,
        resolution=0.01,
        eps_minus_censored=False,
        eps_plus_censored=censored_plus,
        undefined_reason="",
        forward_passes=100,
        seconds=0.1,
        mask_mass=math.nan,
        confidence=confidence,
    )
