"""Incremental occlusion on a vision transformer: every token depends on every patch after
the patch embedding, so nothing is saved; occlusion runs full passes and the log says why."""

from __future__ import annotations

import logging

import pytest

from support.vit_models import vit_served
from xaiserve.runtime.forward import backends as forward_backends
from xaiserve.runtime.forward.config import ForwardConfig


def test_a_vit_runs_occlusion_as_full_passes_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forwards = forward_backends.prepare_forwards(
        vit_served(), ForwardConfig(backend="torch", export_on_load=False)
    )
    with caplog.at_level(logging.INFO, logger=forward_backends.__name__):
        assert forwards.occluder("torch", 4, [[0, 4, 8, 12]] * 2) is None
    assert "model net: occlusion (window 4) runs full forward passes: no saving" in caplog.text
    assert (
        "every value depends on the whole input from call_method flatten "
        "(of patch_embed_proj) on" in caplog.text
    )
