"""Forward-only setup of a model by its device: ONNX Runtime's GPU follows the model's torch
GPU unless configured, a model on a GPU runs occlusion as full passes, and ONNX Runtime's
threads default to the CPUs the process may use. (No GPU here: the model's ``device`` is
set without moving it, which is all these rules read.)"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from support.tiny_models import tiny_served
from xaiserve.runtime.cpus import usable_cpus
from xaiserve.runtime.forward import backends as forward_backends
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.forward.onnx_export import export_onnx, new_session

TORCH_ONLY = ForwardConfig(backend="torch", export_on_load=False)


@pytest.mark.parametrize(
    ("device", "configured", "expected"),
    [("cpu", None, 0), ("cuda:1", None, 1), ("cuda:1", 0, 0), ("cpu", 2, 2)],
)
def test_onnx_runtime_takes_the_models_gpu_unless_configured(
    device: str, configured: int | None, expected: int
) -> None:
    served = replace(tiny_served(), device=torch.device(device))
    config = replace(TORCH_ONLY, onnx_device_id=configured)
    forwards = forward_backends.prepare_forwards(served, config)
    assert forwards.config.onnx_device_id == expected
    assert forwards.config.session_options["device_id"] == expected


def test_a_model_on_a_gpu_runs_occlusion_as_full_passes(caplog: pytest.LogCaptureFixture) -> None:
    on_gpu = replace(tiny_served(), device=torch.device("cuda", 0))
    forwards = forward_backends.prepare_forwards(on_gpu, TORCH_ONLY)
    starts = [[0, 4, 8, 12]] * 2
    with caplog.at_level(logging.INFO, logger=forward_backends.__name__):
        assert forwards.occluder("torch", 4, starts) is None
    assert "runs full forward passes: the model is on cuda:0" in caplog.text
    on_cpu = forward_backends.prepare_forwards(tiny_served(), TORCH_ONLY)
    assert on_cpu.occluder("torch", 4, starts) is not None


def test_onnx_runtime_threads_default_to_the_usable_cpus() -> None:
    graph = export_onnx(tiny_served().module, (3, 16, 16))
    default = new_session(graph).get_session_options()
    assert default.intra_op_num_threads == usable_cpus()
    assert new_session(graph, threads=1).get_session_options().intra_op_num_threads == 1
